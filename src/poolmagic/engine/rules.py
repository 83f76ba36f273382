"""What a Job makes of errors, and what it remembers between maps.

The rules every backend's maps follow, kept out of the Job's state machine:
an item that exits or interrupts becomes a poolmagic error; --keep-going's
failures become one summary error that carries the report; a function
version's time per item is remembered so a re-run cell sizes its chunks at
once; worker output is written to the caller's streams.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..errors import ItemExitError, MapFailedError, PoolmapError, safe_str, short_repr

if TYPE_CHECKING:
    from .job import Job


def as_item_error(idx: int, exc: BaseException, value: Any) -> BaseException:
    """sys.exit() or a KeyboardInterrupt raised by an item becomes a poolmagic error.

    Re-raised as is, SystemExit would end the caller's script with status 0 and
    KeyboardInterrupt would read as an interrupt of the kernel.
    """
    if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return exc
    what = f"item {idx}" + ("" if value is None else f" ({short_repr(value)})")
    if isinstance(exc, SystemExit):
        msg = f"{what} called sys.exit({'' if exc.code is None else repr(exc.code)}) in its worker; a mapped function must return or raise, not exit"
    else:
        msg = f"{what} raised KeyboardInterrupt in its worker (not an interrupt of this kernel)"
    new = ItemExitError(msg)
    new.__cause__ = exc
    return new.with_traceback(exc.__traceback__)


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

    def keep_active(self, jobs: list[Job]) -> list[Job]:
        """The jobs still running; those that ended are remembered (every backend's sweep)."""
        keep = []
        for j in jobs:
            if j.active:
                keep.append(j)
            else:
                self.remember(j)
        return keep

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


def summary_error(r: Any) -> BaseException:
    n = len(r.errors)
    first = sorted(r.errors)[:5]
    lines = [f"{n} of {r.items} items failed:"]
    for i in first:
        e = r.errors[i]
        lines.append(f"  item {i}: {type(e).__name__}: {_safe(e)}")
    if n > len(first):
        lines.append(f"  ... and {n - len(first)} more (all in .errors)")
    lines.append(f"The {r.done} results that finished are kept: _poolmap.results (or .report.results).")
    return MapFailedError("\n".join(lines), dict(r.errors))


def _safe(e: BaseException) -> str:
    return safe_str(e)


def attach_report(exc: BaseException, r: Any) -> None:
    try:
        exc.poolmap_report = r  # type: ignore[attr-defined]
        if isinstance(exc, PoolmapError):
            exc.report = r
    except (AttributeError, TypeError):
        pass
