"""Where a map's items come from, without running user code on the manager thread.

``range``, ``list`` and ``tuple`` are sliced by the backend directly: slicing
them runs no user code. Anything else (a generator, a queue reader, a sqlite
cursor, a DataFrame's rows) is read by the *caller's* thread — the one that
waits for the map, or a feeder thread for an async map — into a bounded
buffer the backend takes chunks from. A blocking or slow iterable then stalls
nothing but its own map: the pool stays responsive, an interrupt stops the
read, and iterables tied to their thread (sqlite3) work.
"""
from __future__ import annotations

import enum
import itertools
import sys
import threading
import time
import types
from collections import deque
from typing import Any, Callable, Iterable

from ...errors import BadInputError, add_note

SEQUENCES = (range, list, tuple)
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset, range)
MAX_READ_AHEAD = 1 << 17  # items buffered from a stream at most
FAST_RATE = 100_000  # items/s above which a stream is read in batches


def _length(iterable: Any) -> int | None:
    """How many items iterating ``iterable`` gives, as far as len() says (None: it does not).

    A DataFrame's len() is its rows, but iterating it gives its column names (pandas,
    polars, modin, dask alike): a map over 3 columns of a 10-row frame that failed
    early read "3/10 items", kept 10 places, and --resume refused "the ITERABLE now
    has 3 items". A stream's len() stays a hint (Results.count: what it yields counts).
    """
    try:
        if type(iterable).__name__ == "DataFrame" and hasattr(iterable, "columns"):
            return len(iterable.columns)
        return len(iterable)
    except TypeError:
        return None


def _refillable(x: Any) -> bool:
    """``x`` is an object a stream could fill again and yield anew: a list, dict, set, bytearray,
    an array (not a numpy scalar: np.True_ is one object however often a bool array yields it),
    a DataFrame or Series, an instance with attributes. Not a value that cannot change (int, str,
    tuple, None, a numpy scalar, an enum member) nor a class, function or module."""
    if isinstance(x, (list, dict, set, bytearray, deque)):
        return True
    if isinstance(x, _IMMUTABLE) or isinstance(x, (type, types.FunctionType, types.BuiltinFunctionType,
                                                   types.ModuleType, enum.Enum)):
        return False
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.generic):
        return False
    return getattr(x, "ndim", 1) != 0 and (hasattr(x, "__dict__") or hasattr(x, "__array__"))


def _size(x: Any) -> int:
    """About how many bytes ``x`` holds: an array's (or a Series') ``nbytes``, a DataFrame's
    columns (not deep: no walk of their objects), else ``sys.getsizeof`` (not deep either)."""
    try:
        n = getattr(x, "nbytes", None)
        if type(n) is int:
            return n
        usage = getattr(x, "memory_usage", None) if type(x).__name__ == "DataFrame" else None
        if callable(usage):
            return int(usage(deep=False).sum())
        return sys.getsizeof(x)
    except Exception:  # a property that raises: count it as small
        return 0


class ItemSource:
    """Hands out consecutive items: ``take`` on the manager side, ``feed`` on the caller's."""

    SAMPLE_SIZE = 2000
    SAMPLE_BYTES = 64 << 20  # and no more than this of them: a stream of 20 MB arrays kept 2000 alive

    def __init__(self, iterable: Iterable):
        self.seq = iterable if type(iterable) in SEQUENCES else None
        self.it = None if self.seq is not None else iter(iterable)
        if type(iterable) is itertools.groupby:  # each group as it is read: advancing empties it
            self.it = ((key, iter(list(group))) for key, group in self.it)
        self.length: int | None = _length(iterable)
        self.pos = 0  # items handed out
        self.read = 0  # items read from the stream
        # nothing more will ever be handed out (a stream's len() is only a hint: a DataFrame's
        # is its rows, and one without rows still yields its columns)
        self.exhausted = self.length == 0 and self.seq is not None
        self.stream_done = self.seq is not None  # the iterator has ended (or failed)
        self.sample: list = []  # first items of a stream, kept for %poolsize --tune
        self._sample_bytes = 0  # their size, as far as _size tells
        # items may be one object yielded again (not ints, str, tuples ...; not itertools.repeat's, unchanged)
        self._watch: Any = False if type(iterable) is itertools.repeat else None  # True, or a tuple's places
        # tuples are watched only from an enumerate: zip(repeat(model), xs) and product(datasets, params)
        # repeat one unchanged object in a place on purpose
        self._enumerate = type(iterable) is enumerate
        self._last: Any = None  # the last item read, while _watch
        self.error: BaseException | None = None  # what the stream raised, if it did
        self._buffer: deque = deque()
        self._lock = threading.Lock()
        self.want = 1  # how many items the backend would like buffered
        self._fast = False  # the stream proved fast: read it in batches
        self.on_low: Callable[[], None] | None = None  # the buffer ran low (wake the feeder)
        self.on_items: Callable[[], None] | None = None  # items arrived (wake the backend)

    @property
    def is_stream(self) -> bool:
        return self.seq is None

    def items_for_sampling(self) -> Any:
        """Items that can be mapped again: the sequence, or a stream's first items."""
        return self.seq if self.seq is not None else self.sample

    def remaining(self) -> int | None:
        return None if self.length is None else self.length - self.pos

    def has_items(self) -> bool:
        """Items can be taken now (a stream may be waiting for its feeder)."""
        return not self.exhausted and (self.seq is not None or bool(self._buffer))

    # ------------------------------------------------------------ backend side
    def take(self, n: int) -> tuple[int, Any] | None:
        """Up to ``n`` next items as (first index, items), or None if none are ready."""
        if self.exhausted:
            return None
        start = self.pos
        if self.seq is not None:
            items = self.seq[start : start + n]
            self.pos += len(items)
            if len(items) < n or (self.length is not None and self.pos >= self.length):
                self.exhausted = True
            return (start, items) if len(items) else None
        with self._lock:
            buf = self._buffer
            k = min(n, len(buf))
            items = [buf.popleft() for _ in range(k)]
            self.pos += k
            if not buf and self.stream_done:
                self.exhausted = True
            low = not self.stream_done and len(buf) * 2 < self.want
        if low and self.on_low is not None:
            self.on_low()
        return (start, items) if items else None

    def set_want(self, n: int) -> None:
        self.want = max(1, min(n, MAX_READ_AHEAD))

    # ------------------------------------------------------------ caller side
    def needs_feed(self) -> bool:
        return not self.stream_done and len(self._buffer) * 2 < self.want

    def feed(self) -> BaseException | None:
        """Read items until the buffer holds what the backend wants (caller's thread).

        A slow stream is read item by item, each handed over as soon as it
        exists (a producer that waits for results must not wait for a batch);
        once the stream proves fast (over FAST_RATE items/s) it is read in C-speed
        batches. Returns the exception the iterable raised, noted with the
        position of the item it was producing; KeyboardInterrupt propagates.
        """
        __tracebackhide__ = True
        error = None
        buf = self._buffer
        while not self.stream_done and len(buf) < self.want:
            n = self.want - len(buf)
            before = self.read
            t = time.perf_counter()
            got: list = []
            try:
                if self._fast:
                    try:
                        got.extend(itertools.islice(self.it, n))  # type: ignore[arg-type]
                        if self._watch is not False:
                            got = self._once_each(got)
                    finally:
                        with self._lock:
                            buf.extend(got)
                            self.read += len(got)
                else:
                    n = min(n, 64)
                    for x in itertools.islice(self.it, n):  # type: ignore[arg-type]
                        if self._watch is not False:
                            self._once_each([x])
                        got.append(x)
                        buf.append(x)  # the backend may take it at once
                        self.read += 1
                        if self.on_items is not None:
                            self.on_items()
            except Exception as exc:
                add_note(exc, f"poolmagic: raised by the ITERABLE while producing item {self.read}.")
                error = exc
            count = self.read - before
            self._fast = count >= 16 and count / max(time.perf_counter() - t, 1e-9) > FAST_RATE
            if len(self.sample) < self.SAMPLE_SIZE and self._sample_bytes < self.SAMPLE_BYTES:
                self._keep_sample(got)
            with self._lock:
                if error is not None:  # set before "exhausted": a map that sees the one must see the other
                    self.error = error  # the map must end failed with it, never "done"
                if error is not None or count < n:
                    self.stream_done = True
                    self._last = None
                    if not buf:
                        self.exhausted = True
            if self.on_items is not None:
                self.on_items()
            if error is not None:
                break
        return error

    def _keep_sample(self, got: list) -> None:
        """Keep the first of ``got`` for --tune, up to SAMPLE_SIZE items and SAMPLE_BYTES (at least one).

        The sample lives as long as the pool remembers its last map: items of 20 MB kept
        2000 at a time held 40 GB, where a loop over the stream holds one.
        """
        for x in got[: self.SAMPLE_SIZE - len(self.sample)]:
            size = _size(x)
            if self.sample and self._sample_bytes + size > self.SAMPLE_BYTES:
                self._sample_bytes = self.SAMPLE_BYTES  # full: sample no more
                return
            self.sample.append(x)
            self._sample_bytes += size

    def _once_each(self, got: list) -> list:
        """``got``, checked: an item must not be the object the item before it was (nor, for
        ``enumerate``'s pairs, hold the object the pair before held).

        A stream that fills one buffer and yields it again for each item works in a
        loop, which calls the function before the next item is made; read ahead of
        the workers, every buffered item is that one object, sent (or, on threads,
        run) with its later contents. Such a stream is refused at the repeat; the
        items before it keep their place. Streams of ints, str, tuples and the like
        (immutable: a repeat is the same value) are not watched, nor tuples but
        enumerate's: zip(repeat(model), xs) repeats one unchanged object on purpose.
        """
        if self._watch is None and got:
            first = got[0]
            if type(first) is tuple:  # enumerate's (i, buffer): its second place, when mutable
                self._watch = (1,) if self._enumerate and len(first) == 2 and _refillable(first[1]) else False
            else:
                self._watch = _refillable(first)
        watch = self._watch
        if not watch:
            return got
        last = self._last
        for k, x in enumerate(got):
            if watch is True:
                repeat = x is last
            else:
                repeat = (type(x) is tuple and type(last) is tuple
                          and any(j < len(x) and j < len(last) and x[j] is last[j] for j in watch))
            if repeat:
                self._last = None
                del got[k:]  # what came before stays read
                t = type(x)
                kind = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
                raise BadInputError(
                    f"the ITERABLE yielded item {self.read + k} as the very object it yielded for item "
                    f"{self.read + k - 1} (a {kind}{'' if watch is True else ' holding it'}): items are read "
                    f"ahead of the workers, so one object the ITERABLE changes and yields again would reach them "
                    f"with its later contents, unlike a loop's. Yield a copy for each item (yield buf.copy()); if "
                    f"the object does not change (a cached value), map a list of the items instead ([x] * n)")
            last = x
        self._last = last
        return got

    def close(self) -> None:
        """Drop buffered items (the map ended early)."""
        with self._lock:
            self._buffer.clear()
            self.stream_done = self.exhausted = True
