"""What a backend is given (a Job) and what it must do (the Backend interface).

A Job is one map: a function payload, a source of items, options, and the
RunReport it fills in. It is backend-neutral: the local process backend and a
dask.distributed backend take chunks from the same source and hand results,
errors and timings back through the same three calls (``chunk_done``,
``item_failed``, ``fail``). The caller's thread waits on the job and prints
worker output in item order while results arrive.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from ..errors import MapFailedError, PoolmapError, add_note, point_at_function, short_repr
from ..report import NOT_DONE, ChunkRecord, RunReport
from ..serialize import Payload, code_filenames


# Chunk sizing, the same for every backend: chunks of about TARGET_CHUNK_S,
# never under MIN_CHUNK_S (IPC would dominate), smaller towards the end so the
# workers finish together.
TARGET_CHUNK_S = 0.025
MIN_CHUNK_S = 0.002
MAX_CHUNK = 1_000_000
STREAM_MAX_CHUNK = 32_768  # items taken from a generator at once: read-ahead stays small


class ItemSource:
    """Hands out consecutive items; slices sequences, streams everything else.

    Never materialises a generator: at most one chunk is taken at a time.
    """

    def __init__(self, iterable: Iterable):
        self.seq = iterable if isinstance(iterable, (range, list, tuple)) else None
        self.it = None if self.seq is not None else iter(iterable)
        try:
            self.length: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self.length = None
        self.pos = 0
        self.exhausted = self.length == 0
        self.sample: list = []  # first items of a stream, kept for %poolsize --tune

    SAMPLE_SIZE = 2000

    def items_for_sampling(self) -> Any:
        """Items that can be mapped again: the sequence, or a stream's first items."""
        return self.seq if self.seq is not None else self.sample

    def remaining(self) -> int | None:
        return None if self.length is None else self.length - self.pos

    def take(self, n: int) -> tuple[int, Any] | None:
        if self.exhausted:
            return None
        start = self.pos
        if self.seq is not None:
            items = self.seq[start : start + n]
        else:
            items = list(itertools.islice(self.it, n))
            if len(self.sample) < self.SAMPLE_SIZE:
                self.sample.extend(items[: self.SAMPLE_SIZE - len(self.sample)])
        self.pos += len(items)
        if len(items) < n or (self.length is not None and self.pos >= self.length):
            self.exhausted = True
        if not len(items):
            return None
        return start, items


class Job:
    """One map: what to run, on what, with which options, and its report."""

    _ids = itertools.count(1)

    def __init__(
        self,
        payload: Payload,
        source: ItemSource,
        report: RunReport,
        *,
        star: bool = False,
        chunksize: int | None = None,
        timeout: float | None = None,
        keep_going: bool = False,
        seed: int | None = None,
        max_workers: int | None = None,
        func: Callable | None = None,
    ):
        self.id = next(self._ids)
        self.func = func
        self._filenames: dict[tuple[str, int], str] | None = None
        self.payload = payload
        self.source = source
        self.report = report
        self.star = star
        self.chunksize = 1 if timeout is not None and chunksize is None else chunksize
        self.timeout = timeout
        self.keep_going = keep_going
        self.seed = seed
        self.max_workers = max_workers
        self.retry: deque[tuple[int, Any]] = deque()
        self.inflight = 0
        self.cond = threading.Condition()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        # per-item timing estimate (sum of busy seconds, items)
        self.busy = 0.0
        self.timed_items = 0
        # item-order printing: outputs wait until every earlier item is done
        self._pending_out: list[tuple[int, int, str, str]] = []
        self._out_seq = itertools.count()
        self._done_ranges: dict[int, int] = {}
        self._prefix = 0
        if source.length is not None:
            report.results = [NOT_DONE] * source.length
            report.items = source.length

    def filename_of(self, name: str, firstlineno: int) -> str | None:
        """Where the mapped function's code named ``name`` lives (for tracebacks)."""
        if self._filenames is None:
            self._filenames = code_filenames(self.func) if self.func is not None else {}
        return self._filenames.get((name, firstlineno))

    # ---------------------------------------------------------- scheduling side
    @property
    def active(self) -> bool:
        return not self.finished.is_set()

    def has_work(self) -> bool:
        return self.active and (bool(self.retry) or not self.source.exhausted)

    def per_item_s(self) -> float | None:
        return self.busy / self.timed_items if self.timed_items else None

    def chunk_size(self, workers: int) -> int:
        """How many items the next chunk should hold, from the measured time per item."""
        if self.chunksize:
            return self.chunksize
        t = self.per_item_s()
        if t is None:
            return 1  # probe: the first items tell how long an item takes
        t = max(t, 1e-8)
        lo, hi = max(1, int(MIN_CHUNK_S / t)), max(1, int(TARGET_CHUNK_S / t))
        rem = self.source.remaining()
        if rem is None:  # a stream: bound what is pulled ahead of the results
            size = min(hi, STREAM_MAX_CHUNK)
        else:
            size = max(lo, min(hi, math.ceil(rem / (2 * workers))))
        return max(1, min(size, MAX_CHUNK))

    def next_items(self, size: int) -> tuple[int, Any] | None:
        """The next chunk: a retried one first, else fresh items from the source."""
        if self.retry:
            self.inflight += 1
            return self.retry.popleft()
        try:
            got = self.source.take(size)
        except BaseException as exc:
            add_note(exc, f"poolmagic: raised by the ITERABLE while producing item {self.source.pos}.")
            self.source.exhausted = True
            self.fail(exc)
            return None
        if got is not None:
            self.inflight += 1
        self.maybe_finish()
        return got

    def requeue(self, start: int, items: Any) -> None:
        """Put a chunk that was never run back in front of the queue."""
        self.inflight -= 1
        if self.active:
            self.retry.appendleft((start, items))

    def retry_singly(self, start: int, items: Any) -> None:
        """Re-run a chunk item by item (to find which of its items kills a worker)."""
        self.inflight -= 1
        if self.active:
            for k in range(len(items) - 1, -1, -1):
                self.retry.appendleft((start + k, items[k : k + 1]))

    def drop_chunk(self) -> None:
        """A chunk of this (cancelled or failed) job will never report."""
        with self.cond:
            self.inflight -= 1

    def split_failed(self, start: int, items: Any, bad: dict[int, BaseException]) -> None:
        """Some items of a chunk cannot be sent: fail those, re-run the rest one by one."""
        with self.cond:
            self.inflight -= 1
            for k, exc in sorted(bad.items()):
                self._record_error(start + k, exc, None)
            if not self.keep_going:
                self._fail_locked(bad[min(bad)])
                return
            for k in range(len(items) - 1, -1, -1):
                if k not in bad:
                    self.retry.appendleft((start + k, items[k : k + 1]))
        self.maybe_finish()

    # ---------------------------------------------------------- results side
    def chunk_done(
        self,
        rec: ChunkRecord,
        results: list,
        outputs: list,
        errors: list[tuple[int, BaseException]],
        items: Any,
    ) -> None:
        """Place a finished chunk's results; errors arrive already rebuilt."""
        r = self.report
        with self.cond:
            self.inflight -= 1
            if not self.active:
                return
            end = rec.start + len(results)
            if end > len(r.results):
                r.results.extend([NOT_DONE] * (end - len(r.results)))
            r.results[rec.start : end] = results
            r.chunks.append(rec)
            r.done += len(results) - len(errors)
            self.busy += rec.t1 - rec.t0
            self.timed_items += len(results)
            for idx, stream, text in outputs:
                heapq.heappush(self._pending_out, (idx, next(self._out_seq), stream, text))
                bisect.insort(r.outputs, (idx, stream, text), key=_first)  # item order
            self._done_ranges[rec.start] = rec.start + rec.count
            while self._prefix in self._done_ranges:
                self._prefix = self._done_ranges.pop(self._prefix)
            for idx, exc in errors:
                self._record_error(idx, exc, items[idx - rec.start] if items is not None else None)
            if not self.keep_going and errors:
                self._fail_locked(errors[0][1])
            self.cond.notify_all()
        self.maybe_finish()

    def item_failed(self, indices: list[int], exc: BaseException, items: Any = None, start: int = 0) -> None:
        """Items that produced no result (crash, timeout, unpicklable argument)."""
        with self.cond:
            self.inflight -= 1
            if not self.active:
                return
            for idx in indices:
                value = items[idx - start] if items is not None else None
                self._record_error(idx, exc, value)
            end = max(indices) + 1
            if end > len(self.report.results):
                self.report.results.extend([NOT_DONE] * (end - len(self.report.results)))
            if not self.keep_going:
                self._fail_locked(exc)
            self.cond.notify_all()
        self.maybe_finish()

    def _record_error(self, idx: int, exc: BaseException, value: Any) -> None:
        if idx in self.report.errors:
            return
        self.report.errors[idx] = exc
        if not getattr(exc, "_poolmagic_noted", False):
            what = f"item {idx}" + ("" if value is None else f" ({short_repr(value)})")
            add_note(exc, f"poolmagic: {what} failed.")
            exc._poolmagic_noted = True  # type: ignore[attr-defined]

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
            if self.active and self.source.exhausted and not self.retry and self.inflight <= 0:
                r = self.report
                if r.items is None:
                    r.items = self.source.pos
                    del r.results[self.source.pos :]
                if r.errors:
                    self.error = _summary_error(r)
                    self._close("failed")
                else:
                    self._close("done")

    def _close(self, status: str) -> None:
        r = self.report
        r.status = status
        r.t_end = time.perf_counter()
        if r.items is None:
            r.items = self.source.pos
        if self.error is not None:
            _attach_report(self.error, r)
            if isinstance(self.error, PoolmapError) and self.error.__traceback__ is None:
                point_at_function(self.error, self.func)
        self.finished.set()
        self.cond.notify_all()

    # ---------------------------------------------------------- caller side
    def take_printable(self, final: bool = False) -> list[tuple[int, int, str, str]]:
        """Outputs whose item and every earlier item are done (all of them if final)."""
        out = []
        heap = self._pending_out
        while heap and (final or heap[0][0] < self._prefix):
            out.append(heapq.heappop(heap))
        return out

    def wait(self, timeout: float | None = None, on_output: Callable | None = None) -> bool:
        """Block until done, writing worker output in item order; True when finished."""
        __tracebackhide__ = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.cond:
                if not self.finished.is_set() and not self.take_ready():
                    left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                    if left > 0:
                        self.cond.wait(left)
                done = self.finished.is_set()
                batch = self.take_printable(final=done)
            if on_output is not None and batch:
                on_output(batch)
            if done:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def take_ready(self) -> bool:
        heap = self._pending_out
        return bool(heap) and heap[0][0] < self._prefix


class ItemTimes:
    """Time per item of each function version's last map (the last 64 versions).

    A cell that is run again sizes its chunks at once instead of probing with
    one-item chunks: 4 no-op items go as one chunk, not four round trips.
    """

    def __init__(self, size: int = 64):
        self._size = size
        self._known: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def recall(self, job: Job) -> None:
        known = self._known.get(job.payload.key)
        if known is not None:
            job.busy, job.timed_items = known

    def remember(self, job: Job) -> None:
        if job.timed_items:
            self._known[job.payload.key] = (job.busy, job.timed_items)
            self._known.move_to_end(job.payload.key)
            if len(self._known) > self._size:
                self._known.popitem(last=False)


def _first(t: tuple) -> Any:
    return t[0]


def write_outputs(batch: list[tuple[int, int, str, str]]) -> None:
    """Write captured worker output to this thread's stdout/stderr."""
    for _idx, _seq, stream, text in batch:
        (sys.stderr if stream == "stderr" else sys.stdout).write(text)
    sys.stdout.flush()


def _summary_error(r: RunReport) -> BaseException:
    n = len(r.errors)
    first = sorted(r.errors)[:5]
    lines = [f"{n} of {r.items} items failed:"]
    for i in first:
        e = r.errors[i]
        lines.append(f"  item {i}: {type(e).__name__}: {e}")
    if n > len(first):
        lines.append(f"  ... and {n - len(first)} more (all in .errors)")
    lines.append(f"The {r.done} results that finished are kept: _poolmap.results (or .report.results).")
    return MapFailedError("\n".join(lines), dict(r.errors))


def _attach_report(exc: BaseException, r: RunReport) -> None:
    try:
        exc.poolmap_report = r  # type: ignore[attr-defined]
        if isinstance(exc, PoolmapError):
            exc.report = r
    except (AttributeError, TypeError):
        pass


class Backend(ABC):
    """Runs Jobs on some set of workers. Thread-safe; never blocks the caller long."""

    #: shown by %poolsize, e.g. "local processes (forkserver)"
    description: str = "?"

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of workers the backend aims to keep."""

    @abstractmethod
    def start(self) -> None:
        """Begin warming up workers (returns at once)."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Start running ``job``; results flow back through the job."""

    @abstractmethod
    def cancel(self, job: Job, wait: float = 1.0) -> None:
        """Stop ``job`` now: kill what runs its items, keep what finished."""

    @abstractmethod
    def resize(self, n: int) -> None:
        """Aim for ``n`` workers from the next chunk on."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every worker and helper process; idempotent."""

    @abstractmethod
    def worker_pids(self) -> list[int]:
        """Process ids of live workers (for status and leak checks)."""

    @property
    def state(self) -> str:
        """"warm" (workers up), "starting" or "cold" (nothing started yet)."""
        return "warm" if self.worker_pids() else "cold"
