"""A chunk in flight: items ``start .. start+len(items)-1`` of one job, sent to one worker.

Every backend's record of what it sent (a local worker's queue, a dask task)
is, or extends, this class: the failure policy (failures.py) reads only these
fields.
"""
from __future__ import annotations

import time
from typing import Any

from ...errors import short_repr


class Chunk:
    """Items ``start .. start+len(items)-1`` of one job, sent to one worker."""

    __slots__ = ("seq", "job", "start", "items", "cancelled", "t_sent", "quiet")

    def __init__(self, seq: int, job: Any, start: int, items: Any, quiet: bool = False):
        self.seq, self.job, self.start, self.items = seq, job, start, items
        self.quiet = quiet  # nothing more goes to its worker until it is answered (local backend)
        self.cancelled = False  # its job ended while it was queued behind another chunk
        self.t_sent = time.perf_counter()

    @property
    def indices(self) -> list[int]:
        """The job's positions of its items (what the Job's answers take)."""
        return list(range(self.start, self.start + len(self.items)))

    def item_indices(self) -> list[int]:
        """Its items' indices in the ITERABLE, which the user sees: a map that re-runs a subset
        (--resume, --checkpoint) runs them at other positions of its own."""
        at = self.job.results.at
        return [at(pos) for pos in range(self.start, self.start + len(self.items))]

    def describe(self) -> str:
        idx = self.item_indices()
        if len(idx) == 1:
            return f"item {idx[0]} ({short_repr(self.items[0])})"
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return f"items {idx[0]}–{idx[-1]}"
        return "items " + ", ".join(map(str, idx[:5])) + (", …" if len(idx) > 5 else "")
