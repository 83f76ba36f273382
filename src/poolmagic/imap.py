"""``imap`` and ``imap_unordered``: a map's results handed out lazily, as they finish.

The ITERABLE is read as workers need items (``Guarded``, in chunks, as
multiprocessing reads it), results are not kept (``Discard``), and the
consumer walks each finished chunk (``IMapIterator``), so a stream of any
length runs in bounded memory. ``start_imap`` starts one on a pool.
"""
from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from .engine.core.items import SEQUENCES

from .engine.core.events import ChunkFinished, ItemsFailed, MapFinished
from .engine.core.rules import write_outputs
from .errors import BadArgumentsError, MapCancelledError, MapFailedError
from .mpcompat import TimeoutError, _remote_cause
from .serialize import describe
from .sentinel import NOT_DONE


class Discard:
    """Stands for a report's results list that keeps nothing: ``imap`` hands each
    result to its consumer, so a 10⁷-item stream runs in bounded memory. Nor are its items'
    keys (maprun.start reads ``keeps``): a report with no results has nothing to resume."""

    keeps = False

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

    def __init__(self, ordered: bool, guard: Guarded | None = None,
                 cancel: Callable[[Any], None] | None = None):
        self._ordered = ordered
        self._guard = guard
        self._cancel = cancel  # the pool's: stops a map's running items (an interrupt)
        self._interrupted = False
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
        job.observers.append(_weakly(self._observe))  # the map must not keep a dropped iterator

    def _observe(self, event: Any) -> None:
        kind = type(event)
        if kind is ChunkFinished:
            start = event.record.start
            results = event.results
            tries = self._job.retry.attempts
            with self._cond:
                if tries and self._retried(start, results, tries):
                    pass  # every item of it ran again (--retries): each went to _single
                elif self._ordered:
                    self._chunks[start] = results
                else:
                    self._queue.append((start, results))
                self._filed += len(results)
                self._cond.notify_all()
        elif kind is ItemsFailed:
            errors = self._job.report.errors
            with self._cond:
                for pos in event.indices:
                    if event.retried and pos not in errors:
                        continue  # queued to run again (--retries): its last attempt answers for it
                    self._single[pos] = (False, errors.get(pos, event.error))
                    if not self._ordered:
                        self._queue.append((pos, [NOT_DONE]))
                self._cond.notify_all()
        elif kind is MapFinished:
            job = self._job
            with self._cond:
                self._end = job.source.pos
                if event.status == "cancelled":
                    self._end_error = MapCancelledError(
                        "imap was interrupted (Ctrl-C while it waited for a result): its running items were "
                        "stopped" if self._interrupted else "the pool was terminated while imap was running")
                elif event.error is not None and not isinstance(event.error, MapFailedError):
                    self._end_error = event.error  # not an item's: the pool shut down, or the ITERABLE
                self._cond.notify_all()

    def _retried(self, start: int, results: list, tries: dict) -> bool:
        """File the items of a finished chunk that ran more than once (--retries) on their own:
        their last attempt's result or error; one queued yet again waits for its next. True
        when every item of the chunk did (nothing else of it to file). Under the lock."""
        errors = self._job.report.errors
        alone = 0
        for k, value in enumerate(results):
            pos = start + k
            if not tries.get(pos):
                continue
            alone += 1
            if value is not NOT_DONE:
                got = (True, value)
            elif pos in errors:
                got = (False, errors[pos])
            else:
                continue  # queued again
            self._single[pos] = got
            if not self._ordered:
                self._queue.append((pos, [NOT_DONE]))
        return alone == len(results)

    def feed(self) -> bool:
        """Read a stream ITERABLE for the map (a feeder thread, a turn at a time: _feed),
        pausing while more than BACKLOG results wait for the consumer: memory stays bounded
        however slowly the results are taken (multiprocessing reads on regardless). False
        once the map ended."""
        job = self._job
        with self._cond:
            if self._filed - self._next > BACKLOG and not job.finished.is_set():
                self._cond.wait(0.1)
                return True
        job.wait(0.05, feed=True)
        return not job.finished.is_set()

    def __iter__(self) -> "IMapIterator":
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; raises that item's error, StopIteration, or TimeoutError."""
        __tracebackhide__ = True
        got = self._from_chunk()
        if got is None:
            try:
                got = self._wait(timeout)
            except KeyboardInterrupt:
                # as an interrupted map: its running items stop (they ran on, and the rest of the
                # ITERABLE after them, for results no one would read, ahead of the next map)
                if self._cancel is not None and self._job.active:
                    self._interrupted = True
                    self._cancel(self._job)
                raise
        if self._filed - self._next == BACKLOG // 2:
            with self._cond:
                self._cond.notify_all()  # the feeder may go on
        if self._job.output.pending():
            write_outputs(self._job.take_printable(final=self._end is not None))
        ok, value = got
        if ok:
            return value
        if ok is False:  # an item's error: its worker traceback as __cause__, as multiprocessing's
            _remote_cause(value)
        raise value

    def _wait(self, timeout: float | None) -> tuple[bool | None, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                got = self._take()
                if got is not None:
                    return got
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no result within {timeout} s")
                self._cond.wait(0.5 if left is None else min(left, 0.5))

    def _from_chunk(self) -> tuple[bool | None, Any] | None:
        """The next item of the chunk being consumed (no lock: only this thread reads it)."""
        start, results = self._cur
        k = self._off
        if k >= len(results):
            return None
        value = results[k]
        pos = start + k
        tries = self._job.retry.attempts
        if tries and tries.get(pos):  # an item that ran again (--retries): its last attempt counts
            got = self._single.pop(pos, None)
            if got is None:
                if self._ordered:
                    return None  # wait here for it: the items after it follow it
                self._off = k + 1  # it comes back on its own
                results[k] = None
                return self._from_chunk()
            self._off = k + 1
            self._next += 1
            results[k] = None
            return got
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

    def _take(self) -> tuple[bool | None, Any] | None:
        """The next (ok, value) if it is there; raises StopIteration at the end. Under the lock."""
        got = self._from_chunk()
        if got is not None:
            return got
        if self._off < len(self._cur[1]):  # waiting for a retried item of the chunk being consumed
            pass
        elif self._ordered:
            chunk = self._chunks.pop(self._next, None)  # (first: it may begin with a retried item)
            if chunk is not None:
                self._cur, self._off = (self._next, chunk), 0
                return self._take()
            single = self._single.pop(self._next, None)
            if single is not None:
                self._next += 1
                return single
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
            return (None, err)  # the parent's own error, raised as it is
        if self._end_error is not None:
            err, self._end_error = self._end_error, None
            self._end = self._next
            return (None, err)
        if done:
            raise StopIteration
        return None


def _weakly(method: Callable[[Any], None]) -> Callable[[Any], None]:
    """An observer that holds its iterator weakly."""
    ref = weakref.WeakMethod(method)

    def observe(event: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(event)

    return observe


def _feed(ref: "weakref.ref[IMapIterator]") -> None:
    """The feeder thread: holds its iterator only for a turn, so a dropped one is collected."""
    while True:
        it = ref()
        if it is None or not it.feed():
            return
        del it


def _stop_dropped(job: Any, cancel: Callable[..., None]) -> None:
    """An iterator dropped before its map ended (a ``break`` out of the loop): no one can
    read its results any more, so its map stops, as the loop would (it ran on to the end of
    its ITERABLE, ahead of the next map)."""
    if job.active:
        cancel(job, None, 0)


def start_imap(submit: Callable[..., Any], func: Callable, iterable: Iterable, chunksize: int | None,
               ordered: bool, options: dict, cancel: Callable[[Any], None] | None = None) -> IMapIterator:
    """Start ``func`` over ``iterable`` with ``submit`` (the pool's) and return its iterator;
    ``cancel`` (the pool's) stops the map when the consumer is interrupted.

    A stream ITERABLE is read in ``chunksize`` chunks, as multiprocessing reads
    it, by a feeder thread of its own; every item runs (``keep_going``).
    """
    guard = None
    if type(iterable) not in SEQUENCES:
        try:
            guard = Guarded(iterable, chunksize or 1)
        except TypeError:
            raise BadArgumentsError(f"ITERABLE is {describe(iterable)}, which is not iterable") from None
    if chunksize is not None:
        options["chunksize"] = chunksize
    options.setdefault("keep_going", True)
    it = IMapIterator(ordered, guard, cancel)
    job = submit(func, iterable if guard is None else guard, options, before=it.attach, remember=False)
    if cancel is not None:
        weakref.finalize(it, _stop_dropped, job, cancel).atexit = False  # (at exit the pool stops anyway)
    if job.source.is_stream:
        threading.Thread(target=_feed, args=(weakref.ref(it),), daemon=True, name="poolmagic-feeder").start()
    return it
