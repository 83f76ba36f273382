"""What a Job makes of errors, and what it remembers between maps.

The rules every backend's maps follow, kept out of the Job's state machine:
an item that exits or interrupts becomes a poolmagic error; --keep-going's
failures become one summary error that carries the report; a function
version's time per item is remembered so a re-run cell sizes its chunks at
once; worker output is written to the caller's streams.
"""
from __future__ import annotations

import inspect
import sys
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

from ...errors import ItemExitError, MapFailedError, PoolmapError, add_note, point_at_function, safe_str, short_repr
from ...sentinel import NOT_DONE

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
    lines.append(f"The {r.done} results that finished are kept: {r.where_results()}.")
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


def star_hint(func: Any, options: Any, exc: BaseException, value: Any, how: str = "star=True") -> str | None:
    """A TypeError on a tuple item whose length the function's arity matches: ``how`` says how to unpack it."""
    if options.star or not isinstance(exc, TypeError) or not isinstance(value, tuple):
        return None
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) <= len(value) <= len(positional) and len(value) > 1:
        return (
            f"poolmagic: each item is a tuple of {len(value)} values and the function takes "
            f"{len(positional)} arguments: did you mean {how}, to call f(*item)?"
        )
    return None


def absorbed_notes(r: Any, isolated: list[tuple[int, int, str, type]], at: Callable[[int], int]) -> list[str]:
    """What the results alone would hide, said under the summary: flaky crashes, retried items.

    ``isolated``: chunks re-run item by item after a crash, timeout or memory
    stop (start, count, what happened, its error class); ``at``: a job
    position's index in the report.
    """
    notes = []
    for start, count, what, kind in isolated:
        idx = [at(p) for p in range(start, start + count)]
        if any(isinstance(r.errors.get(i), kind) for i in idx):
            continue  # the culprit did it again and failed, named
        if any(i not in r.errors and (i >= len(r.results) or r.results[i] is NOT_DONE) for i in idx):
            continue  # the map ended before the re-runs did
        notes.append(f"{what}; its items were run again one by one and none did it again: one "
                     f"of them does it only sometimes (results are from the re-runs)")
    if r.lost:
        shown = ", ".join(map(str, sorted(r.lost)[:5])) + (", …" if len(r.lost) > 5 else "")
        n = len(r.lost)
        notes.append(f"{n:,} item{'s were' if n != 1 else ' was'} run again ({shown}): the results of "
                     f"{'their' if n != 1 else 'its'} chunk were lost with a worker that died before "
                     f"sending them; what ran of that chunk (an error to retry?) is not known, and is "
                     f"not counted in retried or {r.where_attempts('i')}")
    ok = [i for i in r.attempts if i not in r.errors]
    if ok:
        shown = ", ".join(map(str, sorted(ok)[:5])) + (", …" if len(ok) > 5 else "")
        notes.append(f"{len(ok):,} item{'s' if len(ok) != 1 else ''} succeeded only after a retry "
                     f"({shown}); each failed attempt's error: {r.where_attempts('i')}")
    return notes


def finish_error(error: BaseException, r: Any, func: Any) -> None:
    """The error a map ends with carries its record and points at the user's code.

    Under --keep-going the summary's traceback is the first failed item's (the
    line that raised); an error of poolmagic's own, or one raised before any
    frame of the user's (``--star`` over an item that is no sequence), points
    at the function, not at the line of poolmagic's that re-raised it.
    """
    attach_report(error, r)
    _say_earlier_unfinished(error, r)
    first = r.errors.get(min(r.errors)) if isinstance(error, MapFailedError) and r.errors else None
    if first is not None and first.__traceback__ is not None:
        error.__traceback__ = first.__traceback__
    elif error.__traceback__ is None:
        point_at_function(error, func)


def _say_earlier_unfinished(error: BaseException, r: Any) -> None:
    """A map stopped at an item's error while items before it had not finished: the plain
    loop would have run those first (and raised theirs, if they fail), so the error says so."""
    idx = next((i for i, e in r.errors.items() if e is error), None)
    if idx is None:
        return
    earlier = [i for i in range(min(idx, len(r.results))) if r.results[i] is NOT_DONE and i not in r.errors]
    if not earlier:
        return
    n = len(earlier)
    shown = ", ".join(map(str, earlier[:5])) + (", …" if n > 5 else "")
    add_note(error, f"poolmagic: the map stopped at this first failure while {n:,} item{'s' if n != 1 else ''} "
                    f"before it ({shown}) had not finished; a plain loop would have run "
                    f"{'them' if n != 1 else 'it'} first. --keep-going runs every item.")
