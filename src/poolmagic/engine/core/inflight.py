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
        return list(range(self.start, self.start + len(self.items)))

    def describe(self) -> str:
        n = len(self.items)
        if n == 1:
            return f"item {self.start} ({short_repr(self.items[0])})"
        return f"items {self.start}–{self.start + n - 1}"
