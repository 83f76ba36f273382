"""What a display of a running map needs to know, learned from the Job's events.

``Progress`` is an observer (events.py): it counts finished and failed items
as chunks report, including items of long chunks that are still running,
without ever asking the engine. Displays read it on their own thread and
render it (display.py); ``changed`` wakes a display that waits for news.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from .engine.core.events import ChunkFinished, ChunkStarted, ItemsFailed, ItemsProgress, MapFinished, Waiting


class Progress:
    """Counts of one map, updated by its events (on the backend's thread)."""

    def __init__(self, total: int | None, workers: int):
        self.total = total
        self.workers = workers
        self.t_start = time.perf_counter()
        self.t_end: float | None = None
        self.done = 0  # items of finished chunks (failed ones included)
        self.failed = 0
        self.partial: dict[int, int] = {}  # running chunk's first item -> items finished
        self.started = 0  # chunks sent
        self.status = "running"
        self.error: BaseException | None = None
        self.waiting: str | None = None  # why no worker runs the map's items now (events.Waiting)
        self.changed = threading.Event()

    def __call__(self, event: Any) -> None:
        kind = type(event)
        if kind is ChunkFinished:
            self.partial.pop(event.record.start, None)
            self.done += event.record.count - event.retried  # a retried item finishes later
            self.failed += event.failed - event.retried
        elif kind is ItemsProgress:
            self.partial[event.start] = event.done
        elif kind is ItemsFailed:
            for i in event.indices:
                self.partial.pop(i, None)
            self.done += len(event.indices) - event.retried
            self.failed += len(event.indices) - event.retried
        elif kind is ChunkStarted:
            self.started += 1
        elif kind is Waiting:
            self.waiting = event.why
        elif kind is MapFinished:
            self.status, self.error = event.status, event.error
            self.t_end = time.perf_counter()
            self.waiting = None
        self.changed.set()

    @property
    def finished(self) -> int:
        return self.done + sum(self.partial.values())

    @property
    def elapsed(self) -> float:
        return (self.t_end or time.perf_counter()) - self.t_start

    @property
    def rate(self) -> float:
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.total is None or not self.finished or self.status != "running":
            return None
        return (self.total - self.finished) / max(self.rate, 1e-9)

    @property
    def starting(self) -> bool:
        """No item has finished yet: the workers may still be starting."""
        return self.finished == 0 and self.status == "running"
