"""Worker output printed in item order, as a plain loop would print it.

Each item's captured print() output waits until the item and every earlier
item are answered (done, failed for good), then the caller's thread prints
it. Positions are the Job's own (0, 1, ... in the order items were taken).
Not thread-safe by itself: the Job calls it under its lock.
"""
from __future__ import annotations

import heapq
import itertools

Output = tuple[int, int, str, str]  # (position, arrival, "stdout" or "stderr", text)


class OutputOrder:
    """Outputs waiting for earlier items, and the prefix of positions answered so far."""

    __slots__ = ("_pending", "_seq", "_done_ranges", "_prefix")

    def __init__(self) -> None:
        self._pending: list[Output] = []  # a heap: by position, then arrival
        self._seq = itertools.count()
        self._done_ranges: dict[int, int] = {}
        self._prefix = 0  # every position below it is answered

    def add(self, pos: int, stream: str, text: str) -> None:
        heapq.heappush(self._pending, (pos, next(self._seq), stream, text))

    def pending(self) -> bool:
        """Whether any output waits (printable or not)."""
        return bool(self._pending)

    def ready(self) -> bool:
        """Whether some output can be printed now."""
        heap = self._pending
        return bool(heap) and heap[0][0] < self._prefix

    def take(self, final: bool = False) -> list[Output]:
        """Outputs whose item and every earlier item are done (all of them if final)."""
        out = []
        heap = self._pending
        while heap and (final or heap[0][0] < self._prefix):
            out.append(heapq.heappop(heap))
        return out

    def done(self, start: int, count: int) -> None:
        """Positions start..start+count-1 are answered: output up to them may print."""
        self._done_ranges[start] = start + count
        while self._prefix in self._done_ranges:
            self._prefix = self._done_ranges.pop(self._prefix)

    def done_except(self, start: int, count: int, skip: set) -> None:
        """``done`` for a chunk, but not its positions in ``skip`` (queued again)."""
        if not skip:
            self.done(start, count)
            return
        run = start
        for pos in range(start, start + count + 1):
            if pos in skip or pos == start + count:
                if pos > run:
                    self.done(run, pos - run)
                run = pos + 1
