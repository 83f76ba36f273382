"""The stable identity of items (identity.py): equal values give equal digests in any
process, whatever PYTHONHASHSEED; different values give different digests; what has
no stable identity is refused by name.

Values are compared across two fresh interpreters, each started with its own
PYTHONHASHSEED: the values travel as a pickle (so sets of str are rebuilt in the
other process's hash order) and their classes live in ``identity_types.py``, which
both processes import, as two kernels both run a notebook's class definitions.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolmagic.identity import IdentityError, digest, item_key, keys

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import identity_types as T  # noqa: E402  (the classes both interpreters import)

# ---------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False), st.complex_numbers(allow_nan=False), st.text(max_size=8),
    st.binary(max_size=8), st.just(...),
)
hashables = st.one_of(st.integers(), st.text(max_size=6), st.binary(max_size=4), st.booleans(), st.none())


def containers(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(hashables, children, max_size=4),
        st.frozensets(st.text(max_size=6), max_size=6),
        st.sets(hashables, max_size=6),
        st.builds(T.Point, st.integers(), st.text(max_size=4)),
        st.builds(T.Slotted, children, children),
        st.builds(T.Pair, children, children),
        st.builds(T.Plain, children),
        st.integers(min_value=-3, max_value=3).flatmap(
            lambda a: st.integers(min_value=0, max_value=6).map(lambda n: range(a, a + n))),
    )


values = st.recursive(scalars, containers, max_leaves=12)


# ---------------------------------------------------------------- in one process


@settings(max_examples=300, deadline=None, derandomize=True)
@given(values)
def test_equal_values_have_equal_digests_in_one_process(v):
    assert digest(v) == digest(copy.deepcopy(v)) == digest(pickle.loads(pickle.dumps(v)))
    assert len(digest(v)) == 16 and len(item_key(v)) == 8


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])
@given(values, values)
def test_different_values_have_different_digests(a, b):
    if a == b or type(a) is range or type(b) is range:  # a range is the list it yields
        return
    assert digest(a) != digest(b), (a, b)


def test_types_that_compare_equal_are_still_different_items():
    """1, 1.0 and True compare equal, but a function may treat them differently."""
    assert len({digest(1), digest(1.0), digest(True), digest(np.int64(1)), digest(np.float64(1.0))}) == 5
    assert digest((1, 2)) != digest([1, 2])
    assert digest({"a": 1, "b": 2}) != digest({"b": 2, "a": 1})  # a dict in its insertion order
    assert digest({"a", "b"}) != digest(frozenset({"a", "b"})) != digest(["a", "b"])
    assert digest(T.Point(1, "a")) != digest(T.Other(1, "a"))  # same fields, another class


def test_a_range_is_the_list_of_its_values():
    assert digest(range(20)) == digest(list(range(20)))
    assert digest(range(3, -9, -4)) == digest([3, -1, -5])
    assert keys(range(20)) == keys(list(range(20))) == b"".join(item_key(i) for i in range(20))
    assert keys(range(2**70, 2**70 + 3)) == keys([2**70, 2**70 + 1, 2**70 + 2])


@pytest.mark.parametrize("make, part", [
    (lambda: lambda x: x, "it is '<lambda>"),
    (lambda: T.Plain(lambda: 0), "its .value is '<lambda>"),
    (lambda: [1, open(os.devnull)], "its [1] is a _io.TextIOWrapper"),
    (lambda: (x for x in ()), "it is a builtins.generator"),
    (lambda: {"k": T.Plain(__import__("threading").Lock())}, "its ['k'].value is a _thread.lock"),
])
def test_what_cannot_be_identified_is_refused_by_name(make, part):
    value = make()
    with pytest.raises(IdentityError) as info:
        keys(["fine", value], [6, 7], "a checkpoint")
    message = str(info.value)
    assert message.startswith(f"cannot identify item 7 for a checkpoint (type {type(value).__module__}."), message
    assert part in message, message


def test_a_value_that_contains_itself_is_refused():
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(IdentityError, match="contains itself"):
        digest(loop)


# ---------------------------------------------------------------- across interpreters


CHILD = """
import pickle, sys
sys.path.insert(0, {here!r})
import identity_types
from poolmagic.identity import digest
imported = [m for m in ("numpy", "pandas") if m in sys.modules]
values = pickle.load(open({path!r}, "rb"))
print(imported if {check_imports} else [])
for v in values:
    print(digest(v).hex())
"""


def digests_elsewhere(values: list, seed: int, tmp: Path, check_imports: bool = False) -> tuple[list, list[str]]:
    """The digests of ``values`` in a fresh interpreter with ``PYTHONHASHSEED=seed``."""
    path = tmp / f"values-{seed}-{time.monotonic_ns()}.pickle"
    path.write_bytes(cloudpickle.dumps(values))  # itertuples() rows: their class is made anew there
    code = CHILD.format(here=str(HERE), path=str(path), check_imports=check_imports)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": str(seed)})
    assert out.returncode == 0, out.stderr
    first, *rest = out.stdout.splitlines()
    return eval(first), rest


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(values, min_size=5, max_size=30))
def test_equal_values_have_equal_digests_across_interpreters_and_hash_seeds(tmp_path_factory, batch):
    tmp = tmp_path_factory.mktemp("identity")
    here = [digest(v).hex() for v in batch]
    assert digests_elsewhere(batch, 1, tmp)[1] == here
    assert digests_elsewhere(batch, 4242, tmp)[1] == here


def test_numpy_pandas_and_sets_of_str_across_interpreters(tmp_path):
    df = pd.DataFrame({"a": np.arange(4), "s": list("wxyz"), "o": [frozenset({"p", "q"}), None, 1.5, ("t",)],
                       "t": pd.date_range("2024-01-01", periods=4, tz="Europe/Paris")})
    batch = [
        frozenset(f"word{i}" for i in range(50)), {f"k{i}" for i in range(20)}, {"a": {"b", "c", "d"}},
        np.arange(10, dtype=np.int16), np.random.default_rng(1).random((3, 4)), np.float32(1.5),
        np.array([{"x"}, None], dtype=object), df, df["s"], df.index, pd.MultiIndex.from_product([[1, 2], list("ab")]),
        *df.itertuples(), T.Point(3, "p"), T.Pair(frozenset({"x", "y"}), [T.Slotted(1, 2)]),
    ]
    here = [digest(v).hex() for v in batch]
    assert digests_elsewhere(batch, 7, tmp_path)[1] == here
    assert digests_elsewhere(batch, 8, tmp_path)[1] == here


def test_builtins_never_import_numpy_or_pandas(tmp_path):
    imported, got = digests_elsewhere([1, "a", {frozenset({"b"})}, T.Point(1, "x"), range(3)], 3, tmp_path,
                                      check_imports=True)
    assert imported == [] and len(got) == 5


# ---------------------------------------------------------------- cost (printed, not asserted)


def test_identity_cost(capsys):
    """Measured and printed for docs/design.md; nothing here asserts a time."""
    ints = list(range(100_000))
    strs = [f"item-{i}" for i in ints]
    points = [T.Point(i, "p") for i in range(20_000)]
    arrays = [np.random.default_rng(i).random(10_000_000 // 8) for i in range(8)]

    def best(fn, n=3) -> float:
        out = math.inf
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    t_keys_range = best(lambda: keys(range(100_000)))
    t_keys_ints = best(lambda: keys(ints))
    t_dig_ints = best(lambda: [digest(x) for x in ints[:20_000]]) / 20_000
    t_keys_strs = best(lambda: keys(strs)) / len(strs)
    t_points = best(lambda: keys(points)) / len(points)
    t_arrays = best(lambda: keys(arrays), 2)
    with capsys.disabled():
        print(
            f"\n[identity cost] keys of range(100k) {t_keys_range * 1e3:.2f} ms, of a list of 100k ints "
            f"{t_keys_ints * 1e3:.2f} ms; digest of one int {t_dig_ints * 1e6:.2f} µs; key of a str "
            f"{t_keys_strs * 1e6:.2f} µs; of a dataclass {t_points * 1e6:.2f} µs; 8 x 10 MB arrays "
            f"{t_arrays * 1e3:.0f} ms ({t_arrays * 1e3 / 80:.2f} ms/MB)"
        )
    assert len(keys(arrays)) == 64
