"""dump_function pickles a function once while nothing it ships can have changed (serialize.py)."""
import pickle
import types

import cloudpickle

from poolmagic.serialize import _fingerprint, dump_function


def _cell(src: str, ns: dict | None = None) -> types.FunctionType:
    """The function a notebook cell defines (module __main__, compiled anew as each run is)."""
    ns = {"__name__": "__main__"} if ns is None else ns
    exec(compile(src, "<cell>", "exec"), ns)
    return ns["f"]


def _run(payload, x):
    return pickle.loads(payload.data, buffers=payload.buffers)(x)


def test_a_rerun_cell_reuses_its_payload():
    a = _cell("def f(x):\n    return x + 1\n")
    b = _cell("def f(x):\n    return x + 1\n")
    assert dump_function(a) is dump_function(b)
    assert _run(dump_function(b), 1) == 2


def test_a_list_global_changed_in_place_is_pickled_again():
    ns = {"__name__": "__main__", "DATA": [1]}
    f = _cell("def f(x):\n    return DATA[-1] + x\n", ns)
    first = dump_function(f)
    ns["DATA"].append(10)
    assert _fingerprint(f) is None
    assert _run(dump_function(f), 0) == 10 and _run(first, 0) == 1


def test_a_rebound_number_string_or_module_gives_a_new_version():
    import math
    import os

    ns = {"__name__": "__main__", "N": 1000, "S": "a", "M": math}
    f = _cell("def f(x):\n    return (N, S, M.__name__)\n", ns)
    keys = {dump_function(f).key}
    for name, value in [("N", 2000), ("S", "b"), ("M", os), ("N", 2000.0), ("N", True)]:
        ns[name] = value
        keys.add(dump_function(f).key)
        assert _run(dump_function(f), 0)[0] == ns["N"]
    assert len(keys) == 6


def test_floats_are_told_apart_by_their_bits():
    ns = {"__name__": "__main__", "Z": 0.0}
    f = _cell("def f(x):\n    return Z\n", ns)
    plus = dump_function(f)
    ns["Z"] = -0.0
    assert dump_function(f).key != plus.key
    assert str(_run(dump_function(f), 0)) == "-0.0"


def test_closures_defaults_and_late_globals_count():
    g = _cell("def f(x):\n    def inner(y, k=3):\n        return x + y + k\n    return inner\n")
    assert _run(dump_function(g(1)), 1) == 5 and _run(dump_function(g(2)), 1) == 6
    ns = {"__name__": "__main__"}
    f = _cell("def f(x, k=1):\n    return x + k + (abs(0) if 'abs' not in globals() else abs(0))\n", ns)
    before = dump_function(f).key
    f.__defaults__ = (2,)
    assert dump_function(f).key != before
    ns["abs"] = 5  # a global shadowing a builtin it reads: shipped, a new version
    assert _fingerprint(f) != _fingerprint(_cell("def f(x, k=1):\n    return 0\n"))
    assert dump_function(f).key != before


def test_what_may_change_in_place_is_never_cached():
    ns = {"__name__": "__main__"}
    exec("def helper(x):\n    return x\n", ns)
    f = _cell("def f(x):\n    return helper(x)\n", ns)
    assert _fingerprint(f) is None  # a helper function can be redefined in place (its __code__)
    f2 = _cell("def f(x):\n    return x\n")
    f2.attr = [1]
    assert _fingerprint(f2) is None
    mod = types.ModuleType("lat2_dynamic")  # not importable: cloudpickle ships it by value
    ns2 = {"__name__": "__main__", "mod": mod}
    assert _fingerprint(_cell("def f(x):\n    return mod\n", ns2)) is None


def test_a_module_registered_by_value_is_not_taken_as_a_reference():
    import json

    ns = {"__name__": "__main__", "json": json}
    f = _cell("def f(x):\n    return json\n", ns)
    assert _fingerprint(f) is not None
    cloudpickle.register_pickle_by_value(json)
    try:
        assert _fingerprint(f) is None
    finally:
        cloudpickle.unregister_pickle_by_value(json)


def test_a_notebooks_lru_cache_function_travels_by_value():
    """``@functools.lru_cache``/``@cache`` on a notebook function: its wrapper pickled by name
    (``__main__.f``), so every worker failed with "Can't get attribute 'f' on <module '__main__'>"."""
    f = _cell("import functools\n@functools.lru_cache(maxsize=8)\ndef f(x):\n    return x * 3\n")
    back = pickle.loads(dump_function(f).data)
    assert back(4) == 12 and back.cache_parameters() == {"maxsize": 8, "typed": False}
    assert back.__wrapped__(5) == 15 and back.__name__ == "f"
    helper = _cell("import functools\n@functools.cache\ndef g(x):\n    return x + 1\ndef f(x):\n    return g(x) * 2\n")
    assert _run(dump_function(helper), 1) == 4


def test_an_importable_lru_cache_function_still_goes_by_name():
    import functools
    import posixpath

    cached = functools.lru_cache(posixpath.basename)
    assert cached.__module__ == "posixpath"  # not findable under its name: by value, and it works
    assert pickle.loads(dump_function(cached).data)("/a/b") == "b"
    import fnmatch

    assert isinstance(fnmatch._compile_pattern, functools._lru_cache_wrapper)
    assert b"_compile_pattern" in dump_function(fnmatch._compile_pattern).data  # by reference


class Counted:
    """Counts how often it is pickled (in this process)."""

    pickled = 0

    def __init__(self, n: int = 3):
        self.n = n

    def __reduce__(self):
        Counted.pickled += 1
        return (Counted, (self.n,))


def _use(x, c, a):
    return x * c.n + float(a[x])


def test_a_kw_value_is_pickled_once_per_map_and_its_buffers_travel_as_they_are():
    """A --kw value was pickled twice a map: for its key (to say later that it changed) and inside
    the payload; a DataFrame with a string column made that 0.3 s twice. The payload holds the first
    pickle as it is, and an array's memory still travels out of band."""
    import gc
    import sys

    import numpy as np

    from poolmagic import Pool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        a = np.arange(50_000, dtype=np.float64)
        with Pool(2) as pool:
            for k in range(3):
                Counted.pickled = 0
                report = pool.run(_use, range(4), kwargs={"c": Counted(k), "a": a})
                assert Counted.pickled == 1
                assert report.results == [x * k + float(a[x]) for x in range(4)]
                del report
                gc.collect()  # a buffer of a view of a buffer, freed by the collector, once crashed here
            from poolmagic.versions import kw_pickles
            from poolmagic.serialize import dump_function
            import functools

            pre = {id(a): (a, *kw_pickles({"a": a})["a"])}
            payload = dump_function(functools.partial(_use, c=Counted(1), a=a), pre)
            assert any(v.nbytes == a.nbytes for v in payload.buffers)  # not copied into the pickle
            assert len(payload.data) < a.nbytes // 10
            assert _run(payload, 2) == 2 + 2.0
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_module_s_bound_method_goes_by_name():
    """``from random import randint``: the worker's own ``random.randint``, not a copy of the kernel's
    generator (which every worker drew the same numbers from, and --seed did not seed)."""
    import random

    import numpy as np
    from numpy.random import normal

    ns = {"__name__": "__main__", "randint": random.randint, "normal": normal, "rnd": random.random}
    f = _cell("def f(x):\n    return randint, normal, rnd\n", ns)
    payload = dump_function(f)
    loaded = pickle.loads(payload.data, buffers=payload.buffers)
    assert loaded(0) == (random.randint, np.random.normal, random.random)
    assert loaded(0)[0] is random.randint and loaded(0)[1] is np.random.normal
    assert loaded(0)[2] is random.random  # a method in C (from random import random)
    own = random.Random(1)
    g = _cell("def f(x):\n    return draw\n", {"__name__": "__main__", "draw": own.random})
    copied = pickle.loads(dump_function(g).data)(0)
    assert copied is not own.random and copied() == own.random()  # a generator of the notebook's: by value
    assert pickle.loads(dump_function(_cell("def f(x):\n    return len\n", {"__name__": "__main__"})).data)(0) is len
