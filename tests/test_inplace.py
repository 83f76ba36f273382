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


# ------------------------------------------------------------------ state kept from one call to the next
def _counter():
    n = 0

    def count(x):
        nonlocal n
        n += 1
        return n
    return count


def _collector():
    seen = []

    def collect(x):
        seen.append(x)
        return len(seen)
    return collect


def _reader():
    table = {"a": 1}

    def read(x):
        return table.get(x)
    return read


def _acc(x, acc=[]):  # noqa: B006 (the point of the test)
    acc.append(x)
    return len(acc)


def _acc_kw(x, *, seen={}):  # noqa: B006
    seen[x] = 1
    return len(seen)


def _tuple_default(x, shape=(1, 2)):
    return x, shape


def _int_iadd(x, total=0):
    total += x  # a local rebinding of an int: no state
    return total


def test_state_kept_between_calls_is_found():
    from poolmagic.inplace import kept_state

    assert kept_state(_counter()) == ["the closure variable 'n'"]
    assert kept_state(_collector()) == ["the closure variable 'seen'"]
    assert kept_state(_acc) == ["its default argument 'acc'"]
    assert kept_state(_acc_kw) == ["its default argument 'seen'"]


def test_reading_closures_and_immutable_defaults_keeps_no_state():
    from poolmagic.inplace import kept_state

    assert kept_state(_reader()) == []
    assert kept_state(_tuple_default) == []
    assert kept_state(_int_iadd) == []
    assert kept_state(functools.partial(_tuple_default, shape=(3,))) == []


def test_attributes_of_notebook_functions_and_classes(ip):
    ip.run_cell("class Tally:\n    n = 0\n"
                "def by_class(x):\n    Tally.n += 1\n    return Tally.n\n"
                "def by_attr(x):\n    by_attr.calls = getattr(by_attr, 'calls', 0) + 1\n    return by_attr.calls\n"
                "def reads_attr(x):\n    return Tally.n + x\n")
    from poolmagic.inplace import kept_state

    assert kept_state(ip.user_ns["by_class"]) == ["an attribute of the notebook's class 'Tally'"]
    assert kept_state(ip.user_ns["by_attr"]) == ["an attribute of the notebook's function 'by_attr'"]
    assert kept_state(ip.user_ns["reads_attr"]) == []


def test_a_map_of_a_counting_function_says_why_it_differs_from_the_loop(local_pool):
    count = _counter()
    report = local_pool.run(count, range(6), chunksize=1)
    assert any("keeps state from one call to the next in the closure variable 'n'" in n for n in report.notes), \
        report.notes


class _Acc:
    def __init__(self):
        self.n = 0

    def add(self, x):
        self.n += x
        return self.n

    def pure(self, x):
        return x + self.n

    @classmethod
    def make(cls, x):
        cls.last = x
        return x


def test_a_method_that_changes_its_object_keeps_state():
    from poolmagic.inplace import kept_state

    acc = _Acc()
    assert kept_state(acc.add) == ["the _Acc object the method add() is bound to"]
    assert kept_state(functools.partial(acc.add)) == ["the _Acc object the method add() is bound to"]
    assert kept_state(acc.pure) == []
    assert kept_state(_Acc.make) == []  # bound to the class: a class of a module, not the notebook's


def test_a_c_method_that_changes_its_object_is_found():
    import collections

    from poolmagic.inplace import changed_receiver

    assert changed_receiver([].append) == "list"
    assert changed_receiver(set().add) == "set"
    assert changed_receiver({}.update) == "dict"
    assert changed_receiver(collections.deque().appendleft) == "deque"
    assert changed_receiver(functools.partial({}.setdefault)) == "dict"
    assert changed_receiver([].count) is None  # reads only
    assert changed_receiver(len) is None and changed_receiver(str.upper) is None


def test_a_map_of_out_append_says_the_notebooks_list_stays_empty(local_pool):
    out = []
    report = local_pool.run(out.append, range(3))
    assert out == [] and any("list.append() changes its list in place" in n for n in report.notes), report.notes
