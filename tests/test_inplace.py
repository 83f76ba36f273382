"""inplace.py: a function that returns nothing and changes its argument in place, read from its bytecode."""
from __future__ import annotations

import functools

from poolmagic.inplace import changed_parameter


def _norm(a):
    a -= a.mean()


def _set_column(df):
    df.loc[df.x > 0, "y"] = 2


def _drop(df):
    if df.empty:
        return
    df.drop(columns=["x"], inplace=True)


def _append(rows):
    rows[0].append(1)


def _attr(o):
    o.a.b = 3


def _returns(df):
    df["x"] = 1
    return df


def _key(a, d):
    d[a] = 1


def _local(x):
    d = {}
    d[x] = 1
    print(d)


def _writes(df):
    df.to_parquet("x.pq")


class _Holder:
    def method(self, lst):
        lst.sort()


def test_a_change_to_the_item_s_parameter_is_found():
    assert changed_parameter(_norm) == "a"
    assert changed_parameter(_set_column) == "df"
    assert changed_parameter(_drop) == "df"
    assert changed_parameter(_append) == "rows"
    assert changed_parameter(_attr) == "o"
    assert changed_parameter(_Holder().method) == "lst"
    assert changed_parameter(functools.partial(_norm)) == "a"


def test_a_function_that_returns_or_changes_something_else_is_not():
    assert changed_parameter(_returns) is None  # the results carry the change
    assert changed_parameter(_key) is None  # a is a key; d is not the item
    assert changed_parameter(_key, star=True) == "d"  # with --star every argument is part of the item
    assert changed_parameter(_local) is None
    assert changed_parameter(_writes) is None
    assert changed_parameter(len) is None


def test_notebook_globals_changed_in_place_are_found():
    import sys

    from poolmagic.inplace import changed_globals

    ns = {"__name__": "__main__", "out": [], "memo": {}, "cfg": type("C", (), {})(), "sys": sys}
    exec(compile("def a(x):\n    out.append(x)\n"
                 "def b(x):\n    memo[x] = x * 2\n    return memo[x]\n"
                 "def c(x):\n    cfg.n = x\n    sys.path.append('x')\n"
                 "def d(x):\n    return out[0] + len(memo)\n", "<cell>", "exec"), ns)
    assert changed_globals(ns["a"]) == ("out",)
    assert changed_globals(ns["b"]) == ("memo",)
    assert changed_globals(ns["c"]) == ("cfg",)  # a module reached through is not the notebook's
    assert changed_globals(ns["d"]) == ()
    import multiprocessing.managers

    ns["out"] = multiprocessing.managers.ListProxy.__new__(multiprocessing.managers.ListProxy)
    assert changed_globals(ns["a"]) == ()  # a Manager's list is shared on purpose
    assert changed_globals(_append) == ()  # not a notebook function
