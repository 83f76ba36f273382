"""Running one chunk of items: the loop every backend's worker uses.

``run_chunk`` is independent of how the chunk arrived, so a local worker and
a dask task run chunks exactly alike: print() captured per item, exceptions
packed with their frames, per-item timing and seeding where asked, progress
reported from long chunks.
"""
from __future__ import annotations

import io
import itertools
import os
import sys
import time

from .. import errors as _errors
from ..sentinel import NOT_DONE
from . import protocol as P
from . import seeds

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Capture(io.TextIOBase):
    """A stdout/stderr stand-in that files each write under the current item."""

    def __init__(self, name: str, records: list, locate):
        self.name = name
        self._records = records
        self._locate = locate

    def write(self, s: str) -> int:
        if s:
            idx = self._locate()
            rec = self._records
            if rec and rec[-1][0] == idx and rec[-1][1] == self.name:
                rec[-1] = (idx, self.name, rec[-1][2] + s)
            else:
                rec.append((idx, self.name, s))
        return len(s)

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    def isatty(self) -> bool:
        return False


def run_chunk(
    fn, items, start: int, *, star: bool = False, timed: bool = False, keep_going: bool = False,
    seed: int | None = None, progress=None, indices=None,
) -> tuple[list, float, float, list | None, list, list]:
    """Run ``fn`` over one chunk: (results, t0, t1, item times, output records, packed errors).

    Independent of how the chunk arrived, so any backend's worker (a dask
    task, say) runs chunks exactly as the local workers do. ``progress(done)``
    is called every PROGRESS_S while a timed chunk runs. ``indices``: each
    item's position in the user's ITERABLE when it is not ``start + k`` (a
    re-run of some items); a seeded item's numbers come from it.
    """
    seeds.clear()
    n = len(items)
    out: list = []
    errors: list = []
    records: list = []
    times: list | None = [] if timed else None
    state = {"it": None, "i": start}
    if timed or seed is not None:
        locate = lambda: state["i"]  # noqa: E731
    else:
        locate = lambda: start + n - state["it"].__length_hint__() - 1  # noqa: E731
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Capture("stdout", records, locate), _Capture("stderr", records, locate)
    t0 = time.perf_counter()
    try:
        if timed or seed is not None:
            _run_explicit(fn, items, start, star, seed, keep_going, out, errors, times, state, progress, indices)
        else:
            it = iter(items)
            state["it"] = it
            mapper = itertools.starmap if star else map
            while True:
                try:
                    out.extend(mapper(fn, it))  # keeps what finished if an item raises
                    break
                except BaseException as exc:
                    errors.append((start + len(out), _errors.pack_exception(exc, PKG_DIR)))
                    out.append(NOT_DONE)
                    if not keep_going:
                        break
    finally:
        t1 = time.perf_counter()
        sys.stdout, sys.stderr = old
        seeds.clear()
    return out, t0, t1, times, records, errors


def _run_explicit(fn, items, start, star, seed, keep_going, out, errors, times, state, progress=None,
                  indices=None) -> None:
    """The per-item loop: index known, per-item times, seeds and progress possible."""
    clock = time.perf_counter
    report_at = clock() + P.PROGRESS_S
    for offset, x in enumerate(items):
        if progress is not None and offset and clock() >= report_at:
            progress(offset)
            report_at = clock() + P.PROGRESS_S
        i = start + offset
        state["i"] = i
        if seed is not None:
            seeds.seed_item(seed, i if indices is None else indices[offset])
        t = clock()
        try:
            out.append(fn(*x) if star else fn(x))
        except BaseException as exc:
            out.append(NOT_DONE)
            errors.append((i, _errors.pack_exception(exc, PKG_DIR)))
            if times is not None:
                times.append(clock() - t)
            if not keep_going:
                return
            continue
        if times is not None:
            times.append(clock() - t)
