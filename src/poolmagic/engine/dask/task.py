"""What runs inside a dask worker: one chunk of one map, as a local worker runs it.

The dask backend (backend.py) submits ``run`` once per chunk. It is found
by reference on the worker, so poolmagic must be installed there; the user's
function travels by value inside a ``Blob`` scattered to every worker once
per function version, and is unpickled once per worker process (``_FNS``).

The chunk itself runs through ``runchunk.run_chunk``, the one reader of the
map's options in a worker: the same per-item seeding, print() capture,
timing, CPU and wait measures and exception packing as the local backend, so results, errors and output are the same whichever backend ran
them. Results go back already pickled (cloudpickle, big buffers as separate
frames), so a result that cannot be pickled becomes an error naming its
item, as locally, instead of failing inside dask's transfer.
"""
from __future__ import annotations

import os
import pickle
import threading
from typing import Any

from ..core.chunk import pack_results
from ..core.chunkstart import FunctionCache, StageFailed, map_shared, start_chunk
from ..core.runchunk import mark_in_worker, run_chunk
from ..context import ContextApplier
from .draws import isolate as _isolate_random

_FNS = FunctionCache(by_use=True)  # function version -> the loaded function (this process)
_APPLIER = ContextApplier()
# run_chunk swaps sys.stdout/sys.stderr for the whole process and the context
# (cwd, environment) is per process too: one chunk at a time per process. Seeds
# need it as well: a worker with several threads would run two seeded chunks on
# the process's one random/np.random, each moving the other's streams
# (tests/test_dask.py, two threads).
_LOCK = threading.Lock()
CLIENT_PID: int | None = None  # the process that connected a poolmagic pool to a cluster (link.py)
IN_KERNEL = (
    "the dask cluster's workers run inside this kernel (a LocalCluster(processes=False)): a map's "
    "chunks replace the process's sys.stdout and seed its random and np.random streams while they run, "
    "so they would capture the notebook's own output, change its random numbers and mark the kernel as a "
    "worker (no pool could start after). Start the cluster with processes=True (its default), or use "
    "%poolsize --backend threads (Pool(backend='threads')) to run items on threads of the kernel"
)


class Blob:
    """Pickled bytes plus out-of-band buffers that dask moves as raw frames.

    With pickle protocol 5 the buffers leave the pickle stream as frames (no
    copy into it); dask uses protocol 4 on some of its own paths, where they
    travel in band as bytes instead.
    """

    __slots__ = ("key", "data", "buffers")

    def __init__(self, key: str | None, data: bytes, buffers: list):
        self.key, self.data, self.buffers = key, data, buffers

    def __reduce_ex__(self, protocol: int) -> tuple:
        if protocol >= 5:
            bufs = [pickle.PickleBuffer(b) for b in self.buffers]
        else:
            bufs = [bytes(b) for b in self.buffers]
        return (Blob, (self.key, self.data, bufs))

    def load(self) -> Any:
        return pickle.loads(self.data, buffers=[_writable(b) for b in self.buffers])


class SharedBlob:
    """A function version whose big buffers wait in the kernel's shared memory (a memfd).

    For a LocalCluster: the workers are on the kernel's machine, so each maps
    the kernel's one copy copy-on-write through /proc (may still change its
    arrays privately) instead of receiving 50 MB through a socket. Anonymous
    memory: nothing is left behind when the kernel dies.
    """

    __slots__ = ("key", "data", "path", "sizes")

    def __init__(self, key: str, data: bytes, path: str, sizes: tuple):
        self.key, self.data, self.path, self.sizes = key, data, path, sizes

    def __reduce__(self) -> tuple:
        return (SharedBlob, (self.key, self.data, self.path, self.sizes))

    def load(self) -> Any:
        return pickle.loads(self.data, buffers=map_shared(os.open(self.path, os.O_RDONLY), self.sizes))


class Box:
    """One object to scatter as is (dask would scatter a tuple's items one by one)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __reduce__(self) -> tuple:
        return (Box, (self.value,))


def _writable(buf: Any) -> Any:
    """Arrays made from read-only frames would be read-only: copy those (rare)."""
    view = memoryview(buf)
    return bytearray(view) if view.readonly else view


def run(fn: Blob | SharedBlob, ctx: Box | None, seq: int, start: int, items: Any, options: Any, timed: bool, topic: str,
        report_end: bool = False, marks: str | None = None, indices: tuple | None = None) -> tuple:
    """Run one chunk; returns ("done", ...) or ("failed", stage, packed error).

    ``topic``: where to say that the chunk begins (and with ``report_end``,
    that it ended: a remote cluster's client gives a task that timed out up,
    but must know when its worker is free again). ``marks``: a folder on this
    machine (a LocalCluster's) where the chunk running now is written down.
    ``indices``: the items' ITERABLE positions when not ``start + k`` (seeds).
    """
    if CLIENT_PID == os.getpid():
        from ...errors import PoolmapError

        raise PoolmapError(IN_KERNEL)
    _isolate_random()  # dask's threads draw from a random.Random of their own (seeds)
    with _LOCK:
        _mark(marks, seq)
        try:
            return _run(fn, ctx, seq, start, items, options, timed, topic, indices, sure=report_end)
        finally:
            _mark(marks, -1, ended=seq)
            if report_end:
                _tell(topic, {"seq": seq, "end": True})


def _run(fn: Blob | SharedBlob, ctx: Box | None, seq: int, start: int, items: Any, options: Any, timed: bool, topic: str,
         indices: tuple | None = None, sure: bool = False) -> tuple:
    mark_in_worker()  # a pool started by the function would nest: refused
    try:
        func, items = start_chunk(_APPLIER, None if ctx is None else ctx.value, _FNS, fn.key, items, source=fn)
    except StageFailed as failed:
        return ("failed", failed.stage, failed.packed)
    # ``sure`` (a remote cluster: no marks file): "began" reaches the scheduler before the first
    # item runs, so an item that kills its worker at once does not take it along and leave the
    # client blaming the chunk before it (outcomes.py: _was_running)
    address = _tell(topic, {"seq": seq, "pid": os.getpid()}, sure=sure)
    _APPLIER.limit_threads_if_new_libraries()
    # under --timeout the client clocks each item: the chunk says when it moves on (core/runchunk.py)
    progress = None if options.timeout is None else (lambda done: _tell(topic, {"seq": seq, "done": done}))
    r = run_chunk(func, items, options, start=start, timed=timed, indices=indices, progress=progress,
                  own_filters=_one_task_at_a_time())
    body, frames = pack_results(r.out, r.records, r.errors, start, items, indices)
    # memoryviews: dask sends them as frames of their own, whatever the pickle protocol
    return ("done", r.t0, r.t1, r.times, os.getpid(), address, body, frames, r.cpu_s, r.waited_s)


_MARK_FDS: dict[str, int] = {}


def _mark(folder: str | None, seq: int, ended: int | None = None) -> None:
    """Write down which chunk this worker runs (-1: none), and the last that ``ended``,
    where its client can read them.

    Events reach the client only after dask's 2 ms batching: an item that
    kills its worker at once (os._exit, a segfault) would take its "began"
    with it, and the client could blame the chunk before it. A write to a
    file survives the process: the kernel has the page. The last chunk that
    ended tells the client which of a dead worker's chunks ran, though their
    results died with it (outcomes.py: they are run again, and said to be).
    """
    if folder is None:
        return
    try:
        fd = _MARK_FDS.get(folder)
        if fd is None:
            from distributed import get_worker

            path = os.path.join(folder, mark_name(get_worker().address))
            fd = _MARK_FDS[folder] = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        if ended is None:
            os.pwrite(fd, b"%20d\n" % seq, 0)
        else:
            os.pwrite(fd, b"%20d\n%20d\n" % (seq, ended), 0)
    except Exception:
        pass


def mark_name(address: str) -> str:
    """The file a worker at ``address`` writes its running chunk to."""
    return "".join(ch if ch.isalnum() else "_" for ch in address)


def _tell(topic: str, msg: dict, sure: bool = False) -> str | None:
    """An event for the client: chunk ``seq`` runs now, here (timeouts, interrupts, crashes).

    ``sure``: wait until the scheduler has it (a round trip), rather than
    batching it for 2 ms, where a worker that dies at once would lose it."""
    try:
        from distributed import get_worker

        w = get_worker()
        if sure:
            from distributed.utils import sync

            try:
                sync(w.loop, w.scheduler.log_event, topic=topic, msg={**msg, "worker": w.address})
                return w.address
            except Exception:  # the scheduler did not answer: batched, as before
                pass
        w.log_event(topic, msg)
        return w.address
    except Exception:  # not in a dask worker (a test calling run directly)
        return None


def _one_task_at_a_time() -> bool:
    """This dask worker runs one task at a time (the LocalCluster poolmagic starts: one thread each),
    so module state such as the warning filters can be set around a chunk."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads == 1
    except Exception:  # not in a worker, or another distributed: leave the filters alone
        return False
