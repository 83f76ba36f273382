"""Which map a free worker serves next, and the window of chunks each worker holds.

The same policy on every backend: maps take turns (round robin) for each
worker that has room in its window, a map limited to ``-n W`` workers is
only served by the first W, and a chunk is timed item by item only when its
items are long enough for the timing not to cost more than it tells.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import Job

WINDOW = 2  # chunks in flight per worker: one running, one ready behind it
TIMED_ABOVE_S = 10e-6  # per-item timing costs ~0.1 µs: only for items longer than this
# Chunk sizing, the same for every backend: chunks of about TARGET_CHUNK_S,
# never under MIN_CHUNK_S (IPC would dominate), smaller towards the end so the
# workers finish together.
TARGET_CHUNK_S = 0.025
MIN_CHUNK_S = 0.002
MAX_CHUNK = 1_000_000
STREAM_MAX_CHUNK = 32_768  # items taken from a generator at once: read-ahead stays small


class RoundRobin:
    """The maps take turns: each pick starts after the map picked last."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, jobs: list[Job], rank: int) -> Job | None:
        """The next map with work that the worker of rank ``rank`` (0, 1, ...) may serve."""
        n = len(jobs)
        for k in range(n):
            job = jobs[(self._next + k) % n]
            w = job.options.workers
            if job.has_work() and (w is None or rank < w):
                self._next = (self._next + k + 1) % n
                return job
        return None


def timed(job: Job) -> bool:
    """Whether the next chunk of ``job`` times each item (unknown items are timed)."""
    t = job.per_item_s()
    return t is None or t >= TIMED_ABOVE_S


def workers_for(job: Job, size: int) -> int:
    """The workers ``job`` runs on: its ``-n W``, else the pool's ``size``."""
    return job.options.workers or size


def chunk_size(per_item_s: float | None, remaining: int | None, workers: int) -> int:
    """How many items the next chunk should hold, from the measured time per item.

    ``remaining``: items not yet taken (None: a stream, whose end is unknown).
    """
    if per_item_s is None:
        return 1  # probe: the first items tell how long an item takes
    t = max(per_item_s, 1e-8)
    lo, hi = max(1, int(MIN_CHUNK_S / t)), max(1, int(TARGET_CHUNK_S / t))
    if remaining is None:  # a stream: bound what is pulled ahead of the results
        size = min(hi, STREAM_MAX_CHUNK)
    else:
        size = max(lo, min(hi, math.ceil(remaining / (2 * workers))))
    return max(1, min(size, MAX_CHUNK))
