"""Every option against the plain loop: generated items, failure plans and options.

The model (model.py) says what each item may end as; ``check_run`` holds a
real map on each backend to it: results in order, ``NOT_DONE`` only where the
contract says, the error the contract names, and every count the user sees.

Known open bugs are kept out of the generated cases by ``known_bug`` and
pinned by an xfail each (test_regressions.py): when a fix merges, remove the
marker and the predicate's entry. The bugs this suite was written against
(--retries dropping a chunk's rest, --seed sharing one stream, a resumed item's
stream, unstable checkpoint identity) are fixed: their tests now search.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager

import cloudpickle
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import model as M
from poolmagic import NOT_DONE, BadInputError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(M.TEST_TIMEOUT)


@contextmanager
def markers():
    d = tempfile.mkdtemp(prefix="poolmagic-oracle-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def known_bug(case: M.Case, backend=None) -> str | None:
    """The known bug this case would trip, or None (see the module docstring)."""
    # (none open: the dask ones, a -n map's retired worker and a cluster drained by
    # kills, are fixed; their tests are in test_regressions.py)
    return None


def needs(backend, case: M.Case) -> None:
    """Keep only the cases this backend can run: what it lacks (``Backend.lacks``) is filtered out
    case by case (a skip inside ``@given`` would skip the whole test at the first such case)."""
    kinds = case.kinds()
    assume(not ("memory" in kinds and "memory-limit" in backend.lacks))
    assume(not (kinds & M.KILLERS and "crash-isolation" in backend.lacks))
    assume(not (case.options.get("timeout") and "kill-on-timeout" in backend.lacks))
    assume(not (case.options.get("max_memory") and "memory-limit" in backend.lacks))


# ---------------------------------------------------------------- one map


@M.budget(14)
@given(case=M.cases())
def test_map_matches_loop(backend, case):
    assume(known_bug(case, backend) is None)
    needs(backend, case)
    with markers() as mk:
        outcomes = M.expect(case, mk)
        got = M.run_case(backend.pool, case, mk)
        M.check_run(case, outcomes, got, mk)
    assert_pool_works(backend.pool)


def assert_pool_works(pool) -> None:
    """The pool still gives the loop's answer after whatever the map did."""
    assert pool.map(M.compute, [1, "ab", 2.5]) == [4, "ba·", 1.25]


# The first row of issue 22: item 2 fails once, chunks of 10, one retry.
RETRY_CHUNK = M.Case(list(range(20)), {M.key(2): ("raise_once", "ValueError")},
                     {"chunksize": 10, "retries": 1})


@M.budget(6)
@given(case=M.cases(slow=False, options={"keep_going": False, "retries": 1}))
@example(case=RETRY_CHUNK)
def test_retries_keep_the_rest_of_the_chunk(backend, case):
    needs(backend, case)
    with markers() as mk:
        outcomes = M.expect(case, mk)
        M.check_run(case, outcomes, M.run_case(backend.pool, case, mk), mk)


# ---------------------------------------------------------------- resume


@M.budget(8)
@given(case=M.cases(slow=False, options={"keep_going": True}), async2=st.booleans())
def test_resume_runs_only_what_is_missing(backend, case, async2):
    assume(known_bug(case, backend) is None)
    needs(backend, case)
    with markers() as mk:
        outcomes = M.expect(case, mk)
        first = M.run_case(backend.pool, case, mk)
        M.check_run(case, outcomes, first, mk)
        prev = first.report
        missing = [i for i, v in enumerate(prev.results) if v is NOT_DONE]
        again = M.Case(case.items, case.plans, case.options, run_async=async2)
        if not missing:
            with pytest.raises(BadInputError, match="nothing to resume"):
                backend.pool.run(M.work2 if case.star else M.work, case.items, resume=prev,
                                 **dict(case.options, kwargs={"plans": case.plans, "markers": mk}))
            return
        kept = {i: v for i, v in enumerate(prev.results) if v is not NOT_DONE}
        ran_before = {i: M.attempts(mk, x) for i, x in enumerate(case.items)}
        outcomes = M.expect(again, mk)
        got = M.run_case(backend.pool, again, mk, resume=prev)
        M.check_run(again, outcomes, got, None, kept=kept)
        assert got.report.resumed == (len(kept), len(missing)), got.report.resumed
        assert M.summary_counts(got.report.summary())["resumed"] == (len(kept), len(missing))
        for i in kept:  # a kept item never runs again
            assert M.attempts(mk, case.items[i]) == ran_before[i], f"kept item {i} ran again"


# ---------------------------------------------------------------- seeds


def _reference(pool, items, seed, mk) -> list:
    """The numbers each item gets with ``seed``: one worker, one item per chunk, no failure."""
    return pool.map(M.seeded, items, seed=seed, workers=1, chunksize=1, kwargs={"plans": {}, "markers": mk})


SEED_CASES = M.cases(slow=False, star=False, options={"keep_going": True}, max_items=6)


@M.budget(6)
@given(case=SEED_CASES, seed=st.integers(0, 2**32 - 1))
def test_seed_gives_item_i_the_same_numbers_whatever_the_run(backend, case, seed):
    """Workers, chunking and retries change nothing an item draws."""
    assume(known_bug(case, backend) is None)
    needs(backend, case)
    with markers() as mk:
        ref = _reference(backend.pool, case.items, seed, mk)
        outcomes = M.expect(case, mk)
        got = M.run_case(backend.pool, case, mk, func=M.seeded, seed=seed)
        M.check_run(case, outcomes, got, None, value_of=lambda i, x: ref[i])


@M.budget(4)
@given(items=st.lists(M._ints, min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**32 - 1))
@example(items=[0, 1, 2], seed=7)
def test_seed_streams_of_random_and_numpy_are_independent(backend, items, seed):
    with markers() as mk:
        got = _reference(backend.pool, items, seed, mk)
    assert all(r[0] != r[1] for r in got), got


@M.budget(3)
@given(seed=st.integers(0, 2**32 - 1))
@example(seed=7)
def test_seed_survives_resume(backend, seed):
    items = list(range(8))
    case = M.Case(items, {M.key(3): ("raise_once", "ValueError"), M.key(5): ("raise_once", "KeyError")},
                  {"keep_going": True})
    with markers() as mk:
        ref = _reference(backend.pool, items, seed, mk)
        first = M.run_case(backend.pool, case, mk, func=M.seeded, seed=seed)
        kept = {i: v for i, v in enumerate(first.report.results) if v is not NOT_DONE}
        assert sorted(set(items) - set(kept)) == [3, 5]
        got = M.run_case(backend.pool, case, mk, func=M.seeded, seed=seed, resume=first.report)
        M.check_run(case, M.expect(case, mk), got, None, kept=kept, value_of=lambda i, x: ref[i])
