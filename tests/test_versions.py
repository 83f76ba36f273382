"""versions.py: the keys a checkpoint, --resume and %pooldebug compare to say what changed."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from poolmagic.versions import code_key, kw_keys

SCRIPT = "from poolmagic.versions import kw_keys; print(kw_keys({'s': {'alpha', 'beta', 'gamma', 'delta', 'eps'}}))"


def _keys_in_new_interpreter(hashseed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout


def test_a_set_of_str_kw_has_the_same_key_in_every_kernel():
    """A set of str pickles in another order under another hash seed: a checkpoint resumed in a new
    kernel said '--kw s changed' though the value was the same."""
    assert _keys_in_new_interpreter("1") == _keys_in_new_interpreter("2")


def test_kw_keys_change_with_a_value_changed_in_place():
    a, lst = np.zeros(8), [1, 2]
    before = kw_keys({"a": a, "l": lst})
    a[3] = 1.0
    lst.append(3)
    after = kw_keys({"a": a, "l": lst})
    assert before["a"] != after["a"] and before["l"] != after["l"]


def test_code_key_leaves_out_where_the_code_was_compiled():
    src = "def f(x, k=2):\n    return x * k\n"
    one, two, other = {}, {}, {}
    exec(compile(src, "<ipython-input-1-abc>", "exec"), one)
    exec(compile("\n\n" + src, "<ipython-input-7-def>", "exec"), two)
    exec(compile(src.replace("x * k", "x + k"), "<ipython-input-1-abc>", "exec"), other)
    assert code_key(one["f"]) == code_key(two["f"]) != code_key(other["f"])


def test_keys_made_in_the_kernel_see_in_place_changes_and_reuse_the_payloads_digests():
    """What --resume and %pooldebug compare (stable=False): a hash of the pickle, with a big buffer's
    digest taken from the map's own payload (hashed once per map, not twice)."""
    from poolmagic.serialize import dump_function
    from poolmagic.versions import kw_record, value_key
    import functools

    a = np.arange(100_000, dtype=np.float64)
    here = value_key(a, stable=False)
    assert here.startswith("k") and here == value_key(a.copy(), stable=False)
    payload = dump_function(functools.partial(np.add, a))
    assert list(payload.digests) == [(id(a), a.nbytes)]
    keys, _ = kw_record({"a": a}, stable=False, digests=payload.digests)
    assert keys == {"a": here}
    planted = {(id(a), a.nbytes): (b"\0" * 32, a)}  # a digest given is used, not recomputed
    assert kw_record({"a": a}, stable=False, digests=planted)[0] != keys
    a[7] = -1.0
    assert value_key(a, stable=False) != here
    assert kw_keys({"a": a}, like=keys)["a"].startswith("k")  # made as the recorded ones were
    assert not kw_keys({"a": a}, like={"a": "i00"})["a"].startswith("k")


def test_a_module_s_bound_method_is_keyed_by_name_not_by_its_generator_s_state():
    """``from random import randint``: the notebook drawing a number is not 'a changed function'."""
    import random

    ns = {"__name__": "__main__", "randint": random.randint}
    exec(compile("def f(x):\n    return randint(0, x)\n", "<ipython-input-1-abc>", "exec"), ns)
    for stable in (True, False):
        before = code_key(ns["f"], stable)
        random.random()
        assert code_key(ns["f"], stable) == before
