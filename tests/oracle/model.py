"""The oracle's model: items, failure plans, the mapped function, and what a map must give.

The specification is the plain loop ``[f(x) for x in items]``. ``work`` is that
``f``: it returns ``compute(x)`` unless the item's *failure plan* says
otherwise. A plan is a pure function of the item (looked up by ``key(x)``, a
canonical hash of its value), so a re-run, a resume or a new process knows
what each item will do; "once" plans keep a marker file per item in a
directory of the test, and every call leaves an attempt file, so the test
can count the attempts that really ran.

``expect(case, markers)`` turns a case into what each item may end as (a
value, or an error of a named class), before the map runs: the invariants in
``check_run`` compare a real map's results, error and counts with it.

This module is pickled by value (like a notebook's code), so workers never
import it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import sys
import time
import uuid
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pandas as pd
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from poolmagic import NOT_DONE, ItemTimeoutError, WorkerCrashedError
from poolmagic.errors import MapCancelledError, MapFailedError, WorkerMemoryError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# ---------------------------------------------------------------- budgets
# CI: derandomized, a fixed number of examples per test; both backends of the
# whole oracle suite within ~4 minutes on 2 loaded cores (docs/design.md).
# POOLMAGIC_ORACLE=deep: a longer, random search for a local run.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture,
                                                      HealthCheck.filter_too_much],
               database=None, print_blob=True)
settings.register_profile("ci", max_examples=int(os.environ.get("POOLMAGIC_ORACLE_EXAMPLES", 12)),
                          derandomize=True, **_COMMON)
settings.register_profile("deep", max_examples=int(os.environ.get("POOLMAGIC_ORACLE_EXAMPLES", 300)),
                          derandomize=False, **_COMMON)
PROFILE = "deep" if os.environ.get("POOLMAGIC_ORACLE") == "deep" else "ci"
ORACLE = settings(settings.get_profile(PROFILE))


# A known bug's strict xfail runs its @example only: searching (and shrinking) a
# failure that is expected costs a minute and proves nothing more.
explicit = settings(ORACLE, phases=[Phase.explicit])


def budget(n: int) -> settings:
    """The profile's settings with ``n`` examples in CI (a test's own share of the budget)."""
    if PROFILE == "deep" or "POOLMAGIC_ORACLE_EXAMPLES" in os.environ:
        return ORACLE
    return settings(ORACLE, max_examples=n)


# ---------------------------------------------------------------- item types (a notebook's)


@dataclass(frozen=True)
class Point:
    x: int
    label: str


Pair = namedtuple("Pair", ["a", "b"])


class OracleError(Exception):
    """An exception class defined in the test (pickled by value, like a notebook's)."""


EXCEPTIONS = {"ValueError": ValueError, "KeyError": KeyError, "OracleError": OracleError}


def canon(x: Any) -> Any:
    """A canonical, hashable encoding of a value: equal for equal values, in any process."""
    if isinstance(x, np.ndarray):
        return ("nd", str(x.dtype), x.shape, x.tobytes())
    if isinstance(x, pd.DataFrame):
        return ("df", tuple(map(str, x.columns)), canon(x.index.to_numpy()),
                tuple(canon(x[c].to_numpy()) for c in x.columns))
    if isinstance(x, pd.Series):
        return ("s", str(x.name), canon(x.index.to_numpy()), canon(x.to_numpy()))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return ("dc", type(x).__qualname__, tuple(canon(getattr(x, f.name)) for f in dataclasses.fields(x)))
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return ("nt", type(x).__qualname__, tuple(canon(v) for v in x))
    if isinstance(x, tuple):
        return ("t", tuple(canon(v) for v in x))
    if isinstance(x, float):
        return ("f", repr(x))
    if isinstance(x, (set, frozenset)):  # repr's order depends on the process's string hash seed
        return ("set", tuple(sorted(repr(canon(v)) for v in x)))
    return (type(x).__name__, x)


def key(x: Any) -> str:
    return hashlib.sha1(repr(canon(x)).encode()).hexdigest()[:16]


def compute(x: Any) -> Any:
    """What the loop's function returns for an item that has no failure planned."""
    if isinstance(x, (np.ndarray, pd.DataFrame, pd.Series)):
        return x * 2
    if isinstance(x, Point):
        return Point(x.x * 2, x.label + "!")
    if isinstance(x, Pair):
        return Pair(compute(x.a), compute(x.b))
    if isinstance(x, tuple):
        return tuple(compute(v) for v in x)
    if isinstance(x, bool):
        return not x
    if isinstance(x, int):
        return 3 * x + 1
    if isinstance(x, float):
        return x / 2
    if isinstance(x, str):
        return x[::-1] + "·"
    return x


def same(a: Any, b: Any) -> bool:
    return type(a).__qualname__ == type(b).__qualname__ and canon(a) == canon(b)


# ---------------------------------------------------------------- the mapped function

TEST_TIMEOUT = int(os.environ.get("POOLMAGIC_ORACLE_TIMEOUT", 600))  # s per test (pytest-timeout)
MEMORY_LIMIT = "300MB"
MEMORY_GRAB = 900 << 20  # an item planned to exceed the limit holds this much
SLEEP_S = 60.0  # an item planned to time out sleeps this long (timeouts are 1 s)
EXIT_CODE = 13
NAP_S = 0.2


def _first_time(markers: str, k: str) -> bool:
    try:
        os.close(os.open(os.path.join(markers, f"once-{k}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False


def work(x: Any, plans: dict, markers: str) -> Any:
    """The loop's ``f``: ``compute(x)``, unless the item's plan fails it."""
    k = key(x)
    os.close(os.open(os.path.join(markers, f"attempt-{k}-{uuid.uuid4().hex}"), os.O_CREAT | os.O_WRONLY, 0o600))
    plan = plans.get(k, ("ok",))
    kind = plan[0]
    if kind == "raise" or (kind == "raise_once" and _first_time(markers, k)):
        raise EXCEPTIONS[plan[1]](f"planned failure of item {k}")
    if kind == "crash" or (kind == "crash_once" and _first_time(markers, k)):
        os._exit(EXIT_CODE)
    if kind == "sleep":
        time.sleep(SLEEP_S)
    if kind == "nap":  # slow enough to interrupt, and then returns
        time.sleep(NAP_S)
    if kind == "memory":
        grab = bytearray(MEMORY_GRAB)
        grab[::4096] = b"x" * len(range(0, MEMORY_GRAB, 4096))  # touch every page: resident
        time.sleep(SLEEP_S)
    return compute(x)


def work2(a: Any, b: Any, plans: dict, markers: str) -> Any:
    """``--star``: the loop's ``f(*item)``."""
    return work((a, b), plans, markers)


def seeded(x: Any, plans: dict, markers: str) -> tuple:
    """The numbers ``--seed`` gives an item, from both generators (after its plan ran)."""
    work(x, plans, markers)
    return (random.random(), float(np.random.random()), random.getrandbits(32), int(np.random.randint(1 << 30)))


def attempts(markers: str, x: Any) -> int:
    """How many times ``work`` really ran on ``x``."""
    return len(list(Path(markers).glob(f"attempt-{key(x)}-*")))


def marked(markers: str, x: Any) -> bool:
    return os.path.exists(os.path.join(markers, f"once-{key(x)}"))


# ---------------------------------------------------------------- strategies

_ints = st.integers(-10**6, 10**6)
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)
_floats = st.floats(allow_nan=False, width=64)
_frames = st.lists(st.integers(-1000, 1000), min_size=1, max_size=3).map(
    lambda v: pd.DataFrame({"a": v, "b": [2 * e for e in v]}))
_series = st.lists(st.integers(-1000, 1000), min_size=1, max_size=3).map(lambda v: pd.Series(v, name="s"))
_arrays = st.one_of(
    st.lists(st.integers(-1000, 1000), min_size=0, max_size=4).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=4).map(lambda v: np.array(v, dtype=np.float64)),
)
ITEM = st.one_of(
    _ints, _text, _floats,
    st.tuples(_ints, _text),
    _arrays, _frames, _series,
    st.builds(Point, _ints, _text),
    st.builds(Pair, _ints, _text),
)
STAR_ITEM = st.tuples(st.one_of(_ints, _text), st.one_of(_ints, _floats))

CHEAP_PLANS = ["ok", "raise", "raise_once", "crash", "crash_once"]


@st.composite
def plan_for(draw: Any, allowed: tuple[str, ...]) -> tuple:
    kind = draw(st.sampled_from(allowed))
    if kind in ("raise", "raise_once"):
        return (kind, draw(st.sampled_from(sorted(EXCEPTIONS))))
    return (kind,)


@dataclass
class Case:
    items: list
    plans: dict  # key(x) -> plan
    options: dict  # keywords of Pool.run
    run_async: bool = False

    @property
    def star(self) -> bool:
        return bool(self.options.get("star"))

    def plan(self, x: Any) -> tuple:
        return self.plans.get(key(x), ("ok",))

    def kinds(self) -> set:
        return {p[0] for p in self.plans.values()}

    def __repr__(self) -> str:
        shown = [(x, self.plan(x)) for x in self.items]
        return f"Case(items+plans={shown!r}, options={self.options!r}, async={self.run_async})"


@st.composite
def cases(draw: Any, *, slow: bool = True, star: bool | None = None, max_items: int = 8,
          options: dict | None = None) -> Case:
    """A map: items, a plan per item, and options.

    ``slow``: plans that time out or exceed the memory limit may be drawn
    (rarely: each costs a second or more).
    """
    is_star = draw(st.booleans()) if star is None else star
    items = draw(st.lists(STAR_ITEM if is_star else ITEM, max_size=max_items, unique_by=key))
    opts: dict = {}
    if is_star:
        opts["star"] = True
    opts["keep_going"] = draw(st.booleans())
    c = draw(st.sampled_from([None, 1, 2, 3, 5]))
    if c is not None:
        opts["chunksize"] = c
    w = draw(st.sampled_from([None, 1, 2, 3]))
    if w is not None:
        opts["workers"] = w
    r = draw(st.sampled_from([None, None, 1, 2]))
    if r is not None:
        opts["retries"] = r
        on = draw(st.sampled_from([None, (ValueError,), (KeyError, ValueError), (WorkerCrashedError,)]))
        if on is not None:
            opts["retry_on"] = on
    allowed = list(CHEAP_PLANS)
    slow_kind = draw(st.sampled_from([None] * 8 + ["sleep", "memory"])) if slow else None
    if slow_kind == "sleep":
        opts["timeout"] = 1.0
    elif slow_kind == "memory":
        opts["max_memory"] = MEMORY_LIMIT
    weights = ["ok"] * 6 + allowed[1:]
    plans = {}
    for x in items:
        kind_plan = draw(plan_for(tuple(weights)))
        plans[key(x)] = kind_plan
    if slow_kind is not None and items:  # exactly one slow item
        victim = draw(st.sampled_from(items))
        plans[key(victim)] = (slow_kind,)
    plans = {k: p for k, p in plans.items() if p[0] != "ok"}
    if options:
        opts.update(options)
    return Case(items, plans, opts, run_async=draw(st.booleans()))


# ---------------------------------------------------------------- what a map must give

FAILS = {"crash": WorkerCrashedError, "crash_once": WorkerCrashedError, "sleep": ItemTimeoutError,
         "memory": WorkerMemoryError}
KILLERS = {"crash", "crash_once", "sleep", "memory"}


def _retried_on(opts: dict, cls: type) -> bool:
    if not opts.get("retries"):
        return False
    on = opts.get("retry_on")
    return on is None or issubclass(cls, on)


@dataclass
class Outcome:
    """What one item may end as: its value, and/or an error of ``error``'s class."""

    value: bool
    error: type | None = None
    attempts: int | None = None  # exact number of attempts, when known

    @property
    def exact(self) -> bool:
        return self.value != (self.error is not None)


def expect(case: Case, markers: str) -> list[Outcome]:
    """Each item's outcome per the contract, from its plan and its marker (before the run)."""
    opts = case.options
    retries = opts.get("retries") or 0
    killers = bool(case.kinds() & KILLERS)
    single = (opts.get("chunksize") or (1 if opts.get("timeout") else 0)) == 1
    out = []
    for x in case.items:
        kind, *arg = case.plan(x)
        if kind in ("ok", "nap"):  # a nap (the state machine's interrupt rule) returns too
            out.append(Outcome(True, None, 1))
        elif kind == "raise":
            cls = EXCEPTIONS[arg[0]]
            out.append(Outcome(False, cls, 1 + (retries if _retried_on(opts, cls) else 0)))
        elif kind in ("crash", "sleep", "memory"):
            cls = FAILS[kind]
            n = 1 + (retries if _retried_on(opts, cls) else 0)
            # a chunk of several items that a killer ends is re-run item by item first
            out.append(Outcome(False, cls, n if single else None))
        else:  # raise_once, crash_once
            cls = EXCEPTIONS[arg[0]] if kind == "raise_once" else WorkerCrashedError
            if marked(markers, x):
                out.append(Outcome(True, None, 1))
            elif _retried_on(opts, cls):
                out.append(Outcome(True, None, 2 if single or not killers else None))
            elif kind == "crash_once" and not single:
                # a crash in a chunk of several items re-runs them one by one to find
                # the culprit: the item then runs again (and succeeds) without a retry
                out.append(Outcome(True, cls, None))
            elif killers and not single:
                # its failure may be lost with a chunk a later crash ends: then it runs again
                out.append(Outcome(True, cls, None))
            else:
                out.append(Outcome(False, cls, 1))
    return out


@dataclass
class Run:
    """What a map gave: its results, the error it raised, its report."""

    results: list | None
    error: BaseException | None
    report: Any


def run_case(pool: Any, case: Case, markers: str, func: Any = None, **extra: Any) -> Run:
    """Run ``case`` on ``pool`` as a user would: ``run`` or ``map_async(...).get()``."""
    func = func or (work2 if case.star else work)
    kw = dict(case.options, kwargs={"plans": case.plans, "markers": markers}, **extra)
    if case.run_async:
        handle = pool.map_async(func, case.items, **kw)
        try:
            return Run(handle.get(timeout=600), None, handle.report)
        except Exception as exc:  # noqa: BLE001
            return Run(None, exc, handle.report)
    try:
        report = pool.run(func, case.items, **kw)
        return Run(report.results, None, report)
    except Exception as exc:  # noqa: BLE001
        return Run(None, exc, getattr(exc, "poolmap_report", None) or pool.last_report)


# "poolmagic: f() · 4/6 items (3 ok, 1 failed) in ...": ran/total, then what they ended as
_SUMMARY = re.compile(r"poolmagic: (?:[^·]+ · )?([\d,]+)(?:/([\d,]+))? items?(?: \(([\d,]+) ok\b[^)]*\))? in ")


def summary_counts(text: str) -> dict:
    """The counts the summary's first line shows."""
    line = text.splitlines()[0]
    m = _SUMMARY.search(line)
    assert m, f"no item count in the summary: {line!r}"
    num = lambda s: int(s.replace(",", ""))  # noqa: E731
    out = {"done": num(m.group(3) or m.group(1)), "items": num(m.group(2) or m.group(1))}
    for name, pat in (("retried", r"([\d,]+) retried"), ("failed", r"([\d,]+) failed")):
        mm = re.search(pat, line)
        out[name] = num(mm.group(1)) if mm else 0
    mm = re.search(r"resumed: ([\d,]+) kept, ([\d,]+) run", line)
    out["resumed"] = (num(mm.group(1)), num(mm.group(2))) if mm else None
    return out


def check_run(case: Case, outcomes: list[Outcome], got: Run, markers: str | None = None,
              kept: dict[int, Any] | None = None, value_of: Any = None) -> None:
    """Every invariant of one map against the model (see the module docstring).

    ``kept``: index -> value an earlier run already produced (resume, checkpoint):
    those items must keep it and not run. ``value_of(i, x)``: the loop's value
    (default ``compute(x)``).
    """
    n = len(case.items)
    kept = kept or {}
    value_of = value_of or (lambda i, x: compute(x))
    r = got.report
    keep_going = case.options.get("keep_going", False)
    assert r is not None, "the map left no report"
    assert r.items == n, f"report.items is {r.items}, the ITERABLE has {n}"
    assert len(r.results) == n, f"{len(r.results)} results for {n} items"
    if got.error is not None:
        assert r.status == "failed", f"the map raised {got.error!r} and its status is {r.status!r}"
    else:
        assert r.status == "done", r.status
    can_fail = {i for i, o in enumerate(outcomes) if o.error is not None and i not in kept}
    # an item whose finished result died with its worker ran again (report.lost, said under the
    # summary): a plan that fails once may then have failed in the run that was lost
    lost = getattr(r, "lost", {})
    rescued = {i for i in lost if case.plan(case.items[i])[0] in ("raise_once", "crash_once")}
    # results: the loop's value, or NOT_DONE only where the contract allows
    for i, (x, o) in enumerate(zip(case.items, outcomes)):
        v = r.results[i]
        if i in kept:
            assert same(v, kept[i]), f"item {i}: a kept result changed: {v!r} != {kept[i]!r}"
            continue
        if v is NOT_DONE:
            failed_here = i in r.errors
            assert failed_here or not keep_going, f"item {i} ({x!r}) is NOT_DONE without an error under keep_going"
            assert got.error is not None, f"item {i} ({x!r}) is NOT_DONE and the map raised nothing"
            if failed_here:
                assert o.error is not None, f"item {i} ({x!r}) failed ({r.errors[i]!r}); its plan never fails"
                assert isinstance(r.errors[i], o.error), f"item {i}: {r.errors[i]!r} is not a {o.error.__name__}"
        else:
            assert o.value or i in rescued, f"item {i} ({x!r}) has a result ({v!r}); its plan always fails ({o.error})"
            want = value_of(i, x)
            assert same(v, want), f"item {i} ({x!r}): {v!r} != the loop's {want!r}"
            assert i not in r.errors, f"item {i} has a result and an error {r.errors[i]!r}"
    # every failure named is a failure the plan allows, and an item that must fail did (keep_going)
    for i, e in r.errors.items():
        assert i in can_fail, f"item {i} ({case.items[i]!r}) failed with {e!r}; its plan never fails"
    if keep_going:
        must = {i for i in can_fail if not outcomes[i].value and i not in rescued}
        assert must <= set(r.errors), f"items {sorted(must - set(r.errors))} must fail and did not"
    # the error raised is the one the contract names
    if not can_fail:
        assert got.error is None, f"no item can fail, and the map raised {got.error!r}"
    if got.error is not None:
        e = got.error
        assert not isinstance(e, MapCancelledError), e
        if keep_going:
            assert isinstance(e, MapFailedError), f"keep_going raised {e!r}, not MapFailedError"
            assert set(e.errors) == set(r.errors), (sorted(e.errors), sorted(r.errors))
        else:
            assert any(e is r.errors[i] for i in r.errors), f"raised {e!r}, which is no item's error {r.errors}"
        assert getattr(e, "poolmap_report", None) is r or got.results is None
    elif keep_going:
        must = [i for i in can_fail if not outcomes[i].value and i not in rescued]
        assert not must, f"items {must} must fail and the map raised nothing"
    # counts the user sees
    done = sum(1 for v in r.results if v is not NOT_DONE)
    assert r.done == done, f"report.done is {r.done}, {done} results are there"
    assert r.failed == len(r.errors)
    if got.error is None or keep_going:
        assert r.done + r.failed == n, f"done {r.done} + failed {r.failed} != {n} items"
    shown = summary_counts(r.summary())
    assert shown["done"] == r.done and shown["items"] == n, (shown, r.summary())
    assert shown["failed"] == r.failed, (shown, r.summary())
    assert shown["retried"] == r.retried, (shown, r.summary())
    # attempts: exactly what ran, when the model knows it
    retries = case.options.get("retries") or 0
    if markers is not None and (keep_going or got.error is None):
        exact = all(o.attempts is not None for i, o in enumerate(outcomes) if i not in kept)
        ran = {i: attempts(markers, x) for i, x in enumerate(case.items) if i not in kept}
        # a chunk whose results were lost with its worker (dask holds results on the worker) is
        # run again and said to be (report.lost): what it gave is unknown, one retry at most
        # (an item may not have run in a lost chunk: one stops at its first failure without --keep-going)
        said = any("lost with a worker" in note for note in r.notes)
        # (a chunk lost after a failed map ended is recorded, but the map's notes were written)
        assert said == bool(lost) if got.error is None else (not said or bool(lost)), (lost, r.notes)
        if exact:
            want_retried = sum(outcomes[i].attempts - 1 for i in ran)
            hidden = sum(lost.values())
            assert want_retried - hidden <= r.retried <= want_retried, \
                f"report.retried is {r.retried}, the truth is {want_retried} ({hidden} results lost with a worker)"
        for i, e in r.errors.items():
            o = outcomes[i]
            if retries and _retried_on(case.options, type(e)) and o.attempts is not None:
                assert o.attempts - lost.get(i, 0) <= len(r.attempts.get(i, ())) <= o.attempts, \
                    (i, r.attempts.get(i), o.attempts, lost.get(i))
            elif not retries or not _retried_on(case.options, type(e)):
                assert i not in r.attempts, f"item {i} was not retried, yet attempts[{i}] = {r.attempts[i]}"
