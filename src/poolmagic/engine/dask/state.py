"""What the parts of the dask backend share: the maps, the chunks in flight, the workers seen.

One ``State`` per backend, read and changed on its manager thread only (the
parts are objects the backend holds: link.py reaches the cluster, scheduling.py
sends chunks, outcomes.py answers them, memory.py guards memory; each gets this
State and the parts it calls, nothing else).
"""
from __future__ import annotations

from typing import Any

from ..handle import Chunk
from ..job import ItemTimes, Job


def incarnation(info: Any) -> str | None:
    """What tells one worker process from another in the scheduler's list of workers.

    Not its address (the OS hands a dead worker's port to a new one), nor its
    name or "id" (dask starts a new worker under a retired one's name): the
    scratch folder each worker process makes for itself."""
    return info.get("local_directory") if isinstance(info, dict) else None


class DaskChunk(Chunk):
    """A chunk as one dask task, pinned to one worker."""

    __slots__ = ("future", "worker", "began", "pid", "deps")

    def __init__(self, seq: int, job: Job, start: int, items: Any, future: Any, worker: str, deps: tuple):
        super().__init__(seq, job, start, items)
        self.future = future
        self.worker = worker  # the address it is pinned to
        self.began: float | None = None  # perf_counter here when the task said it runs
        self.pid: int | None = None
        self.deps = deps  # the futures of the scattered function and context it needs


class State:
    """The manager thread's record of maps, chunks and workers (see the module docstring)."""

    def __init__(self, owned: bool) -> None:
        self.owned = owned  # a LocalCluster we started (else a remote cluster's scheduler)
        self.jobs: list[Job] = []
        self.inflight: dict[int, DaskChunk] = {}  # seq -> chunk; answered chunks leave at once
        self.by_key: dict[str, DaskChunk] = {}  # task key -> chunk
        self.workers: dict[str, int | None] = {}  # address -> pid (None: not known yet)
        self.slots: dict[str, int] = {}  # address -> the number shown as its worker
        self.expected: set[str] = set()  # workers we killed: what they held goes back, unblamed
        # workers that left (a stale worker list may still name them): address -> the incarnation
        # of the one that left there (the OS hands a port to a new worker again, often after ~100 deaths)
        self.gone: dict[str, str | None] = {}
        self.ids: dict[str, str | None] = {}  # address -> the incarnation of the worker known there
        # chunks given up on that still run (left to finish, or on a remote cluster): seq -> address
        self.zombies: dict[int, str] = {}
        self.zombie_keys: dict[str, DaskChunk] = {}  # their futures (ours, left to finish): key -> chunk
        self.kills: list[tuple[float, str, int, int]] = []  # (when, address, pid, seq): workers to kill
        self.waiting: dict[int, Job] = {}  # maps told they wait for a worker (a remote cluster has none)
        self.item_times = ItemTimes()
        self.task_slots = 0  # the threads of the workers the scheduler listed last (link.refresh_workers)

    def take(self, c: DaskChunk) -> bool:
        """Remove ``c`` from the chunks in flight; False if it was answered already."""
        if self.inflight.pop(c.seq, None) is None:
            return False
        self.by_key.pop(c.future.key, None)
        return True

    def slot(self, address: str | None) -> int:
        """The number a worker is shown as (in order of first sight; -1: none)."""
        if address is None:
            return -1
        slot = self.slots.get(address)
        if slot is None:
            slot = self.slots[address] = len(self.slots)
        return slot

    def holds(self, address: str) -> bool:
        """A chunk of ours is queued or runs on the worker at ``address``."""
        return any(c.worker == address for c in self.inflight.values()) or address in self.zombies.values()

    def forget_finished_jobs(self) -> None:
        self.jobs = self.item_times.keep_active(self.jobs)
        if self.waiting:
            self.waiting = {k: j for k, j in self.waiting.items() if j in self.jobs}

    def forget_chunks(self) -> None:
        """The connection is gone: no chunk is in flight any more."""
        self.inflight.clear()
        self.by_key.clear()
