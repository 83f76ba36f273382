"""The engine's own record of a map: what the Job writes as chunks are answered.

The API's RunReport (report.py) extends it with what the user reads: the
function's name, the pool, figures, a timeline, ``rerun()``, and the words
that point at where things are kept (``_poolmap.attempts[i]`` in a notebook).
The engine writes only these fields, and asks the record for those words.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ...sentinel import NOT_DONE
from .events import ChunkRecord

FAILED_KEPT = 100  # failed items whose values a record keeps, for rerun() of stream items


@dataclass
class MapRecord:
    """Results in input order, errors by index, chunks, output and status of one map."""

    items: int | None = None  # how many (None: a stream not yet exhausted)
    results: list = field(default_factory=list)  # NOT_DONE where an item has no result
    errors: dict[int, BaseException] = field(default_factory=dict)
    chunks: list[ChunkRecord] = field(default_factory=list)
    outputs: list[tuple[int, str, str]] = field(default_factory=list)  # (index, stream, text), item order
    status: str = "running"  # "done", "failed", "cancelled"
    t_start: float = field(default_factory=time.perf_counter)
    t_end: float | None = None
    done: int = 0  # items that succeeded
    retried: int = 0  # attempts run again (--retries)
    attempts: dict[int, list[BaseException]] = field(default_factory=dict)  # index -> each attempt's error
    # index -> chunks of the item that finished but whose results were lost with their worker (a
    # dask worker holds results until they are fetched): run again, not in retried/attempts. The
    # item may not have run in such a chunk (a chunk stops at its first failure without --keep-going)
    lost: dict[int, int] = field(default_factory=dict)
    lost_on: set[int] = field(default_factory=set)  # workers whose chunk never came back (killed, crashed)
    notes: list[str] = field(default_factory=list)  # said under the summary
    # a stream the map stopped reading before its end (an interrupt, a failure, the ITERABLE
    # raised): more items may follow the last it took, and --resume may run them too
    unread: bool = False
    failed_items: dict[int, Any] = field(default_factory=dict, repr=False)  # the first FAILED_KEPT failed items

    def keep_late(self, values: list[tuple[int, Any]]) -> None:
        """Results (index, value) that came back after the map ended: they finished, keep them
        where nothing else was recorded."""
        for idx, value in values:
            if value is not NOT_DONE and idx < len(self.results) and self.results[idx] is NOT_DONE \
                    and idx not in self.errors:
                self.results[idx] = value
                self.done += 1

    # ------------------------------------------------ the words that say where things are kept
    def where_attempts(self, index: int | str) -> str:
        """Where each failed attempt's error of item ``index`` is kept."""
        return f"record.attempts[{index}]"

    def where_results(self) -> str:
        """Where the results that finished are kept, when a map fails."""
        return "record.results"

    def how_to_star(self) -> str:
        """How to call the function with each tuple item unpacked."""
        return "star=True"
