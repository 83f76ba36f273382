"""A Job is one map: what to run, on which items, with which options, and its record.

It is backend-neutral: every backend takes chunks from ``next_items`` and
answers each chunk it took with exactly one of ``chunk_done``,
``items_failed``, ``requeue``, ``retry_singly``, ``split_failed`` or
``drop_chunk`` (the Job counts chunks in flight to know when it is finished).
Those calls come from one backend thread; the caller's thread only waits
(``wait``), feeds a stream's items and prints worker output in item order.

What happens is published as events (events.py) to any number of observers.
The Job also keeps the record it was given up to date (record.py's MapRecord,
which the API's RunReport extends: results in input order, errors by index,
chunk records, output) — the bookkeeping every backend would otherwise repeat.
The failure policy a backend applies to its chunks is failures.py's; the
caller's wait is caller.py's, output order output.py's.
"""
from __future__ import annotations

import bisect
import operator
import threading
import time
from collections import deque
from typing import Any, Callable

from ...errors import add_note, short_repr
from ...sentinel import NOT_DONE
from .events import ChunkFinished, ChunkRecord, ChunkStarted, ItemsFailed, ItemsProgress, MapFinished, Observer
from .caller import unpicklable, wait_for
from .items import ItemSource
from .output import OutputOrder
from .record import FAILED_KEPT, MapRecord
from ..mapoptions import MapOptions
from .rules import ItemTimes, absorbed_notes, as_item_error, finish_error, star_hint, summary_error, write_outputs  # noqa: F401  (re-exported)
from .schedule import MAX_CHUNK, MIN_CHUNK_S, STREAM_MAX_CHUNK, TARGET_CHUNK_S, chunk_size  # noqa: F401  (re-exported)

_FIRST = operator.itemgetter(0)



class Job:
    """One map. See the module docstring for the contract with backends.

    Many methods, one object: they are the three faces of one map's state
    (what a backend calls, the results side, the caller's side) and share
    every field under one lock; split apart they would pass that state around.
    """

    def __init__(self, payload: Any, source: ItemSource, report: MapRecord, options: MapOptions,
                 context: Any, func: Callable | None = None):
        self.func = func
        self._filenames: dict[tuple[str, int], str] | None = None
        self.payload = payload
        self.source = source
        self.report = report
        self.options = options
        # what the worker does not need (kwargs are bound into the function); user objects stay out of envelopes
        local = options.kwargs or options.retry_on or options.checkpoint
        self.wire_options = options.with_(kwargs=None, retry_on=None, checkpoint=None) if local else options
        self.context = context
        self.chunksize = 1 if options.timeout is not None and options.chunksize is None else options.chunksize
        self.index: list[int] | None = None  # position -> report index, when re-running a subset
        self.attempts: dict[int, list[BaseException]] = {}  # position -> errors of earlier attempts
        # chunks re-run item by item after a crash, timeout or memory stop: (start, count, what, kind)
        self.isolated: list[tuple[int, int, str, type]] = []
        self.retry: deque[tuple[int, Any]] = deque()
        self.inflight = 0  # chunks taken and not yet answered; changed under cond
        self.received = 0  # bytes of results that came back (the memory guard counts them)
        self.cond = threading.Condition()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.observers: list[Observer] = []
        self.abort: Callable[[BaseException], None] = self.fail  # a backend stops its work too
        # A caller's thread waits for it at once (a blocking map): the backend may leave it
        # ``nudge``, to be called should the map not end within NUDGE_S (caller.py).
        self.waited = False
        self.nudge: Callable[[], None] | None = None
        self.reply: Callable[[float], None] | None = None  # or the reply read on the caller's thread first
        # per-item timing estimate (sum of busy seconds, items)
        self.busy = 0.0
        self.timed_items = 0
        # item-order printing: outputs wait until every earlier item is done
        self.output = OutputOrder()
        if source.length is not None and report.items is None:
            report.results = [NOT_DONE] * source.length
            report.items = source.length
        source.on_low = self._wake_caller

    # ---------------------------------------------------------- events
    def publish(self, event: Any) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # a display must never break a map
                pass

    def filename_of(self, name: str, firstlineno: int) -> str | None:
        """Where the mapped function's code named ``name`` lives (for tracebacks)."""
        if self._filenames is None:
            from ...serialize import code_filenames

            self._filenames = code_filenames(self.func) if self.func is not None else {}
        return self._filenames.get((name, firstlineno))

    # ---------------------------------------------------------- scheduling side
    @property
    def active(self) -> bool:
        return not self.finished.is_set()

    def has_work(self) -> bool:
        return self.active and (bool(self.retry) or self.source.has_items())

    def per_item_s(self) -> float | None:
        return self.busy / self.timed_items if self.timed_items else None

    def chunk_size(self, workers: int) -> int:
        """How many items the next chunk should hold, from the measured time per item."""
        return self.chunksize or chunk_size(self.per_item_s(), self.source.remaining(), workers)

    def next_items(self, size: int) -> tuple[int, Any] | None:
        """The next chunk: a retried one first, else fresh items from the source."""
        with self.cond:
            if self.retry:
                self.inflight += 1
                return self.retry.popleft()
            got = self.source.take(size)
            if got is not None:
                self.inflight += 1
        self.maybe_finish()
        return got

    def seed_indices(self, start: int, count: int) -> tuple[int, ...] | None:
        """The ITERABLE positions of a chunk's items, for a seeded re-run of some items.

        None when positions are the ITERABLE's own or no item is seeded:
        only a seeded ``--resume``/``--checkpoint`` run pays for sending them.
        """
        if self.index is None or self.options.seed is None:
            return None
        return tuple(self.index[start : start + count])

    def progress(self, start: int, done: int) -> None:
        """Items of the running chunk that starts at ``start`` have finished."""
        if self.observers:
            self.publish(ItemsProgress(start, done))

    def started(self, worker: int, pid: int, start: int, count: int) -> None:
        if self.observers:
            self.publish(ChunkStarted(worker, pid, start, count, time.perf_counter()))

    def requeue(self, start: int, items: Any) -> None:
        """Put a chunk that was never run back in front of the queue."""
        with self.cond:
            self.inflight -= 1
            if self.active:
                self.retry.appendleft((start, items))

    def results_lost(self, start: int, items: Any) -> None:
        """A chunk that finished, but whose results died with its worker before they reached
        us: run again, and the record says so (what ran of it, and what it gave, is not known)."""
        with self.cond:
            if self.active:
                for k in range(len(items)):
                    i = self._at(start + k)
                    self.report.lost[i] = self.report.lost.get(i, 0) + 1
        self.requeue(start, items)

    def retry_singly(self, start: int, items: Any) -> None:
        """Re-run a chunk item by item (to find which of its items kills a worker)."""
        with self.cond:
            self.inflight -= 1
            if self.active:
                for k in range(len(items) - 1, -1, -1):
                    self.retry.appendleft((start + k, items[k : k + 1]))

    def isolate(self, start: int, items: Any, what: str, kind: type) -> None:
        """A worker died (``kind`` of error) running a chunk of several items: which one?

        The chunk is re-run item by item, not counted as retries. If none of
        them fails that way again, the map says so under its summary (a flaky
        crash or hang) instead of absorbing it without a word.
        """
        with self.cond:
            self.isolated.append((start, len(items), what, kind))
        self.retry_singly(start, items)

    def drop_chunk(self) -> None:
        """A chunk of this (cancelled or failed) job will never report."""
        with self.cond:
            self.inflight -= 1

    def unsendable(self, start: int, items: Any) -> None:
        """A chunk that does not pickle: fail the items that do not, re-run the rest (any backend)."""
        self.split_failed(start, items, unpicklable(start, items))

    def split_failed(self, start: int, items: Any, bad: dict[int, BaseException]) -> None:
        """Some items of a chunk cannot be sent: fail those, re-run the rest one by one."""
        with self.cond:
            self.inflight -= 1
            if not self.active:
                return
            first = None
            for k, exc in sorted(bad.items()):
                self.output.done(start + k, 1)
                err = self._item_error(start + k, exc, items[k : k + 1])
                first = first if first is not None or err is None else err
            if first is not None and not self.options.keep_going:
                self._fail_locked(first)
                return
            for k in range(len(items) - 1, -1, -1):
                if k not in bad:
                    self.retry.appendleft((start + k, items[k : k + 1]))
        self.maybe_finish()

    # ---------------------------------------------------------- results side
    def chunk_done(self, rec: ChunkRecord, results: list, outputs: list,
                   errors: list[tuple[int, BaseException]], items: Any, raw: tuple | None = None) -> None:
        """Place a finished chunk's results; errors arrive already rebuilt.

        Positions are the job's own (0, 1, ... in the order items were taken);
        ``index`` maps them to the report's when a map re-runs a subset
        (--resume, --checkpoint).
        """
        r = self.report
        first = None
        with self.cond:
            self.inflight -= 1
            if not self.active:
                self._place_late(rec.start, results, errors)
                return
            end = rec.start + len(results)
            if self.index is None:
                if end > len(r.results):
                    r.results.extend([NOT_DONE] * (end - len(r.results)))
                r.results[rec.start : end] = results
            else:
                for k, value in enumerate(results):
                    r.results[self.index[rec.start + k]] = value
            if errors:
                rec.status = "failed"
            r.chunks.append(rec)
            r.done += len(results) - len(errors)
            self.received += rec.nbytes
            self.busy += rec.t1 - rec.t0
            self.timed_items += len(results)
            for pos, stream, text in outputs:
                idx = self._at(pos)
                self.output.add(pos, stream, text)
                bisect.insort(r.outputs, (idx, stream, text), key=_FIRST)  # item order
            retried = 0
            again = set()
            for pos, exc in errors:
                off = pos - rec.start
                err = self._item_error(pos, exc, items[off : off + 1] if items is not None else None)
                retried += err is None
                if err is None:
                    again.add(pos)
                first = first if first is not None or err is None else err
            self.output.done_except(rec.start, rec.count, again)
            if self.attempts:
                failed = {pos for pos, _ in errors}
                for k in range(len(results)):
                    tries = self.attempts.get(rec.start + k)
                    if tries and rec.start + k not in failed:  # it succeeded after retries
                        r.attempts[self._at(rec.start + k)] = list(tries)
            if first is not None and not self.options.keep_going:
                self._fail_locked(first)
            elif items is not None and len(results) < len(items) and self.active:
                # the worker stopped at an item that is queued again (--retries):
                # the items after it never ran, so they run again too
                self.retry.appendleft((rec.start + len(results), items[len(results):]))
                items = items[: len(results)]
            self.cond.notify_all()
        if self.observers:
            self.publish(ChunkFinished(rec, len(errors), results, items, raw, retried))
        self.maybe_finish()

    def late_results(self, start: int, results: list, errors: list) -> None:
        """Results of a chunk already given up on (dropped) that came back after the map ended."""
        with self.cond:
            if not self.active:
                self._place_late(start, results, errors)

    def _place_late(self, start: int, results: list, errors: list) -> None:
        """Results that came back after the map ended (failed, cancelled): they finished, keep them."""
        failed = {pos for pos, _ in errors}
        self.report.keep_late([(self._at(start + k), v) for k, v in enumerate(results) if start + k not in failed])

    def items_failed(self, indices: list[int], exc: BaseException, items: Any = None, start: int = 0) -> None:
        """Items that produced no result (crash, timeout, could not be sent or decoded)."""
        first = None
        with self.cond:
            self.inflight -= 1
            if not self.active:
                return
            retried = 0
            for pos in indices:
                off = pos - start
                err = self._item_error(pos, exc, items[off : off + 1] if items is not None else None)
                retried += err is None
                if err is not None:  # a retried item's output prints when its last attempt ends
                    self.output.done(pos, 1)
                first = first if first is not None or err is None else err
            if self.index is None:
                end = max(indices) + 1
                if end > len(self.report.results):
                    self.report.results.extend([NOT_DONE] * (end - len(self.report.results)))
            if first is not None and not self.options.keep_going:
                self._fail_locked(first)
            self.cond.notify_all()
        if self.observers:
            self.publish(ItemsFailed([self._at(i) for i in indices], exc, retried))
        self.maybe_finish()

    def _at(self, pos: int) -> int:
        return pos if self.index is None else self.index[pos]

    def _item_error(self, pos: int, exc: BaseException, one: Any) -> BaseException | None:
        """Retry the item at ``pos`` (``one``: a one-item slice), or record its error.

        Returns the error as recorded, or None when the item was queued again.
        """
        o = self.options
        tries = self.attempts.setdefault(pos, []) if o.retries else None
        if tries is not None and len(tries) < o.retries and one is not None and (
            o.retry_on is None or isinstance(exc, o.retry_on)
        ):
            tries.append(exc)
            self.report.retried += 1
            self.retry.append((pos, one))
            return None
        idx = self._at(pos)
        if idx in self.report.errors:
            return self.report.errors[idx]
        value = one[0] if one is not None and len(one) else None
        exc = as_item_error(idx, exc, value)
        self.report.errors[idx] = exc
        kept = self.report.failed_items
        if one is not None and len(kept) < FAILED_KEPT:
            kept[idx] = value
        if not getattr(exc, "_poolmagic_noted", False):
            what = f"item {idx}" + ("" if one is None else f" (value {short_repr(value)})")
            if tries:
                self.report.attempts[idx] = [*tries, exc]
                add_note(exc, f"poolmagic: {what} failed after {len(tries) + 1} attempts "
                              f"(each attempt's error: {self.report.where_attempts(idx)}).")
            else:
                add_note(exc, f"poolmagic: {what} failed.")
            hint = star_hint(self.func, self.options, exc, value, self.report.how_to_star())
            if hint:
                add_note(exc, hint)
            exc._poolmagic_noted = True  # type: ignore[attr-defined]
        return exc

    def stop(self, error: BaseException | None = None) -> None:
        """End the map now: "cancelled" (an interrupt, ``.cancel()``), or "failed" with ``error``."""
        if error is None:
            self.fail(KeyboardInterrupt(), status="cancelled")
        else:
            self.fail(error)

    def fail(self, exc: BaseException, status: str = "failed") -> None:
        with self.cond:
            self._fail_locked(exc, status)

    def _fail_locked(self, exc: BaseException, status: str = "failed") -> None:
        if not self.active:
            return
        self.error = exc
        self._close(status)

    def maybe_finish(self) -> None:
        with self.cond:
            if self.active and self.source.error is not None:  # the abort may not have landed yet
                self._fail_locked(self.source.error)
                return
            if self.active and self.source.exhausted and not self.retry and self.inflight <= 0:
                r = self.report
                src = self.source
                # a stream's len() is only a hint (a DataFrame's is its rows; iterating it
                # gives its columns): what it yielded decides
                if self.index is None and (r.items is None or (src.is_stream and src.pos != r.items)):
                    r.items = src.pos
                    del r.results[src.pos :]
                if r.errors:
                    self.error = summary_error(r)
                    self._close("failed")
                else:
                    self._close("done")

    def _close(self, status: str) -> None:
        r = self.report
        r.notes.extend(absorbed_notes(r, self.isolated, self._at))
        r.status = status
        r.t_end = time.perf_counter()
        if r.items is None:
            r.items = self.source.pos
        if self.error is not None:
            finish_error(self.error, r, self.func)
        self.source.close()
        self.finished.set()
        self.cond.notify_all()
        if self.observers:
            self.publish(MapFinished(status, self.error))

    # ---------------------------------------------------------- caller side
    def _wake_caller(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def take_printable(self, final: bool = False) -> list[tuple[int, int, str, str]]:
        """Outputs whose item and every earlier item are done (all of them if final)."""
        return self.output.take(final)

    def wait(self, timeout: float | None = None, on_output: Callable | None = None, feed: bool = True,
             on_tick: Callable[[], None] | None = None) -> bool:
        """Block until done, feeding a stream's items and writing output; True when finished (caller.py)."""
        __tracebackhide__ = True
        return wait_for(self, timeout, on_output, feed, on_tick)
