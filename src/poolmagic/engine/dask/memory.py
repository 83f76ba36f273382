"""The memory guard on a dask LocalCluster that poolmagic started (``DaskBackend.memory``).

The same rules as the local backend's (memory.py): a worker above its map's
``--max-memory`` is stopped and its item fails with ``WorkerMemoryError``
naming it; when the memory this kernel may use runs low, the largest busy
worker is stopped. The manager thread reads each busy worker's
``/proc/PID/statm`` every ``memory.PERIOD_S`` while chunks run.

Only on our own cluster: its workers are processes on this machine. A remote
cluster's are not, and a map there with ``--max-memory`` is refused before
it starts (``limits_memory``); dask's own worker memory limit covers it.

dask's worker-side memory monitor (spill at 70 %, pause at 80 % of the
worker's limit) is off on our cluster (plumbing.CLUSTER_CONFIG): our tasks
are pinned to their worker, and a paused worker would hold them until its
memory went down, which it may never do. The nanny's own last resort (it
kills its worker at 95 %) stays.
"""
from __future__ import annotations

import time
from typing import Any

from ...errors import WorkerMemoryError
from .. import memory
from .plumbing import kill_worker
from .state import State


class MemoryGuard:
    """Stops a worker of our LocalCluster for its memory (held by DaskBackend)."""

    def __init__(self, state: State, link: Any, outcomes: Any) -> None:
        self.state = state
        self.link = link
        self.outcomes = outcomes
        self.owned = state.owned
        self._next = 0.0  # when it looks next

    def due(self) -> bool:
        return self.owned and memory.SUPPORTED and bool(self.state.inflight) and time.perf_counter() >= self._next

    def _running_chunks(self) -> dict[str, Any]:
        """Each worker's running chunk, as the worker wrote it down (link.running_mark)."""
        running = {}
        for address in {c.worker for c in self.state.inflight.values()}:
            mark = self.link.running_mark(address)
            c = self.state.inflight.get(mark) if mark is not None and mark >= 0 else None
            if c is not None and c.worker == address:
                running[address] = c
        return running

    def guard(self) -> None:
        self._next = time.perf_counter() + memory.PERIOD_S
        running = self._running_chunks()
        busy = {}
        for address, c in running.items():
            pid = self.link.pid_of(address)
            if pid is not None:
                busy[address] = (pid, c.job.options.max_memory)
        held = sum(j.received for j in self.state.jobs if j.active)
        for address, size, why in memory.over_limit(busy, held=held):
            self._memory_stop(running[address], busy[address][0], size, why)

    def _memory_stop(self, c: Any, pid: int, size: int, why: str) -> None:
        """Kill ``c``'s worker now; its item fails (a longer chunk runs again item by item to name it)."""
        if not self.state.take(c):
            return
        self.link.cancel([c])
        self.state.expected.add(c.worker)  # what else it holds goes back to its jobs, unblamed
        kill_worker(pid)  # its nanny starts a new worker
        what = f"dask worker {self.state.slot(c.worker)} ({c.worker}, pid {pid}) was stopped while running " \
               f"{c.describe()}: {why}"
        self.outcomes.policy.worker_lost(c, WorkerMemoryError, what, lambda: WorkerMemoryError(
            f"{what}. Its nanny starts a new worker; items that finished are kept.",
            c.item_indices(), size, c.job.options.max_memory), worker=self.state.slot(c.worker))
