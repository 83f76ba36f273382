"""The caller's side of a map: waiting for it, and what the caller's thread checks before sending.

A blocking map's caller (or an async map's feeder thread) waits here: it
reads a stream's items (never the backend's thread: user code must not stall
the pool), prints worker output in item order and lets a progress display
render, until the map ends.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle

from ...errors import ItemPicklingError, pickling_error, safe_str
from ...serialize import describe

if TYPE_CHECKING:
    from .job import Job


NUDGE_S = 0.005  # a blocking map sent without waking its backend's supervisor wakes it after this


def wait_for(job: Job, timeout: float | None = None, on_output: Callable | None = None, feed: bool = True,
             on_tick: Callable[[], None] | None = None) -> bool:
    """Block until ``job`` is done, feeding a stream's items and writing output; True when finished.

    ``feed``: this thread reads the ITERABLE (a blocking map's caller, or
    an async map's feeder thread); only one thread may. ``on_tick`` runs on
    this thread at least every 0.1 s (a progress display renders there).
    ``job.nudge``, if the backend left one, is called once the map has run
    NUDGE_S without ending (local: the manager thread's first turn for a map
    the caller's thread sent; a small map ends first and needs none).
    ``job.reply``, if the backend left one, runs first on this thread: it
    reads the map's reply itself for up to NUDGE_S, then hands the pipe back
    (local: a one-chunk map into an idle pool; no manager turn, no wake-up).
    """
    __tracebackhide__ = True
    deadline = None if timeout is None else time.monotonic() + timeout
    source = job.source
    nudge, job.nudge = job.nudge, None
    reply, job.reply = job.reply, None
    if reply is not None:  # the backend lent this thread the reply's pipe: read it here, NUDGE_S at most
        reply(NUDGE_S if deadline is None else max(0.0, min(NUDGE_S, deadline - time.monotonic())))
        if nudge is not None and not job.finished.is_set():
            nudge()  # the pipe is the backend's again: its first turn, now
        nudge = None
    while True:
        if feed and source.needs_feed() and job.active:
            error = source.feed()
            if error is not None:
                job.abort(error)
            elif source.exhausted:
                job.maybe_finish()
        with job.cond:
            if not job.finished.is_set() and not job.output.ready() and not (feed and source.needs_feed()):
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left > 0:
                    job.cond.wait(left if nudge is None else min(left, NUDGE_S))
            done = job.finished.is_set()
            batch = job.output.take(final=done)
        if nudge is not None and not done:
            nudge()
            nudge = None
        if on_output is not None and batch:
            on_output(batch)
        if on_tick is not None:
            on_tick()
        if done:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def unpicklable(start: int, items: Any, at: Callable[[int], int] = int) -> dict[int, BaseException]:
    """Which items of a chunk that did not pickle do not, each with an error naming it (by offset);
    ``at``: a job position's index in the ITERABLE (a map re-running a subset)."""
    bad: dict[int, BaseException] = {}
    for k, x in enumerate(items):
        try:
            cloudpickle.dumps(x, protocol=5)
        except Exception as exc:
            bad[k] = pickling_error(
                f"item {at(start + k)} is {describe(x)}, which cannot be pickled to send it "
                f"to a worker: {safe_str(exc)}", exc
            )
    if not bad:  # the items pickle one by one; report the whole chunk
        bad = {0: ItemPicklingError(f"items {at(start)}–{at(start + len(items) - 1)} cannot be pickled")}
    return bad
