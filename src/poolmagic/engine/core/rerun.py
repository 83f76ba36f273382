"""What of a map runs again: chunks put back, chunks re-run item by item, items retried.

The Job's queue of work that goes before fresh items (``Job.next_items``
takes from it first), and the bookkeeping of why it runs again:

* a chunk that never ran (its worker left first) goes back in front, whole;
* a chunk re-run item by item, to find the item that kills a worker or does
  not unpickle: its items in front, in order; a crash or a timeout is kept
  (``isolated``) so that the map can say so if no item does it again;
* an item retried under ``--retries`` goes to the back, with the error of each
  earlier attempt kept by position (``attempts``).

Positions are the Job's own (0, 1, ... in the order items were taken). Not
thread-safe by itself: the Job calls it under its lock.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterator

from ..mapoptions import MapOptions


class Reruns:
    """The queue of (start, items) to run again, and each retried item's earlier errors."""

    __slots__ = ("queue", "attempts", "isolated", "_options")

    def __init__(self, options: MapOptions):
        self._options = options
        self.queue: deque[tuple[int, Any]] = deque()
        self.attempts: dict[int, list[BaseException]] = {}  # position -> errors of earlier attempts
        # chunks re-run item by item after a crash, timeout or memory stop: (start, count, what, kind)
        self.isolated: list[tuple[int, int, str, type]] = []

    def __bool__(self) -> bool:
        """Whether anything waits to run again."""
        return bool(self.queue)

    def __len__(self) -> int:
        return len(self.queue)

    def pop(self) -> tuple[int, Any]:
        """The next (start, items) to run again."""
        return self.queue.popleft()

    def front(self, start: int, items: Any) -> None:
        """A chunk that never ran goes back in front, whole."""
        self.queue.appendleft((start, items))

    def singly(self, start: int, items: Any, skip: Any = ()) -> None:
        """Each item of a chunk (but those at offsets in ``skip``) in front, one by one, in order."""
        for k in range(len(items) - 1, -1, -1):
            if k not in skip:
                self.queue.appendleft((start + k, items[k : k + 1]))

    def isolate(self, start: int, items: Any, what: str, kind: type) -> None:
        """A chunk whose worker died (``kind``) runs again item by item; kept to say so at the end."""
        self.isolated.append((start, len(items), what, kind))
        self.singly(start, items)

    def again(self, pos: int, exc: BaseException, one: Any) -> bool:
        """Whether the item at ``pos`` (``one``: a one-item slice) is retried after ``exc``
        (``--retries``, ``--retry-on``): queued at the back, its error kept as an attempt."""
        o = self._options
        if not o.retries:
            return False
        tries = self.attempts.setdefault(pos, [])
        if len(tries) < o.retries and one is not None and (o.retry_on is None or isinstance(exc, o.retry_on)):
            tries.append(exc)
            self.queue.append((pos, one))
            return True
        return False

    def tries(self, pos: int) -> list[BaseException] | None:
        """The errors of the earlier attempts of the item at ``pos`` (None or empty: none)."""
        return self.attempts.get(pos)

    def succeeded(self, start: int, count: int, failed: Any) -> Iterator[tuple[int, list[BaseException]]]:
        """(position, earlier errors) of the items of a chunk that succeeded after a retry."""
        for pos in range(start, start + count):
            tries = self.attempts.get(pos)
            if tries and pos not in failed:
                yield pos, tries
