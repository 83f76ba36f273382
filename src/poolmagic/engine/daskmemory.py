"""The memory guard on a dask LocalCluster that poolmagic started (mixed into DaskBackend).

The same rules as the local backend's (memory.py): a worker above its map's
``--max-memory`` is stopped and its item fails with ``WorkerMemoryError``
naming it; when the memory this kernel may use runs low, the largest busy
worker is stopped. The manager thread reads each busy worker's
``/proc/PID/statm`` every ``memory.PERIOD_S`` while chunks run.

Only on our own cluster: its workers are processes on this machine. A remote
cluster's are not, and a map there with ``--max-memory`` is refused before
it starts (``limits_memory``); dask's own worker memory limit covers it.

dask's worker-side memory monitor (spill at 70 %, pause at 80 % of the
worker's limit) is off on our cluster (daskplumbing.CLUSTER_CONFIG): our tasks
are pinned to their worker, and a paused worker would hold them until its
memory went down, which it may never do. The nanny's own last resort (it
kills its worker at 95 %) stays.
"""
from __future__ import annotations

import time
from typing import Any

from ..errors import WorkerMemoryError
from . import memory
from .daskplumbing import kill_worker
from .events import WorkerReplaced


class DaskMemoryGuard:
    """Mixin of DaskBackend: stop a worker of our LocalCluster for its memory."""

    owned: bool
    _jobs: list
    _inflight: dict[int, Any]
    _expected: set[str]
    _next_guard: float

    @property
    def limits_memory(self) -> bool:
        """Whether maps may set ``--max-memory``: only our own cluster's workers can be looked at."""
        return self.owned

    def _guard_due(self) -> bool:
        return self.owned and memory.SUPPORTED and bool(self._inflight) and time.perf_counter() >= self._next_guard

    def _running_chunks(self) -> dict[str, Any]:
        """Each worker's running chunk, as the worker wrote it down (daskcluster marks)."""
        running = {}
        for address in {c.worker for c in self._inflight.values()}:
            mark = self._running_mark(address)
            c = self._inflight.get(mark) if mark is not None and mark >= 0 else None
            if c is not None and c.worker == address:
                running[address] = c
        return running

    def _guard_memory(self) -> None:
        self._next_guard = time.perf_counter() + memory.PERIOD_S
        running = self._running_chunks()
        busy = {}
        for address, c in running.items():
            pid = self._pid_of(address)
            if pid is not None:
                busy[address] = (pid, c.job.options.max_memory)
        held = sum(j.received for j in self._jobs if j.active)
        for address, size, why in memory.over_limit(busy, held=held):
            self._memory_stop(running[address], busy[address][0], size, why)

    def _memory_stop(self, c: Any, pid: int, size: int, why: str) -> None:
        """Kill ``c``'s worker now; its item fails (a longer chunk runs again item by item to name it)."""
        if not self._take(c):
            return
        self._cancel_futures([c])
        self._expected.add(c.worker)  # what else it holds goes back to its jobs, unblamed
        kill_worker(pid)  # its nanny starts a new worker
        job = c.job
        if not job.active:
            job.drop_chunk()
            return
        if len(c.items) > 1:
            job.retry_singly(c.start, c.items)
            return
        slot = self._slot(c.worker)
        exc = WorkerMemoryError(
            f"dask worker {slot} ({c.worker}, pid {pid}) was stopped while running {c.describe()}: {why}. "
            f"Its nanny starts a new worker; items that finished are kept.",
            c.indices, size, job.options.max_memory,
        )
        job.items_failed(c.indices, exc, c.items, c.start)
        job.publish(WorkerReplaced(slot, pid, why))
        if not job.active:
            self._abandon(job)

    # provided by DaskCluster and DaskOutcomes, which come before this class among DaskBackend's bases
    def _running_mark(self, address: str) -> int | None:  # pragma: no cover
        raise NotImplementedError

    def _pid_of(self, address: str) -> int | None:  # pragma: no cover
        raise NotImplementedError

    def _slot(self, address: str | None) -> int:  # pragma: no cover
        raise NotImplementedError

    def _take(self, c: Any) -> bool:  # pragma: no cover
        raise NotImplementedError

    def _cancel_futures(self, chunks: list) -> None:  # pragma: no cover
        raise NotImplementedError

    def _abandon(self, job: Any) -> None:  # pragma: no cover
        raise NotImplementedError
