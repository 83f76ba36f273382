"""``--resume``: re-map only the items an earlier report has no result for.

A run re-maps the positions an earlier report kept no result for, and merges
them into its results in input order. It is refused unless the items behind
the ITERABLE are, at every kept position, the ones the earlier run mapped: a
report keeps its items' keys (``SeenItems``, seenitems.py, computed only when needed).
A stream the earlier run stopped taking items from (an interrupt, a cancel, a failure)
may have had more: those run too.
Loaded by the first map that resumes (or checkpoints), not by every map.
"""
from __future__ import annotations

from typing import Iterable

from . import identity
from .engine.core.items import SEQUENCES
from .errors import BadInputError
from .itemkeys import differ_message, keys_at
from .report import RunReport
from .seenitems import SeenItems
from .sentinel import NOT_DONE


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
    if not getattr(prev.results, "keeps", True):
        raise BadInputError("cannot resume an imap: it hands its results out and keeps none; "
                            "run the cell without --resume")
    if prev.items is None:
        raise BadInputError("nothing to resume: the earlier run never learned how many items it had")
    was_seed = prev.replay[1].seed if prev.replay is not None else seed
    if was_seed != seed:
        raise BadInputError(
            f"cannot resume: the run to resume drew its numbers with {seed_words(was_seed)} and this one has "
            f"{seed_words(seed)}: its kept results and the new ones would come from two seeds. Resume with "
            f"{seed_words(was_seed)}, or run the cell without --resume")
    missing = [i for i, v in enumerate(prev.results) if v is NOT_DONE]
    if not missing and not prev.unread:
        raise BadInputError(f"nothing to resume: all {prev.items:,} items of the earlier run finished")
    items = materialise(iterable)
    # a stream the earlier run stopped reading (an interrupt) had more items than it took: they run too
    more = len(items) - prev.items if prev.unread else 0
    if len(items) != prev.items and more <= 0:
        raise BadInputError(
            f"cannot resume: the ITERABLE now has {len(items):,} items, the run to resume had "
            f"{prev.items:,}; resume needs the same items (or run the cell without --resume)"
        )
    if not missing and not more:
        raise BadInputError(f"nothing to resume: all {prev.items:,} items of the earlier run finished, "
                            f"and the ITERABLE has no more")
    kept_n = prev.items - len(missing)
    missing += range(prev.items, prev.items + max(more, 0))
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
            f"The {kept_n:,} kept results are of the old items: run the cell without --resume "
            f"to map every item again."
        )
    results = [*prev.results, *[NOT_DONE] * (len(items) - prev.items)]
    report = continuing(prev.func_name, len(items), results, {i: e for i, e in prev.errors.items() if i not in skip})
    report.resumed = (kept_n, len(missing))
    report.identity = now
    return report, missing, [items[i] for i in missing]


def continuing(name: str, n: int, results: list, errors: dict) -> RunReport:
    r = RunReport(func_name=name, items=n, results=list(results), errors=dict(errors))
    r.done = sum(1 for v in r.results if v is not NOT_DONE)
    return r

