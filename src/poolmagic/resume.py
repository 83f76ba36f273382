"""``--resume``: re-map only the items an earlier report has no result for.

A run re-maps the positions an earlier report kept no result for, and merges
them into its results in input order. It is refused unless the items behind
the ITERABLE are, at every kept position, the ones the earlier run mapped: a
report keeps its items' keys (``SeenItems``, computed only when needed).
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

from . import identity
from .engine.core.events import ChunkFinished, MapFinished
from .engine.core.items import SEQUENCES
from .errors import BadInputError
from .itemkeys import differ_message, keys_at
from .report import RunReport
from .sentinel import NOT_DONE
from .threadqueues import thread_queue


def materialise(iterable: Iterable) -> list | range | tuple:
    return iterable if type(iterable) in SEQUENCES else list(iterable)


def seed_words(seed: int | None) -> str:
    """How a run's seed reads in a message: ``--seed 7`` or ``no --seed``."""
    return "no --seed" if seed is None else f"--seed {seed}"


def resume_report(prev: RunReport, iterable: Iterable, seed: int | None = None) -> tuple[RunReport, list[int], list]:
    """A report that keeps ``prev``'s results, the positions to run, and their items.

    Refused unless the items behind the ITERABLE are, at every position ``prev``
    kept a result for, the ones ``prev`` mapped (compared by identity.py keys):
    kept results of other items would mix two ITERABLEs silently. An item that
    failed may have changed: its result is computed now. Refused too when
    ``seed`` is not the seed ``prev`` ran with: the results would come from two
    seeds, a list no run gives.
    """
    if prev.status == "running":
        raise BadInputError("cannot resume: the run to resume is still running; wait for it (or cancel it) first")
    if prev.items is None:
        raise BadInputError("nothing to resume: the earlier run never learned how many items it had")
    was_seed = prev.replay[1].seed if prev.replay is not None else seed
    if was_seed != seed:
        raise BadInputError(
            f"cannot resume: the run to resume drew its numbers with {seed_words(was_seed)} and this one has "
            f"{seed_words(seed)}: its kept results and the new ones would come from two seeds. Resume with "
            f"{seed_words(was_seed)}, or run the cell without --resume")
    missing = [i for i, v in enumerate(prev.results) if v is NOT_DONE]
    if not missing:
        raise BadInputError(f"nothing to resume: all {prev.items:,} items of the earlier run finished")
    items = materialise(iterable)
    if len(items) != prev.items:
        raise BadInputError(
            f"cannot resume: the ITERABLE now has {len(items):,} items, the run to resume had "
            f"{prev.items:,}; resume needs the same items (or run the cell without --resume)"
        )
    seen = prev.identity
    if not isinstance(seen, SeenItems):
        raise BadInputError("cannot resume: the earlier run's items were not recorded (it was not made by a map); "
                            "run the cell without --resume")
    was = seen.result()
    skip = set(missing)
    kept = [i for i in range(len(items)) if i not in skip]
    now = keys_at(items, kept, "--resume")
    changed = [i for i in identity.differing(was, now) if i not in skip]
    if changed:
        raise BadInputError(
            f"cannot resume: the ITERABLE changed since the run to resume: {differ_message(changed, items)}. "
            f"The {prev.items - len(missing):,} kept results are of the old items: run the cell without --resume "
            f"to map every item again."
        )
    report = continuing(prev.func_name, prev.items, prev.results, {i: e for i, e in prev.errors.items() if i not in skip})
    report.resumed = (prev.items - len(missing), len(missing))
    report.identity = now
    return report, missing, [items[i] for i in missing]



class SeenItems:
    """The keys (identity.py) of a map's items, kept on its report for ``--resume``.

    Hashing every item of every map would cost the tiny-items path dearly
    (docs/design.md), so they are computed only when needed, on a thread of
    their own: for a sequence ITERABLE (still held by the report) once the map
    ends with items missing; for a stream, which is gone once read, chunk by
    chunk as results come back. Positions kept from a checkpoint or an earlier
    run start out known (their keys were compared on the way in).
    """

    def __init__(self, job: Any):
        self.job = job
        report = job.report
        pre = report.identity
        self.keys = bytearray(pre) if isinstance(pre, (bytes, bytearray)) else bytearray()
        self.error: BaseException | None = None
        self.ready: threading.Event | None = None  # made when keys are computed after the map (~3 µs)
        self.ending = False  # the map has ended
        report.identity = self
        job.observers.append(self)

    def __call__(self, event: Any) -> None:
        if type(event) is ChunkFinished:
            if self.job.source.is_stream and event.items is not None:
                if self.ready is None:
                    self.ready = threading.Event()
                self._put(self._add, event.record.start, event.items)
        elif type(event) is MapFinished:  # published under the job's lock: a caller that saw the
            r = self.job.report           # map end sees ``ending`` (and ``ready``) too
            if not self.job.source.is_stream and r.items is not None and r.done >= r.items:
                self.job = None  # nothing missing: nothing to resume, no keys needed (the common case)
            else:
                if self.ready is None:
                    self.ready = threading.Event()
                self._put(self._end)
            self.ending = True

    def _put(self, fn: Any, *args: Any) -> None:
        thread_queue("identity").put((self._guard, (fn, args)))

    def _guard(self, fn: Any, args: tuple) -> None:
        if self.error is not None:
            return
        try:
            fn(*args)
        except identity.IdentityError as exc:
            self.error = exc
        except BaseException as exc:  # never lose the event: resume says what went wrong
            self.error = BadInputError(f"the items could not be identified ({type(exc).__name__}: {exc})")
        finally:
            if fn == self._end:
                self.job = None  # the report outlives the job: hold nothing of it
                self.ready.set()  # type: ignore[union-attr]

    def _add(self, start: int, items: Any, index: Any = None) -> None:
        k = identity.KEY
        keys = identity.keys(items, range(start, start + len(items)) if index is None else index, "--resume")
        if index is None:
            if len(self.keys) < (start + len(items)) * k:
                self.keys.extend(bytes((start + len(items)) * k - len(self.keys)))
            self.keys[start * k : (start + len(items)) * k] = keys
        else:
            for j, i in enumerate(index):
                self.keys[i * k : (i + 1) * k] = keys[j * k : (j + 1) * k]

    def _end(self) -> None:
        job = self.job
        r = job.report
        if job.source.is_stream or r.items is None or r.done >= r.items:
            return  # a stream was hashed as it went; a map with nothing missing needs no keys
        seq, index, k = job.source.seq, job.index, identity.KEY
        # with a result now, or handed to a worker: a result on its way when the map ended (a
        # cancel, a failure) is kept when it lands later, and --resume must know its item too
        handed = min(len(seq), job.source.pos)
        done = [p for p in range(len(seq))
                if p < handed or r.results[p if index is None else index[p]] is not NOT_DONE]
        if len(self.keys) < r.items * k:
            self.keys.extend(bytes(r.items * k - len(self.keys)))
        got = keys_at(seq, done, "--resume", index)  # only the kept items: a map that failed at once hashes little
        if index is None:  # a fresh map: nothing was known before
            self.keys[: len(got)] = got
            return
        for p in done:
            self.keys[index[p] * k : (index[p] + 1) * k] = got[index[p] * k : (index[p] + 1) * k]

    def settle(self) -> None:
        """Once the map has ended, wait for its keys: a sequence changed in place after
        ``run`` returns must not be hashed as the items the map ran."""
        if self.ending and self.ready is not None:
            self.ready.wait()

    def result(self) -> bytes:
        """The keys, once known (raises what made them unknowable)."""
        if self.ready is not None:
            self.ready.wait()
        if self.error is not None:
            raise BadInputError(f"cannot resume: {self.error}; run the cell without --resume") from None
        return bytes(self.keys)


def continuing(name: str, n: int, results: list, errors: dict) -> RunReport:
    r = RunReport(func_name=name, items=n, results=list(results), errors=dict(errors))
    r.done = sum(1 for v in r.results if v is not NOT_DONE)
    return r

