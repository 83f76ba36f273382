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
It is made of parts with a job of their own, each called under the Job's
lock: what runs again and each item's attempts are rerun.py's, what an
answer writes in the record results.py's, output order output.py's. The
failure policy a backend applies to its chunks is failures.py's; the
caller's wait is caller.py's.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from ...sentinel import NOT_DONE
from .events import (ChunkFinished, ChunkRecord, ChunkStarted, ItemsFailed, ItemsProgress, LateChunk, MapFinished,
                     Observer)
from .caller import unpicklable, wait_for
from .items import ItemSource
from .output import OutputOrder
from .record import MapRecord
from .rerun import Reruns
from .results import Results
from ..mapoptions import MapOptions
from .rules import ItemTimes, summary_error, write_outputs  # noqa: F401  (re-exported)
from .schedule import MAX_CHUNK, MIN_CHUNK_S, STREAM_MAX_CHUNK, TARGET_CHUNK_S, chunk_size  # noqa: F401  (re-exported)


_NONE: frozenset[int] = frozenset()  # no position queued again


class Job:
    """One map. See the module docstring for the contract with backends.

    The state machine of a map (chunks in flight, its end, its events) and
    the three faces that share it under one lock: what a backend calls, the
    results side (``results``: Results), the caller's side. What runs again
    is ``retry`` (Reruns), output order ``output`` (OutputOrder).
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
        self.results = Results(report, options, func)  # what answers write in the record
        self.retry = Reruns(options)  # what runs again, and each retried item's attempts
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

    @property
    def index(self) -> list[int] | None:
        """Position -> the record's index, when a map re-runs a subset (--resume, --checkpoint)."""
        return self.results.index

    @index.setter
    def index(self, index: list[int] | None) -> None:
        self.results.index = index

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
            from ...captures import code_filenames

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
                return self.retry.pop()
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
        index = self.results.index
        if index is None or self.options.seed is None:
            return None
        return tuple(index[start : start + count])

    def progress(self, start: int, done: int) -> None:
        """Items of the running chunk that starts at ``start`` have finished."""
        if self.observers:
            self.publish(ItemsProgress(start, done))

    def started(self, worker: int, pid: int, start: int, count: int) -> None:
        if self.observers:
            self.publish(ChunkStarted(worker, pid, start, count, time.perf_counter()))

    def _again(self, put: Callable[..., None], *args: Any) -> None:
        """Answer a chunk by queuing it (or its items) to run again with ``put``, unless the map ended."""
        with self.cond:
            self.inflight -= 1
            if self.active:
                put(*args)

    def requeue(self, start: int, items: Any) -> None:
        """Put a chunk that was never run back in front of the queue."""
        self._again(self.retry.front, start, items)

    def results_lost(self, start: int, items: Any) -> None:
        """A chunk that finished, but whose results died with its worker before they reached
        us: run again, and the record says so (what ran of it, and what it gave, is not known).
        After the map ended it is not run again, and ``report.lost`` says why those stay NOT_DONE."""
        with self.cond:
            self.results.lost(start, len(items))
        self.requeue(start, items)

    def retry_singly(self, start: int, items: Any) -> None:
        """Re-run a chunk item by item (to find which of its items kills a worker)."""
        self._again(self.retry.singly, start, items)

    def isolate(self, start: int, items: Any, what: str, kind: type) -> None:
        """A worker died (``kind`` of error) running a chunk of several items: which one?

        The chunk is re-run item by item, not counted as retries. If none of
        them fails that way again, the map says so under its summary (a flaky
        crash or hang) instead of absorbing it without a word.
        """
        self._again(self.retry.isolate, start, items, what, kind)

    def ran_on(self, worker: int) -> None:
        """The worker ``worker`` ran a chunk of this map that will never come back (killed, crashed)."""
        with self.cond:
            self.report.lost_on.add(worker)

    def drop_chunk(self) -> None:
        """A chunk of this (cancelled or failed) job will never report."""
        with self.cond:
            self.inflight -= 1

    def unsendable(self, start: int, items: Any) -> None:
        """A chunk that does not pickle: fail the items that do not, re-run the rest (any backend)."""
        self.split_failed(start, items, unpicklable(start, items, self.results.at))

    def split_failed(self, start: int, items: Any, bad: dict[int, BaseException]) -> None:
        """Some items of a chunk cannot be sent: fail those, re-run the rest one by one."""
        with self.cond:
            self.inflight -= 1
            if not self.active:
                return
            for k in bad:
                self.output.done(start + k, 1)
            first, _ = self._item_errors(sorted((start + k, exc) for k, exc in bad.items()), items, start)
            if first is not None and not self.options.keep_going:
                self._fail_locked(first)
                return
            self.retry.singly(start, items, skip=bad)
        self.maybe_finish()

    # ---------------------------------------------------------- results side
    def chunk_done(self, rec: ChunkRecord, results: list, outputs: list,
                   errors: list[tuple[int, BaseException]], items: Any, raw: tuple | None = None) -> None:
        """Place a finished chunk's results (results.py); errors arrive already rebuilt."""
        with self.cond:
            self.inflight -= 1
            ended = not self.active
            if not ended:
                items, again = self._place(rec, results, outputs, errors, items)
        if ended:  # (a map never starts again once ended)
            self.late_results(rec.start, results, errors, items)
            return
        if self.observers:
            self.publish(ChunkFinished(rec, len(errors), results, items, raw, again))
        self.maybe_finish()

    def _place(self, rec: ChunkRecord, results: list, outputs: list,
               errors: list[tuple[int, BaseException]], items: Any) -> tuple[Any, int]:
        """chunk_done's work under the lock: (the items that ran, as --retries may queue the
        rest again; how many of its failed items were queued again)."""
        self.results.place(rec, results, len(errors))
        self.received += rec.nbytes
        self.busy += rec.t1 - rec.t0
        self.timed_items += len(results)
        for pos, stream, text in outputs:
            self.output.add(pos, stream, text)
            self.results.add_output(pos, stream, text)
        first, again = self._item_errors(errors, items, rec.start) if errors else (None, _NONE)
        self.output.done_except(rec.start, rec.count, again)
        if self.retry.attempts:
            for pos, tries in self.retry.succeeded(rec.start, len(results), {pos for pos, _ in errors}):
                self.results.succeeded_after(pos, tries)
        if first is not None and not self.options.keep_going:
            self._fail_locked(first)
        elif items is not None and len(results) < len(items) and self.active:
            # the worker stopped at an item that is queued again (--retries):
            # the items after it never ran, so they run again too
            self.retry.front(rec.start + len(results), items[len(results):])
            items = items[: len(results)]
        self.cond.notify_all()
        return items, len(again)

    def late_results(self, start: int, results: list, errors: list, items: Any = None) -> None:
        """Results of a chunk that came back after the map ended: kept. Its ``items`` go to the
        observers first (LateChunk): a stream's are keyed for --resume before the results show."""
        if items is not None and self.observers:
            self.publish(LateChunk(start, items))
        with self.cond:
            if not self.active:
                self.results.late(start, results, errors)

    def items_failed(self, indices: list[int], exc: BaseException, items: Any = None, start: int = 0) -> None:
        """Items that produced no result (crash, timeout, could not be sent or decoded)."""
        with self.cond:
            self.inflight -= 1
            if not self.active:
                return
            first, again = self._item_errors(((pos, exc) for pos in indices), items, start)
            for pos in indices:
                if pos not in again:  # a retried item's output prints when its last attempt ends
                    self.output.done(pos, 1)
            self.results.reach(indices)
            if first is not None and not self.options.keep_going:
                self._fail_locked(first)
            self.cond.notify_all()
        if self.observers:
            self.publish(ItemsFailed([self.results.at(i) for i in indices], exc, len(again)))
        self.maybe_finish()

    def _item_errors(self, errors: Iterable[tuple[int, BaseException]], items: Any,
                     start: int) -> tuple[BaseException | None, set[int]]:
        """Each failed item (position, error) of the chunk of ``items`` at ``start`` is retried
        or its error recorded: (the first error recorded, the positions queued again)."""
        first, again = None, set()
        for pos, exc in errors:
            off = pos - start
            one = items[off : off + 1] if items is not None else None
            if self.retry.again(pos, exc, one):
                self.report.retried += 1
                again.add(pos)
                continue
            err = self.results.error(pos, exc, one, self.retry.tries(pos))
            if first is None:
                first = err
        return first, again

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
                self.results.count(self.source.pos, self.source.is_stream)
                if self.report.errors:
                    self.error = summary_error(self.report)
                    self._close("failed")
                else:
                    self._close("done")

    def _close(self, status: str) -> None:
        src = self.source
        self.report.unread = src.is_stream and (not src.exhausted or src.error is not None)
        if self.retry.attempts and status != "done":
            self.results.stopped_after(self.retry.attempts)
        self.results.close(status, self.error, self.retry.isolated, self.source.pos)
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
