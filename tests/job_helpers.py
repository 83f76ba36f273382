"""Helpers shared by test_job.py, test_results.py and test_rerun.py: a Job driven by hand as a
backend would drive it (take a chunk, run its items here, answer it), and what its errors say."""
from __future__ import annotations

import re
import types

from poolmagic.engine.events import ChunkRecord
from poolmagic.engine.items import ItemSource
from poolmagic.engine.job import Job
from poolmagic.engine.mapoptions import MapOptions
from poolmagic.report import RunReport
from poolmagic.sentinel import NOT_DONE


def square(x):
    return x * x


def make_job(items=range(10), func=square, **options) -> Job:
    return Job(types.SimpleNamespace(key="k"), ItemSource(items), RunReport(), MapOptions(**options), None, func)


def take(job: Job, size: int):
    got = job.next_items(size)
    assert got is not None, "no chunk to take"
    return got


def answer(job: Job, chunk, *, outputs=(), seconds: float = 0.01, worker: int = 0, pid: int = 0):
    """Run a chunk's items here and answer it as a worker's ChunkDone would.

    Like the worker: a failed item's result is NOT_DONE, and without
    keep_going the chunk stops at its first failure.
    """
    start, items = chunk
    results, errors = [], []
    for k, x in enumerate(items):
        try:
            results.append(job.func(*x) if job.options.star else job.func(x))
        except BaseException as exc:  # noqa: BLE001 - SystemExit too, as a worker catches it
            results.append(NOT_DONE)
            errors.append((start + k, exc))
            if not job.options.keep_going:
                break
    rec = ChunkRecord(worker=worker, start=start, count=len(results), t0=100.0, t1=100.0 + seconds, pid=pid)
    job.chunk_done(rec, results, list(outputs), errors, items)
    return rec


def run_all(job: Job, size: int = 3) -> None:
    while job.active:
        got = job.next_items(size)
        if got is None:
            break
        answer(job, got)


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


def add(a, b):
    return a + b


def item_named(idx: int, value: str | None) -> str:
    """A pattern for "item 4 (4)" or "item 4 (value 4)" -- the index and the item's value."""
    return rf"item {idx}" + ("" if value is None else rf" \((value )?{re.escape(value)}\)")


def has_failure_note(exc: BaseException, idx: int, value: str | None = None) -> bool:
    """``exc`` carries the note "poolmagic: item IDX (VALUE) failed" (the value left out if None)."""
    pattern = rf"^poolmagic: {item_named(idx, value)} failed\b"
    return any(re.search(pattern, n) for n in notes(exc))

