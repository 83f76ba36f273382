"""The plain Python API: what the magics call, usable from scripts and tests.

    from poolmagic import Pool, pmap
    squares = pmap(lambda x: x * x, range(10))          # the shared warm pool
    with Pool(4) as pool:
        report = pool.run(work, data, keep_going=True)  # RunReport: results, errors, timing

``Pool`` is a facade over objects in modules of their own (a comment atop the
class lists them; ``MapHandle``, a map in the background, is maphandle.py's).
Here too: the shared pool of the magics and ``pmap`` (``get_pool``,
``set_pool``, ``shutdown_pool``).
"""
from __future__ import annotations

import functools
import sys
import threading
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import mpcompat
from .checks import check_call, check_positive, too_many_workers
from .cores import available_cores
from .engine.backends import make_backend
from .engine.base import Backend
from .engine.context import ContextCache
from .engine.core.job import Job
from .engine.core.transport import NATIVE_THREAD_LIMIT, OWN_PROCESS, WORKER_SETUP
from .errors import BadInputError, PoolmapError
from .mapprep import prepare_map
from .maphandle import MapHandle
from .maprun import start, wait_for
from .mpcompat import RUN, TERMINATE, AsyncResult
from .poolstate import PoolState
from .report import RunReport

if TYPE_CHECKING:
    from .imap import IMapIterator


_NOT_GIVEN: Any = object()


class Pool:
    """A warm pool of worker processes that maps notebook-defined functions.

    multiprocessing.Pool's interface and poolmagic's own (``run``, settings).
    """

    # Made of smaller objects, each method a few lines over them: ``backend`` (engine/), the
    # workers; ``_life`` (poolstate.py), RUN/CLOSE/TERMINATE, the maps running, the last map;
    # ``_callbacks`` (mpcompat.py), the thread AsyncResult callbacks run on. A map is checked
    # and prepared (mapprep.py), started and waited for (maprun.py); imap's is in imap.py.

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None, context: Any = None, *,
                 workers: int | None = None, start_method: str | None = None,
                 backend: Backend | str | None = None, address: str | None = None, dashboard: bool = False):
        """The arguments of ``multiprocessing.Pool``, then poolmagic's own.

        ``processes`` (or ``workers``): how many worker processes (default: the
        cores this process may use). ``initializer(*initargs)`` runs once in each
        worker process, before its first item. ``maxtasksperchild``: replace a
        worker after it ran that many items (after the chunk it is on).
        ``context``: a multiprocessing context, for its start method.
        ``backend``: "local" (default), "dask" (a LocalCluster, or the cluster at
        ``address``, e.g. "tcp://host:8786"), or a Backend instance. ``dashboard``:
        a LocalCluster serves dask's dashboard (127.0.0.1, no password; off by default).
        """
        workers, start_method = mpcompat.pool_arguments(processes, workers, initializer, maxtasksperchild,
                                                        context, start_method)
        self.cores = available_cores()
        self.backend: Backend = make_backend(backend, workers or self.cores, start_method, address, dashboard)
        self._warn_size(workers)
        self._worker_setup: Callable[[Callable], Callable] | None = None  # wraps the function (mapprep.py)
        if initializer or maxtasksperchild:
            if WORKER_SETUP in self.backend.lacks:
                self.backend.shutdown()
                raise BadInputError(f"initializer= and maxtasksperchild= cannot work on the {backend} backend: "
                                    f"{self.backend.lacks[WORKER_SETUP]}")
            self._worker_setup = functools.partial(mpcompat.WorkerSetup, token=uuid.uuid4().hex,
                                                   initializer=initializer, initargs=tuple(initargs),
                                                   maxtasks=maxtasksperchild)
        self._callbacks = mpcompat.Callbacks()
        self.threads: int | None = None  # native threads per worker; None: cores ÷ workers
        self.max_memory: int | None = None  # bytes per worker, for maps that set none
        self.serial_item_s: dict[str, float] = {}  # function version -> one worker's s/item (--tune)
        self._contexts = ContextCache()
        self._life = PoolState()  # last: a pool that failed to start is not a running one (__del__)

    # multiprocessing's names for its state and size (its own tests set _state)
    @property
    def _state(self) -> str:
        return self._life.state

    @_state.setter
    def _state(self, state: str) -> None:
        self._life.state = state

    @property
    def _processes(self) -> int:
        return self.size

    # The last map, for _poolmap and --tune (poolstate.py: which pools keep it).
    @property
    def last_report(self) -> RunReport | None:
        return self._life.last(0)

    @last_report.setter
    def last_report(self, report: RunReport | None) -> None:
        self._life.remember(0, report)

    @property
    def last_job(self) -> Job | None:
        return self._life.last(1)

    @last_job.setter
    def last_job(self, job: Job | None) -> None:
        self._life.remember(1, job)

    # ------------------------------------------------------------ settings
    def size_note(self, workers: int | None) -> str | None:
        """A note when ``workers`` is far above the cores; never on threads, which are
        for maps that wait, where many more than the cores is the point."""
        if OWN_PROCESS in self.backend.lacks:
            return None
        return too_many_workers(workers or 0, self.cores)

    def _warn_size(self, workers: int | None) -> None:
        msg = self.size_note(workers)
        if msg:
            warnings.warn(msg, stacklevel=3)

    def threads_per_worker(self, workers: int | None = None) -> int:
        """Native threads (BLAS, OpenMP) each worker may use: set, or cores ÷ workers.

        On threads the pools are the kernel's own, left as they are: the cores.
        """
        if NATIVE_THREAD_LIMIT in self.backend.lacks:
            return self.cores
        if self.threads is not None:
            return self.threads
        return max(1, self.cores // (workers or self.size))

    def status(self) -> str:
        from .display import status_text

        text = status_text(self.size, self.backend.description, self.cores, self.threads_per_worker(),
                           self.backend.state, self.max_memory)
        detail = self.backend.status_detail()  # e.g. a dask cluster's scheduler and dashboard
        return f"{text}\n{detail}" if detail is not None else text

    # ------------------------------------------------------------ lifecycle
    @property
    def size(self) -> int:
        return self.backend.size

    def resize(self, workers: int | None, warn: bool = True) -> None:
        """Set the number of workers (None: the cores available); no restart needed."""
        check_positive("workers", workers)
        if warn:
            self._warn_size(workers)
        self.backend.resize(workers or self.cores)

    def start(self) -> "Pool":
        """Start the workers in the background and return at once."""
        self.backend.start()
        return self

    def shutdown(self) -> None:
        """Stop every worker now (as ``terminate``; the pool then refuses work)."""
        self._life.state = TERMINATE
        self._callbacks.stop()
        self.backend.shutdown()

    def close(self) -> None:
        """Refuse new work; the maps running go on (``join`` waits for them), and the
        workers stop once they end."""
        self._life.close(idle=self.backend.shutdown)

    def terminate(self) -> None:
        """Stop every worker now; running maps end cancelled."""
        self._life.not_shared("terminate")
        self.shutdown()
        self._life.stop_maps()  # a map the backend had not taken up yet ends too

    def join(self, timeout: float | None = None) -> None:
        """After ``close`` or ``terminate``: wait for the running maps and their callbacks,
        then stop the workers."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._life.wait_maps(timeout)
        # as multiprocessing's join, which waits for its result thread: callbacks have all run
        self._callbacks.stop(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.shutdown()

    def __enter__(self) -> "Pool":
        self._life.not_shared("be used in a with block")
        self._life.check_running()
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self, _warn: Callable = warnings.warn) -> None:
        life = self.__dict__.get("_life")
        if life is not None and life.state == RUN and not life.shared:
            _warn(f"unclosed running multiprocessing pool {self!r}: call close() and join(), or use "
                  f"'with Pool() as pool:'", ResourceWarning, source=self)
            # and its workers stop, as multiprocessing's do (they ran on until the kernel exited),
            # from a thread of their own: the last reference may go on the pool's own manager thread
            if sys.is_finalizing():  # the interpreter is exiting: its exit handlers stopped them
                return
            try:
                threading.Thread(target=self.backend.shutdown, daemon=True, name="poolmagic-dropped").start()
            except RuntimeError:  # (threads can no longer start)
                pass

    def __reduce__(self) -> Any:
        """A pool cannot travel to a worker, as multiprocessing's cannot (its own error)."""
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self) -> str:
        life = self.__dict__.get("_life")
        return (f"<poolmagic.Pool state={life.state if life is not None else RUN} "
                f"workers={self.__dict__.get('backend') and self.size}>")

    # ------------------------------------------------------------ mapping
    def prepare(self, func: Callable, iterable: Iterable | None, *, resume: RunReport | None = None,
                **options: Any) -> Job:
        """Check everything and build the Job; raises BadInputError before any work.

        ``resume``: an earlier run's report; only its unfinished items run, and
        their results are merged into its results.
        """
        return prepare_map(self, func, iterable, options, resume, self._worker_setup, self._contexts)

    def run(self, func: Callable, iterable: Iterable | None = None, *, watch: Any = None,
            resume: RunReport | None = None, **options: Any) -> RunReport:
        """Map ``func`` over ``iterable``, wait, and return the RunReport.

        Worker print() output is written here, in item order. On failure the
        error is raised with ``.poolmap_report`` (results that finished stay).
        ``watch``: a live display (``attach(job)``, ``tick()``, ``close()``),
        fed by the map's events and drawn on this thread.
        """
        __tracebackhide__ = True
        return wait_for(self._submit(func, iterable, options, watch, resume, before=_waited), self.backend, watch)

    def map(self, func: Callable, iterable: Iterable | None = None, chunksize: int | None = None,
            **options: Any) -> list:
        """Results of ``func(x)`` for each item, in input order (multiprocessing's ``map``)."""
        __tracebackhide__ = True
        return mpcompat.run_map(self.run, func, iterable, chunksize, options)

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None, **options: Any) -> list:
        """Results of ``func(*args)`` for each tuple ``args`` (multiprocessing's ``starmap``)."""
        __tracebackhide__ = True
        return mpcompat.run_map(self.run, func, iterable, chunksize, options, star=True)

    def map_async(self, func: Callable, iterable: Iterable | None = None, chunksize: int | None = None,
                  callback: Callable | None = None, error_callback: Callable | None = None, *,
                  watch: Any = _NOT_GIVEN, resume: RunReport | None = None, **options: Any) -> MapHandle:
        """Start a map and return a MapHandle (an AsyncResult) at once.

        ``callback(results)`` or ``error_callback(error)`` runs when it ends,
        before ``ready()`` turns True. A stream ITERABLE is read by a feeder
        thread of its own (never by the pool's manager), which ends with the map.
        """
        # the magics pass watch= (None when quiet): poolmagic's policy for them
        own = watch is not _NOT_GIVEN or resume is not None
        mp_errors = mpcompat.async_policy(options, chunksize, own)
        handle = MapHandle(self, callback=callback, error_callback=error_callback, mp_errors=mp_errors)
        job = self._submit(func, iterable, options, None if watch is _NOT_GIVEN else watch, resume,
                           before=handle.attach)
        if job.source.is_stream:
            threading.Thread(target=job.wait, kwargs={"feed": True}, daemon=True, name="poolmagic-feeder").start()
        return handle

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback: Callable | None = None, error_callback: Callable | None = None,
                      **options: Any) -> MapHandle:
        """``map_async`` calling ``func(*args)`` for each tuple ``args``."""
        return self.map_async(func, iterable, chunksize, callback, error_callback, star=True, **options)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
             **options: Any) -> IMapIterator:
        """Results in input order, each as soon as it and those before it are done.

        Lazy: the ITERABLE is read as workers need items and results are not
        kept, so a stream of any length runs in bounded memory. An item's error
        is raised in its place, and the iteration goes on. ``chunksize``:
        items per chunk (default: poolmagic sizes chunks from measured times).
        """
        from .imap import start_imap  # loaded on first use: most maps are not imap's

        self._life.check_running()
        return start_imap(self._submit, func, iterable, chunksize, True, options, self.backend.cancel)

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                       **options: Any) -> IMapIterator:
        """As ``imap``, but each result as soon as it is done, in any order."""
        from .imap import start_imap

        self._life.check_running()
        return start_imap(self._submit, func, iterable, chunksize, False, options, self.backend.cancel)

    def apply(self, func: Callable, args: Iterable = (), kwds: dict | None = None) -> Any:
        """``func(*args, **kwds)`` in a worker; its result (multiprocessing's ``apply``)."""
        __tracebackhide__ = True
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict | None = None,
                    callback: Callable | None = None, error_callback: Callable | None = None) -> AsyncResult:
        """Start ``func(*args, **kwds)`` in a worker; an AsyncResult of its result (a MapHandle,
        unless the call cannot start: then its error comes from ``get``)."""
        self._life.check_running()
        handle = MapHandle(self, callback=callback, error_callback=error_callback, one=True)
        options: dict[str, Any] = {"star": True}
        try:  # args not iterable, kwds not a mapping: the call's own TypeError, from get() too
            call = [tuple(args)]
            if kwds:
                options["kwargs"] = dict(kwds)
            check_call(func, call[0], options.get("kwargs"))
            self._submit(func, call, options, before=handle.attach, remember=False)
        except (BadInputError, TypeError) as exc:  # the call's own error: reported by get(), as multiprocessing's
            return mpcompat.FailedCall(exc, error_callback, self._callbacks)
        return handle

    def _submit(self, func: Callable, iterable: Iterable | None, options: dict, watch: Any = None,
                resume: RunReport | None = None, before: Callable[[Job], None] | None = None,
                remember: bool = True) -> Job:
        """Check, build the Job, start it (maprun.py: observers attached, then the backend)."""
        self._life.check_running()
        job = self.prepare(func, iterable, resume=resume, **options)
        start(job, self.backend, self._life, watch, before, remember)
        return job


def _waited(job: Job) -> None:
    job.waited = True  # this thread waits for it at once (engine/core/caller.py: NUDGE_S)


_default: Pool | None = None
_default_lock = threading.Lock()


def get_pool() -> Pool:
    """The shared pool the magics use (created on first call, not started)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Pool()
            _default._life.make_shared()
        return _default


def shutdown_pool() -> None:
    """Shut the shared pool down; the next get_pool() makes a fresh one."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.shutdown()


def set_pool(pool: Pool) -> Pool:
    """Make ``pool`` the shared pool (the magics' and pmap's); the old one is shut down.

    The seam for other backends: ``set_pool(Pool(backend=SomeBackend(...)))``.
    """
    global _default
    with _default_lock:
        old, _default = _default, pool
    pool._life.make_shared()
    if old is not None and old is not pool:
        old.shutdown()
    return pool


def pmap(func: Callable, iterable: Iterable | None = None, **options: Any) -> list:
    """Map ``func`` over ``iterable`` on the shared warm pool; results in input order."""
    __tracebackhide__ = True
    return get_pool().run(func, iterable, **options).results


__all__ = ["Pool", "MapHandle", "AsyncResult", "get_pool", "set_pool", "shutdown_pool", "pmap", "PoolmapError", "BadInputError"]
