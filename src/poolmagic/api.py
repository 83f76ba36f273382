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
import warnings
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
from .engine.items import SEQUENCES, ItemSource
from .engine.job import Job, write_outputs
from .engine.mapoptions import MapOptions
from .errors import (
    BadInputError,
    MapCancelledError,
    PoolmapError,
    SerializationError,
    add_note,
    point_at_function,
)
from .longrun import Checkpoint, SeenItems, resume_report
from .report import FAILED_KEPT, RunReport
from .serialize import callable_name, describe, dump_function, undefined_globals


class MapHandle:
    """A map running in the background (``map_async``, ``%%poolmap --async``)."""

    def __init__(self, pool: "Pool", job: Job):
        self._pool = pool
        self._job = job
        self._printed = False

    @property
    def report(self) -> RunReport:
        return self._job.report

    def ready(self) -> bool:
        """True once every item has finished, failed or been cancelled."""
        return self._job.finished.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError("the map is still running")
        return self._job.error is None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True when the map has finished."""
        return self._job.wait(timeout, feed=False)

    def get(self, timeout: float | None = None) -> list:
        """Results in input order; raises the map's error as a blocking map would."""
        __tracebackhide__ = True
        if not self.wait(timeout):
            raise TimeoutError(f"the map is still running after {timeout} s ({self.report.summary()})")
        if not self._printed:
            self._printed = True
            write_outputs(self._job.take_printable(final=True))
            Pool._finish_checkpoint(self._job)
        r = self.report
        if r.status == "cancelled":
            err = MapCancelledError(
                f"the map was cancelled; {r.done} of {r.items if r.items is not None else '?'} "
                f"results finished and are kept in .report.results"
            )
            err.report = r
            raise err
        if self._job.error is not None:
            raise self._job.error
        return r.results

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

    def __init__(self, workers: int | None = None, *, start_method: str | None = None,
                 backend: Backend | str | None = None, address: str | None = None, dashboard: bool = False):
        """``backend``: "local" (default), "dask" (a LocalCluster, or the cluster at
        ``address``, e.g. "tcp://host:8786"), or a Backend instance. ``dashboard``:
        a LocalCluster serves dask's dashboard (127.0.0.1, no password; off by default)."""
        check_positive("workers", workers)
        self.cores = available_cores()
        self._warn_size(workers)
        self.backend: Backend = make_backend(backend, workers or self.cores, start_method, address, dashboard)
        self.last_report: RunReport | None = None
        self.last_job: Job | None = None
        self.threads: int | None = None  # native threads per worker; None: cores ÷ workers
        self.max_memory: int | None = None  # bytes per worker, for maps that set none
        self.serial_item_s: dict[str, float] = {}  # function version -> one worker's s/item (--tune)
        self._contexts = ContextCache()

    def _warn_size(self, workers: int | None) -> None:
        msg = too_many_workers(workers or 0, self.cores)
        if msg:
            warnings.warn(msg, stacklevel=3)

    def threads_per_worker(self, workers: int | None = None) -> int:
        """Native threads (BLAS, OpenMP) each worker may use: set, or cores ÷ workers."""
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
        """Stop every worker now."""
        self.backend.shutdown()

    def __enter__(self) -> "Pool":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def status(self) -> str:
        from .display import status_text

        text = status_text(self.size, self.backend.description, self.cores, self.threads_per_worker(),
                           self.backend.state, self.max_memory)
        detail = getattr(self.backend, "status_detail", None)  # e.g. a dask cluster's scheduler and dashboard
        return f"{text}\n{detail()}" if detail is not None else text

    # ------------------------------------------------------------ mapping
    def prepare(self, func: Callable, iterable: Iterable | None, *, resume: RunReport | None = None,
                **options: Any) -> Job:
        """Check everything and build the Job; raises BadInputError before any work.

        ``resume``: an earlier run's report; only its unfinished items run, and
        their results are merged into its results.
        """
        o = MapOptions.from_kwargs(options)
        if o.max_memory is None and self.max_memory is not None:
            o = o.with_(max_memory=self.max_memory)
        if o.max_memory is not None and not self.backend.limits_memory:
            raise BadInputError(
                f"--max-memory reads each worker's memory on this machine: it works on the local backend "
                f"and on a dask LocalCluster that poolmagic started, not on the {self.backend.description}. "
                f"Give that cluster's workers a limit of their own (dask worker --memory-limit)"
                + (", and clear the pool's (%poolsize --max-memory off)" if options.get("max_memory") is None else "")
            )
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
        job = self._submit(func, iterable, options, watch, resume)
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

    def map(self, func: Callable, iterable: Iterable | None = None, **options: Any) -> list:
        """Like ``run`` but returns the list of results in input order."""
        __tracebackhide__ = True
        return self.run(func, iterable, **options).results

    def starmap(self, func: Callable, iterable: Iterable, **options: Any) -> list:
        __tracebackhide__ = True
        return self.run(func, iterable, star=True, **options).results

    def map_async(self, func: Callable, iterable: Iterable | None = None, *, watch: Any = None,
                  resume: RunReport | None = None, **options: Any) -> MapHandle:
        """Start a map and return a MapHandle at once.

        A stream ITERABLE is read by a feeder thread of its own (never by the
        pool's manager), which ends with the map.
        """
        job = self._submit(func, iterable, options, watch, resume)
        if job.source.is_stream:
            threading.Thread(target=job.wait, kwargs={"feed": True}, daemon=True, name="poolmagic-feeder").start()
        return MapHandle(self, job)

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
                resume: RunReport | None = None) -> Job:
        """Check, remember as the last map (``_poolmap``, ``--tune``), attach observers, start."""
        job = self.prepare(func, iterable, resume=resume, **options)
        self.last_report, self.last_job = job.report, job
        if watch is not None:
            watch.attach(job)
        if job.checkpoint is not None:  # attached as the map starts: a job only prepared holds no file
            job.checkpoint.attach(job)
        SeenItems(job)  # the items' identities, for a later --resume
        self.backend.submit(job)
        return job


_default: Pool | None = None
_default_lock = threading.Lock()


def get_pool() -> Pool:
    """The shared pool the magics use (created on first call, not started)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Pool()
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
    if old is not None and old is not pool:
        old.shutdown()
    return pool


def pmap(func: Callable, iterable: Iterable | None = None, **options: Any) -> list:
    """Map ``func`` over ``iterable`` on the shared warm pool; results in input order."""
    __tracebackhide__ = True
    return get_pool().map(func, iterable, **options)


__all__ = ["Pool", "MapHandle", "get_pool", "set_pool", "shutdown_pool", "pmap", "PoolmapError", "BadInputError"]
