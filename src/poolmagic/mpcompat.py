"""multiprocessing.Pool's surface on poolmagic's engine.

``poolmagic.Pool`` (api.py) delegates here for what only the standard
library's interface needs: the pool's RUN/CLOSE/TERMINATE state, AsyncResult
(``map_async``, ``apply_async``) with its callbacks, the lazy ``imap``
iterators, the ``initializer`` run once per worker process, and
``maxtasksperchild``. Each is a thin layer over one Job and its events.
"""
from __future__ import annotations

import builtins
import itertools
import multiprocessing
import queue
import threading
import time
import traceback
from collections import deque
from multiprocessing.pool import CLOSE, RUN, TERMINATE, RemoteTraceback
from typing import Any, Callable, Iterable, Iterator

from .engine.core.events import ChunkFinished, ItemsFailed, MapFinished
from .engine.core.rules import attach_report, write_outputs
from .errors import BadInputError, MapCancelledError, MapFailedError, PoolmapError, add_note
from .sentinel import NOT_DONE

__all__ = ["RUN", "CLOSE", "TERMINATE", "TimeoutError", "AsyncResult", "IMapIterator", "RemoteTraceback"]


class TimeoutError(multiprocessing.TimeoutError, builtins.TimeoutError):  # noqa: A001
    """``get(timeout)`` ran out: both multiprocessing's TimeoutError and the builtin one."""


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
                      "it uses its default start method instead", RuntimeWarning, stacklevel=4)
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

    def stop(self) -> None:
        """End the thread after the callbacks queued so far; forget it, so that it can be collected."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._q.put(None)
            if thread is not threading.current_thread():
                thread.join(5)


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
        return first
    return err


def _remote_cause(exc: BaseException) -> BaseException:
    """Chain the worker's traceback text as multiprocessing does (``__cause__``)."""
    if exc.__cause__ is None and exc.__traceback__ is not None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        exc.__cause__ = RemoteTraceback(text)
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


# ---------------------------------------------------------------- imap


class Discard:
    """Stands for a report's results list that keeps nothing: ``imap`` hands each
    result to its consumer, so a 10⁷-item stream runs in bounded memory."""

    def __init__(self, n: int = 0):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def extend(self, values: Iterable) -> None:
        self._n += len(values)  # type: ignore[arg-type]

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, slice) and key.stop is not None:
            self._n = max(self._n, key.stop)

    def __delitem__(self, key: Any) -> None:
        if isinstance(key, slice) and key.start is not None:
            self._n = min(self._n, key.start)

    def __getitem__(self, key: Any) -> Any:
        return [] if isinstance(key, slice) else NOT_DONE

    def __iter__(self) -> Iterator:
        return iter(())

    def __repr__(self) -> str:
        return f"<{self._n} results, not kept (imap)>"


class Guarded:
    """An ITERABLE read in chunks of ``chunk`` items, as multiprocessing reads it.

    When the ITERABLE raises, the map still runs the items read before, and
    the error takes the place of the chunk being read (where the standard
    library raises it): the stream just ends, and ``error``/``error_at`` say why.
    """

    def __init__(self, iterable: Iterable, chunk: int):
        self._it = iter(iterable)
        self._chunk = max(1, chunk)
        self.error: BaseException | None = None
        self.error_at = -1

    def __iter__(self) -> Iterator:
        it, chunk = self._it, self._chunk
        read = 0
        if chunk == 1:  # item by item while the ITERABLE is slow: a producer may wait for results
            probe = time.perf_counter
            spent = 0.0
            while read < 256 or spent > read * 2e-6:
                t = probe()
                try:
                    x = next(it)
                except StopIteration:
                    return
                except Exception as exc:
                    self.error, self.error_at = exc, read
                    return
                spent += probe() - t
                read += 1
                yield x
        batch = chunk * max(1, 1024 // chunk)  # a fast ITERABLE: whole chunks, read at C speed
        while True:
            buf: list = []
            try:
                buf.extend(itertools.islice(it, batch))  # keeps what it read before a raise
            except Exception as exc:
                keep = len(buf) - len(buf) % chunk  # a partly read chunk is lost, as in the stdlib
                self.error, self.error_at = exc, read + keep
                yield from buf[:keep]
                return
            read += len(buf)
            yield from buf
            if len(buf) < batch:
                return


BACKLOG = 1 << 16  # imap results waiting for the consumer before the ITERABLE's reading pauses


class IMapIterator:
    """``imap``/``imap_unordered``: results as they finish, in order or not.

    ``next(timeout)`` as in the standard library. Each item's error is raised
    at its place and the iteration goes on, as multiprocessing's does. The
    manager thread only files each finished chunk (O(1)); the consumer walks
    its items.
    """

    def __init__(self, ordered: bool, guard: Guarded | None = None):
        self._ordered = ordered
        self._guard = guard
        self._cond = threading.Condition()
        self._chunks: dict[int, list] = {}  # ordered: first position -> the chunk's results
        self._queue: deque[tuple[int, list]] = deque()  # unordered: (first position, results)
        self._single: dict[int, tuple[bool, Any]] = {}  # items that failed outside a chunk
        self._cur: tuple[int, list] = (0, [])  # the chunk being consumed
        self._off = 0  # next index in it
        self._next = 0  # ordered: next position; unordered: items handed out
        self._end: int | None = None  # items in the map, once it finished
        self._end_error: BaseException | None = None
        self._job: Any = None
        self._filed = 0  # results filed by the manager thread (the consumer has taken _next)

    @property
    def report(self) -> Any:
        """The map's RunReport (timing, errors; its results are not kept)."""
        return self._job.report

    def attach(self, job: Any) -> None:
        self._job = job
        job.report.results = Discard(len(job.report.results))
        job.observers.append(self._observe)

    def _observe(self, event: Any) -> None:
        kind = type(event)
        if kind is ChunkFinished:
            start = event.record.start
            with self._cond:
                if self._ordered:
                    self._chunks[start] = event.results
                else:
                    self._queue.append((start, event.results))
                self._filed += len(event.results)
                self._cond.notify_all()
        elif kind is ItemsFailed:
            errors = self._job.report.errors
            with self._cond:
                for pos in event.indices:
                    self._single[pos] = (False, errors.get(pos, event.error))
                    if not self._ordered:
                        self._queue.append((pos, [NOT_DONE]))
                self._cond.notify_all()
        elif kind is MapFinished:
            job = self._job
            with self._cond:
                self._end = job.source.pos
                if event.status == "cancelled":
                    self._end_error = MapCancelledError("the pool was terminated while imap was running")
                elif event.error is not None and not isinstance(event.error, MapFailedError):
                    self._end_error = event.error  # not an item's: the pool shut down, or the ITERABLE
                self._cond.notify_all()

    def feed(self) -> None:
        """Read a stream ITERABLE for the map (a feeder thread), pausing while more
        than BACKLOG results wait for the consumer: memory stays bounded however
        slowly the results are taken (multiprocessing reads on regardless)."""
        job = self._job
        while not job.finished.is_set():
            with self._cond:
                while self._filed - self._next > BACKLOG and not job.finished.is_set():
                    self._cond.wait(0.1)
            job.wait(0.05, feed=True)

    def __iter__(self) -> "IMapIterator":
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; raises that item's error, StopIteration, or TimeoutError."""
        __tracebackhide__ = True
        got = self._from_chunk()
        if got is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._cond:
                while True:
                    got = self._take()
                    if got is not None:
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"no result within {timeout} s")
                    self._cond.wait(0.5 if left is None else min(left, 0.5))
        if self._filed - self._next == BACKLOG // 2:
            with self._cond:
                self._cond.notify_all()  # the feeder may go on
        if self._job.output.pending():
            write_outputs(self._job.take_printable(final=self._end is not None))
        ok, value = got
        if ok:
            return value
        raise value

    def _from_chunk(self) -> tuple[bool, Any] | None:
        """The next item of the chunk being consumed (no lock: only this thread reads it)."""
        start, results = self._cur
        k = self._off
        if k >= len(results):
            return None
        value = results[k]
        pos = start + k
        if value is NOT_DONE:
            err = self._single.pop(pos, None) or (False, self._job.report.errors.get(pos))
            if err[1] is None:  # queued again (retries): it comes back as a chunk of its own
                self._off = len(results)
                return None
            value = err
        else:
            value = (True, value)
        self._off = k + 1
        self._next += 1
        results[k] = None  # the consumer owns it now: keep no reference
        return value

    def _take(self) -> tuple[bool, Any] | None:
        """The next (ok, value) if it is there; raises StopIteration at the end. Under the lock."""
        got = self._from_chunk()
        if got is not None:
            return got
        if self._ordered:
            single = self._single.pop(self._next, None)
            if single is not None:
                self._next += 1
                return single
            chunk = self._chunks.pop(self._next, None)
            if chunk is not None:
                self._cur, self._off = (self._next, chunk), 0
                return self._take()
        elif self._queue:
            self._cur, self._off = self._queue.popleft(), 0
            return self._take()
        if self._end is None:
            return None
        done = self._next >= self._end
        guard = self._guard
        if guard is not None and guard.error is not None and (done or (self._ordered and self._next >= guard.error_at)):
            err, guard.error = guard.error, None
            self._end = self._next  # nothing follows the ITERABLE's error
            return (False, err)
        if self._end_error is not None:
            err, self._end_error = self._end_error, None
            self._end = self._next
            return (False, err)
        if done:
            raise StopIteration
        return None


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
