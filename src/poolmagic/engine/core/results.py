"""The results side of a map: what the answers of its chunks write in its record.

A finished chunk's results go to their place in input order, its output
beside them in item order, an item's error is recorded once by index with
the notes that name the item (and its attempts, and ``star=True`` where a
tuple item did not fit the function), and results that come back after the
map ended are kept where nothing else was. Positions are the Job's own
(0, 1, ... in the order items were taken); ``index`` maps them to the
record's when a map re-runs a subset (--resume, --checkpoint).

Not thread-safe by itself: the Job calls it under its lock.
"""
from __future__ import annotations

import bisect
import operator
import time
from typing import Any, Callable

from ...errors import add_note, short_repr
from ...sentinel import NOT_DONE
from ..mapoptions import MapOptions
from .events import ChunkRecord
from .record import FAILED_KEPT, MapRecord
from .rules import absorbed_notes, as_item_error, finish_error, star_hint

_FIRST = operator.itemgetter(0)


class Results:
    """Writes one map's answers in its record (``report``: a MapRecord, or the API's RunReport)."""

    __slots__ = ("report", "index", "func", "options")

    def __init__(self, report: MapRecord, options: MapOptions, func: Callable | None):
        self.report = report
        self.options = options
        self.func = func
        self.index: list[int] | None = None  # position -> report index, when re-running a subset

    def at(self, pos: int) -> int:
        """The record's index of the Job's position ``pos``."""
        return pos if self.index is None else self.index[pos]

    def place(self, rec: ChunkRecord, results: list, failed: int) -> None:
        """A finished chunk: its results at their index, its record kept (``failed`` of its items failed)."""
        r = self.report
        start = rec.start
        end = start + len(results)
        if self.index is None:
            if end > len(r.results):
                r.results.extend([NOT_DONE] * (end - len(r.results)))
            r.results[start:end] = results
        else:
            for k, value in enumerate(results):
                r.results[self.index[start + k]] = value
        if failed:
            rec.status = "failed"
        r.chunks.append(rec)
        r.done += len(results) - failed

    def add_output(self, pos: int, stream: str, text: str) -> None:
        """An item's print() output, kept in item order."""
        bisect.insort(self.report.outputs, (self.at(pos), stream, text), key=_FIRST)

    def reach(self, positions: list[int]) -> None:
        """A stream's record holds a place for each of ``positions`` (items that failed)."""
        if self.index is None:
            results, end = self.report.results, max(positions) + 1
            if end > len(results):
                results.extend([NOT_DONE] * (end - len(results)))

    def lost(self, start: int, count: int) -> None:
        """Finished results of these positions died with their worker: they run again, and it is said."""
        lost = self.report.lost
        for pos in range(start, start + count):
            i = self.at(pos)
            lost[i] = lost.get(i, 0) + 1

    def succeeded_after(self, pos: int, tries: list[BaseException]) -> None:
        """The item at ``pos`` succeeded after ``tries`` failed attempts: each one's error is kept."""
        idx = self.at(pos)
        self.report.attempts[idx] = [as_item_error(idx, e, None) for e in tries]

    def stopped_after(self, attempts: dict[int, list[BaseException]]) -> None:
        """The map ended while these items (by position) waited to run again: their failed attempts are
        kept too, as ``retried`` counted them (a fail-fast map read '6 retried' beside the attempts of
        one item)."""
        r = self.report
        for pos, tries in attempts.items():
            idx = self.at(pos)
            if tries and idx not in r.attempts and idx not in r.errors:
                r.attempts[idx] = [as_item_error(idx, e, None) for e in tries]

    def late(self, start: int, results: list, errors: list) -> None:
        """Results that came back after the map ended (failed, cancelled): they finished, keep them,
        and the errors of items that failed then too (an item on a thread or a dask worker runs on
        after a fail-fast failure: it ran, and the report must not say it never did)."""
        failed = {pos for pos, _ in errors}
        self.report.keep_late([(self.at(start + k), v) for k, v in enumerate(results) if start + k not in failed])
        r = self.report
        for pos, exc in errors:
            idx = self.at(pos)
            if idx < len(r.results) and r.results[idx] is NOT_DONE and idx not in r.errors:
                tries = r.attempts.get(idx)  # its failed attempts, kept when the map stopped
                err = self.error(pos, exc, None, None)
                if tries:  # this was its last attempt: kept with them, as a last attempt is
                    r.attempts[idx] = [*tries, err]

    def error(self, pos: int, exc: BaseException, one: Any, tries: list[BaseException] | None) -> BaseException:
        """Record the error of the item at ``pos`` (``one``: a one-item slice, or None), after
        ``tries`` failed attempts; returns the error as recorded (the first one, if it has one)."""
        r = self.report
        idx = self.at(pos)
        if idx in r.errors:
            return r.errors[idx]
        value = one[0] if one is not None and len(one) else None
        exc = as_item_error(idx, exc, value)
        r.errors[idx] = exc
        kept = r.failed_items
        if one is not None and len(kept) < FAILED_KEPT:
            kept[idx] = value
        if not getattr(exc, "_poolmagic_noted", False):
            what = f"item {idx}" + ("" if one is None else f" (value {short_repr(value)})")
            if tries:  # an attempt that exited or raised KeyboardInterrupt is kept as the last one is
                r.attempts[idx] = [*(as_item_error(idx, e, value) for e in tries), exc]
                add_note(exc, f"poolmagic: {what} failed after {len(tries) + 1} attempts "
                              f"(each attempt's error: {r.where_attempts(idx)}).")
            else:
                add_note(exc, f"poolmagic: {what} failed.")
            hint = star_hint(self.func, self.options, exc, value, r.how_to_star())
            if hint:
                add_note(exc, hint)
            exc._poolmagic_noted = True  # type: ignore[attr-defined]
        return exc

    def count(self, pos: int, is_stream: bool) -> None:
        """The items ended after ``pos`` of them: how many the map had is what its ITERABLE
        yielded (a stream's len() is only a hint: a DataFrame's is its rows; iterating it
        gives its columns)."""
        r = self.report
        if self.index is None and (r.items is None or (is_stream and pos != r.items)):
            r.items = pos
            del r.results[pos:]

    def close(self, status: str, error: BaseException | None, isolated: list, pos: int) -> None:
        """The map ended (``pos`` items taken): its status, end and notes (``isolated``:
        Reruns.isolated); the ``error`` it ends with carries the record."""
        r = self.report
        r.notes.extend(absorbed_notes(r, isolated, self.at))
        r.status = status
        r.t_end = time.perf_counter()
        if r.items is None:
            r.items = pos
        if self.index is None and len(r.results) < r.items:  # a stream that stopped: a place per item taken
            r.results.extend([NOT_DONE] * (r.items - len(r.results)))
        if error is not None:
            finish_error(error, r, self.func)
