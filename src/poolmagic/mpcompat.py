"""multiprocessing.Pool's surface on poolmagic's engine.

``poolmagic.Pool`` (api.py) delegates here for what only the standard
library's interface needs: the pool's RUN/CLOSE/TERMINATE state, AsyncResult
(``map_async``, ``apply_async``) with its callbacks, the error multiprocessing
would raise, the ``initializer`` run once per worker process, and
``maxtasksperchild``. The lazy ``imap`` iterators are in imap.py. Each is a
thin layer over one Job and its events.
"""
from __future__ import annotations

import builtins
import multiprocessing
import queue
import threading
import traceback
from multiprocessing.pool import CLOSE, RUN, TERMINATE, RemoteTraceback
from typing import Any, Callable

from .engine.core.events import MapFinished
from .engine.core.rules import attach_report, write_outputs
from .checks import check_positive
from .errors import BadArgumentsError, BadInputError, MapCancelledError, MapFailedError, PoolmapError, add_note

__all__ = ["RUN", "CLOSE", "TERMINATE", "TimeoutError", "AsyncResult", "RemoteTraceback"]


class TimeoutError(multiprocessing.TimeoutError, builtins.TimeoutError):  # noqa: A001
    """``get(timeout)`` ran out: both multiprocessing's TimeoutError and the builtin one."""


def pool_arguments(processes: int | None, workers: int | None, initializer: Callable | None,
                   maxtasksperchild: int | None, context: Any, start_method: str | None) -> tuple[int | None, str | None]:
    """``multiprocessing.Pool``'s arguments checked as it checks them: (workers, start method)."""
    if isinstance(processes, bool):
        processes = int(processes)  # multiprocessing's Pool(True) has one worker (a bool is an int)
    if processes is not None and not isinstance(processes, int):  # as multiprocessing's: a TypeError
        raise BadArgumentsError(f"processes must be a whole number, not {processes!r}")
    if processes is not None and workers is not None and processes != workers:
        raise BadInputError("give processes or workers, not both")
    workers = workers if workers is not None else processes
    if isinstance(workers, int) and not isinstance(workers, bool) and workers < 1:
        raise BadInputError("Number of processes must be at least 1")
    check_positive("workers", workers)
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if maxtasksperchild is not None:
        check_positive("maxtasksperchild", int(maxtasksperchild) if isinstance(maxtasksperchild, bool)
                       else maxtasksperchild)
    return workers, start_method_of(context, start_method)


def start_method_of(context: Any, start_method: str | None) -> str | None:
    """The start method a ``multiprocessing`` context asks for; poolmagic never forks."""
    if context is None:
        return start_method
    if start_method is not None:
        raise BadInputError("give context or start_method, not both")
    method = context if isinstance(context, str) else getattr(context, "get_start_method", lambda: None)()
    if method not in ("fork", "spawn", "forkserver"):
        raise BadInputError(f"context must be a multiprocessing context, not {context!r}")
    if method == "fork":
        import warnings

        warnings.warn("poolmagic does not fork (unsafe in a threaded process such as a kernel): "
                      "it uses its default start method instead", RuntimeWarning, stacklevel=5)
        return None
    return method


class PoolNotRunningError(PoolmapError, ValueError):
    """Work given to a pool after close(), terminate() or shutdown() (multiprocessing raises ValueError)."""


def check_running(state: str) -> None:
    if state != RUN:
        how = "closed" if state == CLOSE else "shut down (terminate, shutdown or the end of its with block)"
        raise PoolNotRunningError(f"Pool not running: it was {how}; make a new Pool")


class Callbacks:
    """Runs AsyncResult callbacks in order on one thread of their own.

    The standard library runs them on its result thread; here the manager
    thread must never wait on user code, so they are handed over.
    """

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="poolmagic-callbacks")
                self._thread.start()
        self._q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            fn()

    def stop(self, timeout: float | None = 5) -> None:
        """End the thread after the callbacks queued so far, waiting up to ``timeout`` seconds
        for them (None: until they ran, as ``join`` does); forget it, so that it can be collected."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._q.put(None)
            if thread is not threading.current_thread():
                thread.join(timeout)


# ---------------------------------------------------------------- results


def first_item_error(err: BaseException | None, report: Any) -> BaseException | None:
    """The error multiprocessing would raise: the first failed item's own (input order)."""
    if isinstance(err, MapFailedError) and report.errors:
        first = report.errors[min(report.errors)]
        if len(report.errors) > 1 and not getattr(first, "_poolmagic_first", False):
            add_note(first, f"poolmagic: {len(report.errors)} items failed; this is the first, every error is "
                            f"in .poolmap_report.errors.")
        first._poolmagic_first = True  # type: ignore[attr-defined]
        attach_report(first, report)
        return _remote_cause(first)
    return err


# Called with multiprocessing's arguments only, map/starmap/map_async/
# starmap_async behave as multiprocessing's: every item runs and the first
# failed item's error (in input order) is raised at the end. With any of
# poolmagic's options, poolmagic's policy: stop at the first failure (or,
# keep_going=True, run all and raise one MapFailedError). run() and pmap()
# always use poolmagic's.
def run_map(run: Callable[..., Any], func: Callable, iterable: Any, chunksize: int | None, options: dict,
            star: bool = False) -> list:
    """``map``/``starmap`` with ``run`` (the pool's): the results, under the policy its arguments ask for."""
    __tracebackhide__ = True
    mp_style = not options
    if chunksize is not None:
        options["chunksize"] = chunksize
    if star:
        options["star"] = True
    if not mp_style:
        return run(func, iterable, **options).results
    try:
        return run(func, iterable, keep_going=True, **options).results
    except MapFailedError as exc:
        first = first_item_error(exc, exc.report)
        raise first from first.__cause__  # (its worker traceback, not the MapFailedError)


def async_policy(options: dict, chunksize: int | None, poolmagic_call: bool) -> bool:
    """``map_async``'s options, under the policy its arguments ask for (as ``run_map``'s);
    True: multiprocessing's errors (``poolmagic_call``: watch= or resume= was given)."""
    mp_errors = not (set(options) - {"star"}) and not poolmagic_call
    if chunksize is not None:
        options["chunksize"] = chunksize
    if mp_errors:
        options["keep_going"] = True
    return mp_errors


def _remote_cause(exc: BaseException, kind: type[Exception] = RemoteTraceback) -> BaseException:
    """Chain the worker's traceback text as multiprocessing does (``__cause__``); ``kind``:
    concurrent.futures' own class for the Executor. Not on poolmagic's own errors (a crashed
    worker, a value that does not pickle): those are made in this process."""
    if exc.__cause__ is None and exc.__traceback__ is not None and not isinstance(exc, PoolmapError):
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        exc.__cause__ = kind(text)
    return exc


class AsyncResult:
    """The result of ``map_async``/``apply_async``: multiprocessing's AsyncResult.

    ``ready()`` turns True only after the callback has run, as in the
    standard library. ``get`` raises the map's error; ``mp_errors`` makes it
    the first failed item's own error (multiprocessing's rule).
    """

    def __init__(self, callback: Callable | None = None, error_callback: Callable | None = None,
                 callbacks: Callbacks | None = None, one: bool = False, mp_errors: bool = False):
        for name, cb in (("callback", callback), ("error_callback", error_callback)):
            if cb is not None and not callable(cb):
                raise BadInputError(f"{name} must be callable, not {cb!r}")
        self._callback, self._error_callback = callback, error_callback
        self._callbacks = callbacks
        self._one, self._mp_errors = one, mp_errors
        self._event = threading.Event()
        self._job: Any = None

    def attach(self, job: Any) -> None:
        """Observe ``job`` (before it is submitted: it may finish at once)."""
        self._job = job
        job.observers.append(self._observe)

    def _observe(self, event: Any) -> None:
        if type(event) is MapFinished:
            if (self._callback or self._error_callback) and self._callbacks is not None:
                self._callbacks.put(self._finish)
            else:
                self._finish()

    def _finish(self) -> None:
        try:
            err = self._error()
            if err is None and self._callback is not None:
                self._callback(self._value())
            elif err is not None and self._error_callback is not None:
                self._error_callback(err)
        except Exception:  # a callback that raises: multiprocessing's thread would die; ours reports it
            traceback.print_exc()
        finally:
            self._event.set()

    def _error(self) -> BaseException | None:
        job = self._job
        r = job.report
        if r.status == "cancelled" or (job.error is not None and isinstance(job.error, KeyboardInterrupt)):
            err = MapCancelledError(
                f"the map was cancelled; {r.done} of {r.items if r.items is not None else '?'} "
                f"results finished and are kept in .report.results"
            )
            err.report = r  # type: ignore[attr-defined]
            return err
        err = first_item_error(job.error, r) if self._mp_errors else job.error
        if err is not None and self._one:
            _remote_cause(err)
        return err

    def _value(self) -> Any:
        results = self._job.report.results
        return results[0] if self._one else results

    def ready(self) -> bool:
        """True once the work has finished, failed or been cancelled (and the callback ran)."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether it finished without an error; ValueError while it runs."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error() is None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True when finished."""
        return self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result (a list for a map); raises its error, or TimeoutError."""
        __tracebackhide__ = True
        if not self.wait(timeout):
            raise TimeoutError(f"the map is still running after {timeout} s ({self._job.report.summary()})")
        self._deliver()
        err = self._error()
        if err is not None:
            raise err
        return self._value()

    def _deliver(self) -> None:
        """Hook: what a finished map hands over once (its workers' printed output)."""
        job = self._job
        if not getattr(self, "_printed", False):
            self._printed = True
            write_outputs(job.take_printable(final=True))


class FailedCall(AsyncResult):
    """``apply_async`` of a call that cannot start (not callable, wrong arguments, does not
    pickle): ready at once, its error given to ``error_callback`` and raised by ``get``, as
    multiprocessing reports it (not raised by ``apply_async`` itself)."""

    def __init__(self, error: BaseException, error_callback: Callable | None, callbacks: Callbacks):
        super().__init__(error_callback=error_callback, callbacks=callbacks, one=True)
        self._failed = error
        if error_callback is not None:
            callbacks.put(self._finish)
        else:
            self._finish()

    def _error(self) -> BaseException | None:
        return self._failed

    def _deliver(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<AsyncResult failed: {self._failed!r}>"


# ---------------------------------------------------------------- per-worker setup

_TASKS: dict[str, int] = {}  # pool token -> tasks this worker process ran for that pool


class WorkerSetup:
    """The mapped function, wrapped to run the pool's ``initializer`` once per
    worker process (again in a replacement) and to retire a worker after
    ``maxtasksperchild`` items (after the chunk it is running)."""

    def __init__(self, func: Callable, token: str, initializer: Callable | None, initargs: tuple,
                 maxtasks: int | None):
        self.func, self.token = func, token
        self.initializer, self.initargs, self.maxtasks = initializer, initargs, maxtasks
        self.__wrapped__ = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        n = _TASKS.get(self.token)
        if n is None:
            if self.initializer is not None:
                self.initializer(*self.initargs)
            n = 0
        _TASKS[self.token] = n + 1
        try:
            return self.func(*args, **kwargs)
        finally:
            if self.maxtasks is not None and n + 1 >= self.maxtasks:
                from .engine import worker

                worker.RETIRE = "maxtasksperchild"
