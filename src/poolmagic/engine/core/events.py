"""What a running map tells its observers, and the chunk record they all share.

The Job publishes one event per thing that happens; the run report, the
progress display, the timeline and an async map's live display observe the
same stream (as dask's scheduler plugins observe transitions). Events are
delivered on the thread that caused them (usually the backend's manager
thread), so an observer must be quick and must not block: record, then let
the caller's thread render.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple


@dataclass
class ChunkRecord:
    """One chunk as a worker ran it. Times are ``time.perf_counter()`` seconds."""

    worker: int
    start: int
    count: int
    t0: float
    t1: float
    item_times: list[float] | None = None
    pid: int = 0
    status: str = "done"  # "done", "failed" (an item raised)
    t_sent: float = 0.0  #: when the parent sent it (perf_counter)
    t_recv: float = 0.0  #: when the parent received its results
    nbytes: int = 0  #: bytes of results that came back
    waited_s: float = 0.0  #: of t1 - t0, time runnable but waiting for a CPU (measured on Linux)
    cpu_s: float | None = None  #: CPU time the worker used for it, native threads included (None: not measured)
    faults: int | None = None  #: page faults of the worker's thread while it ran the items (None: not measured)
    kept_faults: int | None = None  #: page faults of the kernel while it built the results (None: not measured)

    @property
    def busy_s(self) -> float:
        return self.t1 - self.t0


class ChunkStarted(NamedTuple):
    worker: int
    pid: int
    start: int
    count: int
    t: float  #: perf_counter when it was sent


class ChunkFinished(NamedTuple):
    record: ChunkRecord
    failed: int  #: items of it that raised
    results: list  #: its results (NOT_DONE where an item failed)
    items: Any  #: its items
    raw: tuple | None = None  #: (body, frames): the results as the worker pickled them, when kept
    retried: int = 0  #: of the failed, items queued to run again (--retries): not finished yet


class LateChunk(NamedTuple):
    """A chunk that finished after its map ended (cancelled, failed): published before its
    results are kept, so a stream's items are keyed for --resume before the results show."""

    start: int  #: the chunk's first item
    items: Any  #: its items


class ItemsProgress(NamedTuple):
    """Items of a chunk still running have finished (sent at most every 0.5 s)."""

    start: int  #: the chunk's first item
    done: int  #: items of it finished so far


class ItemsFailed(NamedTuple):
    indices: list
    error: BaseException  #: a crash, a timeout, an item that could not be sent
    retried: int = 0  #: of the indices, items queued to run again (--retries): not finished yet


class WorkerReplaced(NamedTuple):
    worker: int
    pid: int
    reason: str


class Waiting(NamedTuple):
    """The map has work but no worker to run it (a remote cluster without workers)."""

    why: str | None  #: None: it has a worker again


class MapFinished(NamedTuple):
    status: str  #: "done", "failed" or "cancelled"
    error: BaseException | None


Event = Any
Observer = Callable[[Event], None]
