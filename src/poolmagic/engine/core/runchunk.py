"""The one place a worker reads a map's options: ``run_chunk(fn, items, options)``.

Every backend's worker (a local worker process, engine/worker.py; a dask
task, engine/dask/task.py; a thread of engine/threads) runs a chunk through here, so a new per-item option is a field
of MapOptions (mapoptions.py) plus its use below, and it works on every
backend: before, each worker unpacked the options itself, and an option read
by one could silently do nothing on the other.

What a chunk run measures is measured here too, the same on every backend:
its CPU time (native threads included) and the time its thread waited,
runnable, for a CPU (Linux): the map's card compares them with its wall time.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

from .. import protocol as P
from .chunk import run_chunk as _run_items

CACHE_SIZE = 4  # functions and contexts kept per worker process (the local parent mirrors this LRU)
_in_worker = False  # True in a worker process (or a dask worker, once it ran a chunk): no nested pools


def mark_in_worker() -> None:
    """This process runs chunks: a pool started by a mapped function would nest, and is refused."""
    global _in_worker
    _in_worker = True


def in_worker() -> bool:
    """Whether this process runs chunks of a poolmagic map."""
    return _in_worker


class ChunkRun(NamedTuple):
    """What running one chunk produced, and what it cost."""

    out: list  # results, NOT_DONE where an item raised
    t0: float  # perf_counter when the first item began
    t1: float  # ... and when the last ended
    times: list | None  # each item's seconds, when timed
    records: list  # print() output: (index, stream, text)
    errors: list  # (index, packed exception)
    cpu_s: float | None  # CPU time of the process meanwhile
    waited_s: float | None  # of t1 - t0, time runnable but waiting for a CPU (None: not measured)
    faults: int | None = None  # page faults of this thread meanwhile: fresh memory it touched (None: not measured)


def run_chunk(fn: Callable, items: Any, options: Any, *, start: int, timed: bool,
              indices: tuple | None = None, progress: Callable[[int], None] | None = None,
              redirect: Callable | None = None, clock: Callable[[], float] = time.process_time,
              own_filters: bool = False) -> ChunkRun:
    """Run ``fn`` over one chunk as ``options`` (a MapOptions) say: ``star``, ``keep_going``, ``seed``.

    ``start``: the first item's index in the map; ``timed``: time each item;
    ``indices``: each item's position in the ITERABLE when not ``start + k``
    (a re-run of some items: seeds); ``progress(done)``: called while a long
    timed chunk runs; ``redirect``: how print() is captured (chunk.run_chunk;
    a thread of the threads backend routes its own writes); ``clock``: the CPU
    clock (the process's in a worker process, the thread's on threads);
    ``own_filters``: this process runs one chunk at a time (a worker of its own), so the
    kernel's warning filters are put in place around it.
    Options the parent enforces (timeout, retries, memory) are not read here, but for
    how often a chunk under --timeout says how far it got (the parent clocks each item).
    """
    # Read right at t0 and t1 (two reads per chunk, ~1 µs each: the speedup needs them for every chunk).
    # Read around the call (before), a chunk also took up waits just outside its items: in a
    # tiny-item map a quarter of the chunks "waited" all their time while using as much CPU (the
    # waits read at t0..t1 were 23 % less), and the card read that much too little work.
    marks: list = []
    with _errstate(options.errstate), _filters(options.warning_filters if own_filters else None), \
            _settings(options.settings, own_filters):
        out, t0, t1, times, records, errors = _run_items(
            fn, items, start, star=options.star, timed=timed, keep_going=options.keep_going, seed=options.seed,
            progress=progress, indices=indices, redirect=redirect,
            progress_s=None if options.timeout is None else P.progress_every(options.timeout),
            meter=lambda: marks.append((runqueue_wait(), clock(), thread_faults())),
        )
    (wait0, cpu0, faults0), (wait1, cpu1, faults1) = marks
    cpu = cpu1 - cpu0
    waited = None if wait0 is None or wait1 is None else min((wait1 - wait0) / 1e9, t1 - t0)
    faults = None if faults0 is None or faults1 is None else faults1 - faults0
    return ChunkRun(out, t0, t1, times, records, errors, cpu, waited, faults)


def _settings(settings: tuple | None, process_wide: bool) -> Any:
    """The kernel's decimal context, numpy print options and pandas options (core/settings.py)."""
    if settings is None:
        return contextlib.nullcontext()
    from .settings import applied

    return applied(settings, process_wide)


def _filters(filters: tuple | None) -> Any:
    """The kernel's warning filters (``MapOptions.warning_filters``) for the chunk only: a worker
    starts with Python's, so a kernel's ``warnings.simplefilter('error')`` made a RuntimeWarning
    raise in a loop and only print in a map. Module state: only where one chunk runs at a time."""
    return contextlib.nullcontext() if filters is None else _kernel_filters(filters)


class FilterCategory(NamedTuple):
    """A warning filter's category of a library (numpy, pandas), by name: unpickling the class
    itself imported its library with the options, and a remote worker without that library
    failed every chunk before its first item, though the items did not use it."""

    module: str
    qualname: str


_RESOLVED: list = [None, ()]  # [the filters last resolved, what they resolved to]


def _resolved(filters: tuple) -> tuple:
    """``filters`` with each FilterCategory's class, those whose library is missing here left out
    (no warning of that class can be raised where its library cannot be imported)."""
    if _RESOLVED[0] is filters:
        return _RESOLVED[1]
    import importlib

    out = []
    for f in filters:
        category = f[2]
        if type(category) is FilterCategory:
            try:
                category = getattr(importlib.import_module(category.module), category.qualname)
            except (ImportError, AttributeError):
                continue
            f = (f[0], f[1], category, f[3], f[4])
        out.append(f)
    _RESOLVED[:] = [filters, tuple(out)]
    return _RESOLVED[1]


@contextlib.contextmanager
def _kernel_filters(filters: tuple) -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filters[:] = _resolved(filters)
        warnings._filters_mutated()  # (the C side caches the filters by a version number)
        yield


def _errstate(pairs: tuple | None) -> Any:
    """numpy's error handling as the kernel had it (``MapOptions.errstate``), for the chunk only.

    A worker (and a thread: numpy keeps it per thread) starts with numpy's default, so a
    kernel's ``np.seterr(all='raise')`` made 1/0 raise in a loop and give inf in a map.
    """
    if pairs is None:
        return contextlib.nullcontext()
    try:
        import numpy as np  # the kernel has it; a remote cluster's worker may not (nor may its items)
    except ImportError:
        return contextlib.nullcontext()
    from .settings import unpack_value

    return np.errstate(**{k: unpack_value(v) for k, v in pairs})  # (with "call": np.seterrcall's function)


try:
    from resource import RUSAGE_THREAD as _RUSAGE_THREAD, getrusage as _getrusage
except ImportError:  # not Linux
    _RUSAGE_THREAD = None


def thread_faults() -> int | None:
    """Minor page faults of this thread so far (Linux; ~1 µs): fresh memory it touched."""
    if _RUSAGE_THREAD is None:
        return None
    return _getrusage(_RUSAGE_THREAD).ru_minflt


_SCHEDSTAT = "/proc/thread-self/schedstat"
_has_schedstat = os.path.exists(_SCHEDSTAT)


class _OpenFile:
    """A descriptor closed when its holder goes (with its thread's ``threading.local`` data)."""

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


# This thread's schedstat file, kept open: one pread (~1 µs) per reading, where opening it for
# each of a chunk's two readings cost ~14 µs each. Per thread: the file names the thread that
# opened it, and the threads backend runs chunks on many.
_schedstat = threading.local()


def runqueue_wait() -> int | None:
    """Nanoseconds this thread has spent runnable but waiting for a CPU (Linux)."""
    if not _has_schedstat:
        return None
    try:
        f = getattr(_schedstat, "file", None)
        if f is None or f.pid != os.getpid():  # first use in this thread, or a forked child
            f = _schedstat.file = _OpenFile(_SCHEDSTAT)
        return int(os.pread(f.fd, 128, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return None
