"""poolmagic.Executor: the ``concurrent.futures.Executor`` interface on poolmagic's engine.

    from poolmagic import Executor
    with Executor(4) as ex:
        futures = [ex.submit(work, x) for x in data]      # real concurrent.futures.Future
        for f in as_completed(futures): ...
        results = list(ex.map(work, data, timeout=60))     # lazy, results in order

Each ``submit`` is a one-item map of its own; ``map`` is one streaming map
(``Pool.imap``). Functions defined in a notebook or ``__main__`` work under the
safe start methods, a crashed worker fails the future that ran there (with
an error naming it) instead of breaking the executor, and any backend
(``backend="dask"``) runs it.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from concurrent.futures.process import _RemoteTraceback
from typing import Any, Callable, Iterable, Iterator

from .api import Pool
from .engine.base import Backend
from .engine.core.events import ChunkStarted, MapFinished
from .checks import check_call
from .errors import BadArgumentsError, BadInputError
from .mpcompat import TimeoutError as PoolTimeoutError, _remote_cause


class Executor(futures.Executor):
    """A pool of worker processes behind ``concurrent.futures``' interface.

    The arguments of ``ProcessPoolExecutor`` (``max_workers``, ``mp_context``
    for its start method, ``initializer``/``initargs``, ``max_tasks_per_child``),
    then poolmagic's ``backend``, ``address`` and ``start_method``.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable | None = None, initargs: Iterable = (), *,
                 max_tasks_per_child: int | None = None, backend: Backend | str | None = None,
                 address: str | None = None, start_method: str | None = None):
        max_workers = _checked("max_workers", max_workers, "must be greater than 0")
        max_tasks_per_child = _checked("max_tasks_per_child", max_tasks_per_child, "must be >= 1")
        self._pool = Pool(max_workers, initializer, initargs, max_tasks_per_child, mp_context,
                          start_method=start_method, backend=backend, address=address)
        self._lock = threading.Lock()
        self._shutdown = False
        self._pending: set[futures.Future] = set()  # not finished: shutdown(cancel_futures) cancels them

    @property
    def pool(self) -> Pool:
        """The poolmagic Pool underneath (its size, status, last report)."""
        return self._pool

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> futures.Future:
        """Run ``fn(*args, **kwargs)`` in a worker; a Future of its result."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: futures.Future = futures.Future()
            self._pending.add(future)
            # as ProcessPoolExecutor's call queue (workers + 1): the first calls are taken at once
            taken = len(self._pending) <= self._pool.size + 1
        options: dict[str, Any] = {"star": True}
        if kwargs:
            options["kwargs"] = kwargs
        link = _Link(future, self)
        if taken:
            link._start()
        try:
            check_call(fn, args, kwargs)
            self._pool._submit(fn, [args], options, before=link.attach, remember=False)
        except BadInputError as exc:  # the call's own (not callable, wrong arguments, does not pickle):
            self._done(future)        # on its future, as ProcessPoolExecutor's
            if link._start():
                future.set_exception(exc)
            return future
        except BaseException:
            self._done(future)
            raise
        future.add_done_callback(link.on_done)
        return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int | None = None, **_ignored: Any) -> Iterator:
        """``fn(*args)`` for each tuple of the iterables' items, in order, as they finish.

        Lazy, unlike concurrent.futures' (which submits everything at once):
        the items are read as workers need them. ``timeout`` counts from this
        call; ``chunksize`` defaults to poolmagic's adaptive sizing.
        """
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        end = None if timeout is None else time.monotonic() + timeout
        it = self._pool.imap(fn, zip(*iterables), chunksize, star=True)

        def results() -> Iterator:
            try:
                while True:
                    try:
                        yield it.next(None if end is None else max(0.0, end - time.monotonic()))
                    except StopIteration:
                        return
                    except PoolTimeoutError:
                        raise futures.TimeoutError() from None
            finally:
                job = it._job
                if job is not None and not job.finished.is_set():
                    self._pool.backend.cancel(job, wait=0)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work; ``cancel_futures`` cancels what has not started; ``wait`` for the rest."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for f in pending:
                f.cancel()
        pool = self._pool
        if pool._state == "RUN":
            pool.close()
        if wait:
            pool.join()
        else:
            threading.Thread(target=pool.join, daemon=True, name="poolmagic-executor-shutdown").start()

    def _done(self, future: futures.Future) -> None:
        with self._lock:
            self._pending.discard(future)


def _checked(name: str, value: Any, rule: str) -> Any:
    """A size as ProcessPoolExecutor checks it: a bool is an int (True: 1), anything else that
    is no int a TypeError (also a ValueError, poolmagic's BadArgumentsError), below 1 a ValueError."""
    if value is None:
        return None
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int):
        raise BadArgumentsError(f"{name} must be an integer, not {value!r}")
    if value <= 0:
        raise ValueError(f"{name} {rule}, not {value!r}")
    return value


class _Link:
    """Ties one Future to the one-item map that computes it."""

    def __init__(self, future: futures.Future, executor: Executor):
        self.future, self.executor = future, executor
        self.job: Any = None
        self.running: bool | None = None  # set_running_or_notify_cancel's answer, once asked
        self.lock = threading.Lock()

    def attach(self, job: Any) -> None:
        self.job = job
        job.observers.append(self._observe)

    def _start(self) -> bool:
        """Mark the future running (once); False when it was cancelled first."""
        with self.lock:
            if self.running is None:
                self.running = self.future.set_running_or_notify_cancel()
            return self.running

    def _observe(self, event: Any) -> None:
        kind = type(event)
        if kind is ChunkStarted:
            if not self._start():
                self.executor._pool.backend.cancel(self.job, wait=0)
        elif kind is MapFinished:  # published on the manager thread: done-callbacks run elsewhere
            self.executor._pool._callbacks.put(lambda: self._finish(event))

    def _finish(self, event: MapFinished) -> None:
        if not self._start():
            return
        job = self.job
        if job.error is None and event.status == "done":
            self.future.set_result(job.report.results[0])
        elif event.status == "cancelled":
            self.future.set_exception(futures.CancelledError("the executor was shut down"))
        else:  # an item's error has its worker traceback as __cause__, as ProcessPoolExecutor's
            self.future.set_exception(_remote_cause(job.error, _RemoteTraceback))
        self.job = None  # the future holds its result; nothing else needs the map

    def on_done(self, future: futures.Future) -> None:
        self.executor._done(future)
        job = self.job
        if future.cancelled() and job is not None and not job.finished.is_set():
            self.executor._pool.backend.cancel(job, wait=0)
