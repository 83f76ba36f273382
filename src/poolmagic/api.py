"""The plain Python API: what the magics call, usable from scripts and tests.

    from poolmagic import Pool, pmap
    squares = pmap(lambda x: x * x, range(10))          # the shared warm pool
    with Pool(4) as pool:
        report = pool.run(work, data, keep_going=True)  # RunReport: results, errors, timing

Every check that can fail on bad input runs here, before any work starts, so a
mistake is reported as one sentence naming the culprit.
"""
from __future__ import annotations

import functools
import threading
import time
import uuid
import warnings
import weakref
from typing import Any, Callable, Iterable

from .checks import (  # noqa: F401
    NoArgs,
    check_arity,
    check_not_text,
    check_plain_function,
    check_positive,
    check_star,
    too_many_workers,
)
from .cores import available_cores
from .engine.backends import make_backend
from .engine.base import Backend
from .engine.context import ContextCache
from .engine.core.transport import NATIVE_THREAD_LIMIT, OWN_PROCESS, WORKER_SETUP
from .engine.core.events import MapFinished
from .engine.core.items import SEQUENCES, ItemSource
from .engine.core.job import Job, write_outputs
from .engine.mapoptions import MapOptions
from .errors import (
    BadInputError,
    MapFailedError,
    PoolmapError,
    SerializationError,
    add_note,
    point_at_function,
)
from . import mpcompat
from .longrun import Checkpoint, SeenItems, resume_report
from .mpcompat import CLOSE, RUN, TERMINATE, AsyncResult
from .report import FAILED_KEPT, RunReport
from .serialize import callable_name, describe, dump_function, undefined_globals


_NOT_GIVEN: Any = object()


class MapHandle(AsyncResult):
    """A map running in the background (``map_async``, ``%%poolmap --async``).

    Also multiprocessing's AsyncResult: ``get(timeout)``, ``wait``, ``ready``,
    ``successful``, and the ``callback``/``error_callback`` given to ``map_async``.
    """

    def __init__(self, pool: "Pool", job: Job | None = None, **result_options: Any):
        super().__init__(callbacks=pool._callbacks, **result_options)
        self._pool = pool
        self._on_done: list[Callable[[], None]] = []  # called once, by the first wait()/get() that sees the end
        if job is not None:
            self.attach(job)

    @property
    def report(self) -> RunReport:
        return self._job.report

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True when the map has finished."""
        done = super().wait(timeout)
        while done and self._on_done:  # e.g. the notebook card redrawn in its final state, from this cell
            self._on_done.pop(0)()
        return done

    def _deliver(self) -> None:
        if not getattr(self, "_printed", False):
            super()._deliver()
            Pool._finish_checkpoint(self._job)

    def cancel(self) -> None:
        """Stop the map now; results that finished stay in ``.report.results``."""
        if not self.ready():
            self._pool.backend.cancel(self._job)

    def __repr__(self) -> str:
        return f"<MapHandle {self.report.summary()}>"

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return self.report._repr_mimebundle_()


class Pool:
    """A warm pool of worker processes that maps notebook-defined functions.

    Its methods are the API itself (lifecycle, mapping, settings); each is a
    few lines over the backend and the Job.
    """

    _state = RUN  # multiprocessing's: RUN, then CLOSE or TERMINATE (then work is refused)
    _shared = False  # the magics' and pmap's pool (get_pool): user code may not close it

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
        if processes is not None and workers is not None and processes != workers:
            raise BadInputError("give processes or workers, not both")
        workers = workers if workers is not None else processes
        if isinstance(workers, int) and not isinstance(workers, bool) and workers < 1:
            raise BadInputError("Number of processes must be at least 1")
        check_positive("workers", workers)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None:
            check_positive("maxtasksperchild", maxtasksperchild)
        start_method = mpcompat.start_method_of(context, start_method)
        self.cores = available_cores()
        self.backend: Backend = make_backend(backend, workers or self.cores, start_method, address, dashboard)
        self._warn_size(workers)
        self._setup = (initializer, tuple(initargs), maxtasksperchild) if initializer or maxtasksperchild else None
        if self._setup is not None and WORKER_SETUP in self.backend.lacks:
            self.backend.shutdown()
            raise BadInputError(f"initializer= and maxtasksperchild= cannot work on the {backend} backend: "
                                f"{self.backend.lacks[WORKER_SETUP]}")
        self._token = uuid.uuid4().hex
        self._callbacks = mpcompat.Callbacks()
        self._live: set[Job] = set()  # maps not finished yet (join waits for them)
        self._live_lock = threading.Lock()
        self._last: Any = None  # (report, job), or weak references to them (see last_report)
        self.threads: int | None = None  # native threads per worker; None: cores ÷ workers
        self.max_memory: int | None = None  # bytes per worker, for maps that set none
        self.serial_item_s: dict[str, float] = {}  # function version -> one worker's s/item (--tune)
        self._contexts = ContextCache()
        self._state = RUN

    # The last map, for _poolmap and --tune. The shared pool keeps it; a pool of
    # your own keeps it only while you do (multiprocessing keeps nothing: a
    # long-lived pool must not hold the inputs and results of its last map).
    @property
    def last_report(self) -> RunReport | None:
        return self._last_get(0)

    @last_report.setter
    def last_report(self, report: RunReport | None) -> None:
        self._last_set(0, report)

    @property
    def last_job(self) -> Job | None:
        return self._last_get(1)

    @last_job.setter
    def last_job(self, job: Job | None) -> None:
        self._last_set(1, job)

    def _last_get(self, k: int) -> Any:
        ref = (self._last or (None, None))[k]
        return ref() if isinstance(ref, weakref.ref) else ref

    def _last_set(self, k: int, value: Any) -> None:
        pair = list(self._last or (None, None))
        pair[k] = value if value is None or self._shared else weakref.ref(value)
        self._last = tuple(pair)

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
        self._state = TERMINATE
        self._callbacks.stop()
        self.backend.shutdown()

    def close(self) -> None:
        """Refuse new work; the maps running go on (``join`` waits for them)."""
        self._not_shared("close")
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self) -> None:
        """Stop every worker now; running maps end cancelled."""
        self._not_shared("terminate")
        self._state = TERMINATE
        self.shutdown()
        for job in self._live_jobs():  # a map the backend had not taken up yet ends too
            job.stop()

    def join(self, timeout: float | None = None) -> None:
        """After ``close`` or ``terminate``: wait for the running maps, then stop the workers."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self._live_jobs():
            job.finished.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.shutdown()

    def _live_jobs(self) -> list[Job]:
        with self._live_lock:
            return list(self._live)

    def _not_shared(self, what: str) -> None:
        if self._shared:
            raise BadInputError(
                f"this is poolmagic's shared pool (the magics' and pmap's): it cannot {what}. Stop it with "
                f"poolmagic.shutdown_pool() (the next use starts a fresh one), or make a pool of your own: "
                f"poolmagic.Pool()"
            )

    @property
    def _processes(self) -> int:
        """multiprocessing's name for the pool's size."""
        return self.size

    def __enter__(self) -> "Pool":
        self._not_shared("be used in a with block")
        mpcompat.check_running(self._state)
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self, _warn: Callable = warnings.warn) -> None:
        if self.__dict__.get("_state") == RUN and not self._shared:
            _warn(f"unclosed running multiprocessing pool {self!r}: call close() and join(), or use "
                  f"'with Pool() as pool:'", ResourceWarning, source=self)

    def __repr__(self) -> str:
        return f"<poolmagic.Pool state={self._state} workers={self.__dict__.get('backend') and self.size}>"

    def status(self) -> str:
        from .display import status_text

        text = status_text(self.size, self.backend.description, self.cores, self.threads_per_worker(),
                           self.backend.state, self.max_memory)
        detail = self.backend.status_detail()  # e.g. a dask cluster's scheduler and dashboard
        return f"{text}\n{detail}" if detail is not None else text

    # ------------------------------------------------------------ mapping
    def prepare(self, func: Callable, iterable: Iterable | None, *, resume: RunReport | None = None,
                **options: Any) -> Job:
        """Check everything and build the Job; raises BadInputError before any work.

        ``resume``: an earlier run's report; only its unfinished items run, and
        their results are merged into its results.
        """
        o = MapOptions.from_kwargs(options)
        from_pool = frozenset()
        if o.max_memory is None and self.max_memory is not None:
            o = o.with_(max_memory=self.max_memory)
            from_pool = frozenset({"max_memory"})
        # what this backend lacks (threads: --timeout, --max-memory; a remote cluster: --max-memory)
        self.backend.check_options(o, from_pool)
        if not callable(func):
            raise BadInputError(f"the function to map is {describe(func)}, which is not callable")
        name = callable_name(func)
        check_plain_function(func, name)
        if not o.star:
            check_arity(func, name, repeat=o.repeat is not None, kwargs=o.kwargs)
        if o.repeat is not None:
            if iterable is not None:
                raise BadInputError("give either an ITERABLE or repeat=N, not both")
            iterable = range(o.repeat)
        missing = undefined_globals(func)
        if missing:
            fn, var = missing[0]
            raise BadInputError(f"{fn}() uses the name {var!r}, which is not defined")
        unwrapped = func
        if o.kwargs:
            func = functools.partial(func, **o.kwargs)
        if o.repeat is not None:
            func = NoArgs(func)
        try:
            iter(iterable)  # type: ignore[arg-type]
        except TypeError:
            raise BadInputError(f"ITERABLE is {describe(iterable)}, which is not iterable") from None
        check_not_text(iterable)
        if o.star:
            iterable = check_star(iterable, unwrapped, name, o.kwargs)
        shipped, notes = self.backend.prepare_function(func, iterable, o.star)  # a remote cluster's checks
        if self._setup is not None:
            shipped = mpcompat.WorkerSetup(shipped, self._token, *self._setup)
        try:
            payload = dump_function(shipped)
        except SerializationError:
            if shipped is not func:
                dump_function(func)  # the function itself cannot be pickled: that error names the culprit
            raise
        workers = o.workers or self.size
        threads = o.threads or self.threads_per_worker(workers)
        context = self._contexts.get(threads)
        report = RunReport(func_name=name, cores=self.cores, pool_size=workers, backend=self.backend.description,
                           threads=threads, serial_item_s=self.serial_item_s.get(payload.key))
        report.notes.extend(notes)
        index, checkpoint = None, None
        if resume is not None and o.checkpoint:  # either would decide which items run; both: no file was written
            raise BadInputError(
                "--resume and --checkpoint (resume= and checkpoint=) cannot be used together: --checkpoint "
                "PATH resumes by itself from what PATH recorded; run the map again with only --checkpoint "
                "to continue it, or only --resume to re-run an earlier map's missing items")
        if resume is not None:
            earlier, index, iterable = resume_report(resume, iterable)
        elif o.checkpoint:
            checkpoint = Checkpoint(o.checkpoint)
            earlier, index, iterable = checkpoint.load(iterable, name, payload.key)
        if index is not None:
            for f in ("items", "results", "errors", "done", "resumed", "identity"):
                setattr(report, f, getattr(earlier, f))
            if checkpoint is not None and checkpoint.function_changed:
                report.notes.append(f"the function changed since {o.checkpoint} was written; "
                                    f"{earlier.done:,} results of its earlier version were kept")
        if checkpoint is not None:
            report.notes.extend(checkpoint.notes)
        job = Job(payload, ItemSource(iterable), report, o, context, func)
        job.index = index
        job.checkpoint = checkpoint
        if index is None and type(iterable) in SEQUENCES:
            report.replay = (func, o, iterable)
        elif index is not None:
            report.replay = (func, o, None)
            report.failed_items.update(zip(index, iterable) if len(index) <= FAILED_KEPT else ())
        else:
            report.replay = (func, o, None)
        return job

    def run(self, func: Callable, iterable: Iterable | None = None, *, watch: Any = None,
            resume: RunReport | None = None, **options: Any) -> RunReport:
        """Map ``func`` over ``iterable``, wait, and return the RunReport.

        Worker print() output is written here, in item order. On failure the
        error is raised with ``.poolmap_report`` (results that finished stay).
        ``watch``: a live display (``attach(job)``, ``tick()``, ``close()``),
        fed by the map's events and drawn on this thread.
        """
        __tracebackhide__ = True
        job = self._submit(func, iterable, options, watch, resume, before=_waited)
        try:
            job.wait(on_output=write_outputs, on_tick=watch.tick if watch is not None else None)
        except BaseException as exc:  # KeyboardInterrupt while waiting or reading the ITERABLE
            self.backend.cancel(job)
            write_outputs(job.take_printable(final=True))
            self._finish_checkpoint(job)
            if watch is not None:
                watch.close()
            if not isinstance(exc, KeyboardInterrupt):
                raise
            r = job.report
            stop = KeyboardInterrupt()
            add_note(
                stop,
                f"poolmagic: interrupted; the running items were stopped and {r.done} of "
                f"{r.items if r.items is not None else '?'} results kept (_poolmap.results).",
            )
            stop.poolmap_report = r  # type: ignore[attr-defined]
            raise point_at_function(stop, job.func) from None
        if watch is not None:
            watch.close()
        self._finish_checkpoint(job)
        if job.error is not None:
            raise job.error
        return job.report

    # Called with multiprocessing's arguments only, map/starmap/map_async/
    # starmap_async behave as multiprocessing's: every item runs and the first
    # failed item's error (in input order) is raised at the end. With any of
    # poolmagic's options, poolmagic's policy: stop at the first failure (or,
    # keep_going=True, run all and raise one MapFailedError). run() and pmap()
    # always use poolmagic's.
    def map(self, func: Callable, iterable: Iterable | None = None, chunksize: int | None = None,
            **options: Any) -> list:
        """Results of ``func(x)`` for each item, in input order (multiprocessing's ``map``)."""
        __tracebackhide__ = True
        return self._map(func, iterable, chunksize, options)

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None, **options: Any) -> list:
        """Results of ``func(*args)`` for each tuple ``args`` (multiprocessing's ``starmap``)."""
        __tracebackhide__ = True
        return self._map(func, iterable, chunksize, options, star=True)

    def _map(self, func: Callable, iterable: Iterable | None, chunksize: int | None, options: dict,
             star: bool = False) -> list:
        __tracebackhide__ = True
        mp_style = not options
        if chunksize is not None:
            options["chunksize"] = chunksize
        if star:
            options["star"] = True
        if not mp_style:
            return self.run(func, iterable, **options).results
        try:
            return self.run(func, iterable, keep_going=True, **options).results
        except MapFailedError as exc:
            raise mpcompat.first_item_error(exc, exc.report) from None

    def map_async(self, func: Callable, iterable: Iterable | None = None, chunksize: int | None = None,
                  callback: Callable | None = None, error_callback: Callable | None = None, *,
                  watch: Any = _NOT_GIVEN, resume: RunReport | None = None, **options: Any) -> MapHandle:
        """Start a map and return a MapHandle (an AsyncResult) at once.

        ``callback(results)`` or ``error_callback(error)`` runs when it ends,
        before ``ready()`` turns True. A stream ITERABLE is read by a feeder
        thread of its own (never by the pool's manager), which ends with the map.
        """
        # the magics pass watch= (None when quiet): poolmagic's policy for them
        mp_errors = not (set(options) - {"star"}) and watch is _NOT_GIVEN and resume is None
        watch = None if watch is _NOT_GIVEN else watch
        if chunksize is not None:
            options["chunksize"] = chunksize
        if mp_errors:
            options["keep_going"] = True
        handle = MapHandle(self, callback=callback, error_callback=error_callback, mp_errors=mp_errors)
        job = self._submit(func, iterable, options, watch, resume, before=handle.attach)
        if job.source.is_stream:
            threading.Thread(target=job.wait, kwargs={"feed": True}, daemon=True, name="poolmagic-feeder").start()
        return handle

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback: Callable | None = None, error_callback: Callable | None = None,
                      **options: Any) -> MapHandle:
        """``map_async`` calling ``func(*args)`` for each tuple ``args``."""
        return self.map_async(func, iterable, chunksize, callback, error_callback, star=True, **options)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
             **options: Any) -> mpcompat.IMapIterator:
        """Results in input order, each as soon as it and those before it are done.

        Lazy: the ITERABLE is read as workers need items and results are not
        kept, so a stream of any length runs in bounded memory. An item's error
        is raised in its place, and the iteration goes on. ``chunksize``:
        items per chunk (default: poolmagic sizes chunks from measured times).
        """
        return self._imap(func, iterable, chunksize, True, options)

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                       **options: Any) -> mpcompat.IMapIterator:
        """As ``imap``, but each result as soon as it is done, in any order."""
        return self._imap(func, iterable, chunksize, False, options)

    def _imap(self, func: Callable, iterable: Iterable, chunksize: int | None, ordered: bool,
              options: dict) -> mpcompat.IMapIterator:
        mpcompat.check_running(self._state)
        guard = None
        if type(iterable) not in SEQUENCES:
            try:
                guard = mpcompat.Guarded(iterable, chunksize or 1)
            except TypeError:
                raise BadInputError(f"ITERABLE is {describe(iterable)}, which is not iterable") from None
        if chunksize is not None:
            options["chunksize"] = chunksize
        options.setdefault("keep_going", True)
        it = mpcompat.IMapIterator(ordered, guard)
        job = self._submit(func, iterable if guard is None else guard, options, before=it.attach, remember=False)
        if job.source.is_stream:
            threading.Thread(target=it.feed, daemon=True, name="poolmagic-feeder").start()
        return it

    def apply(self, func: Callable, args: Iterable = (), kwds: dict | None = None) -> Any:
        """``func(*args, **kwds)`` in a worker; its result (multiprocessing's ``apply``)."""
        __tracebackhide__ = True
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict | None = None,
                    callback: Callable | None = None, error_callback: Callable | None = None) -> MapHandle:
        """Start ``func(*args, **kwds)`` in a worker; an AsyncResult of its result."""
        options: dict[str, Any] = {"star": True}
        if kwds:
            options["kwargs"] = dict(kwds)
        handle = MapHandle(self, callback=callback, error_callback=error_callback, one=True)
        self._submit(func, [tuple(args)], options, before=handle.attach, remember=False)
        return handle

    @staticmethod
    def _finish_checkpoint(job: Job) -> None:
        """Return only once the checkpoint holds every finished result."""
        if isinstance(job.report.identity, SeenItems):
            job.report.identity.settle()
        ck = getattr(job, "checkpoint", None)
        if ck is not None:
            err = ck.wait()
            if err is not None:
                job.report.notes.append(f"the checkpoint {ck.path} could not be written: {err}")

    def _submit(self, func: Callable, iterable: Iterable | None, options: dict, watch: Any = None,
                resume: RunReport | None = None, before: Callable[[Job], None] | None = None,
                remember: bool = True) -> Job:
        """Check, remember as the last map (``_poolmap``, ``--tune``), attach observers, start."""
        mpcompat.check_running(self._state)
        job = self.prepare(func, iterable, resume=resume, **options)
        if remember:
            self.last_report, self.last_job = job.report, job
        if watch is not None:
            watch.attach(job)
        if before is not None:
            before(job)
        with self._live_lock:
            self._live.add(job)
        job.observers.append(functools.partial(self._forget, job))
        if job.checkpoint is not None:  # attached as the map starts: a job only prepared holds no file
            job.checkpoint.attach(job)
        SeenItems(job)  # the items' identities, for a later --resume
        self.backend.submit(job)
        return job

    def _forget(self, job: Job, event: Any) -> None:
        if type(event) is MapFinished:
            with self._live_lock:
                self._live.discard(job)



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
            _default._shared = True
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
    pool._shared = True
    pool._last = tuple(r() if isinstance(r, weakref.ref) else r for r in (pool._last or (None, None)))
    if old is not None and old is not pool:
        old.shutdown()
    return pool


def pmap(func: Callable, iterable: Iterable | None = None, **options: Any) -> list:
    """Map ``func`` over ``iterable`` on the shared warm pool; results in input order."""
    __tracebackhide__ = True
    return get_pool().run(func, iterable, **options).results


__all__ = ["Pool", "MapHandle", "AsyncResult", "get_pool", "set_pool", "shutdown_pool", "pmap", "PoolmapError", "BadInputError"]
