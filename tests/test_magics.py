"""%%poolmap in a real InteractiveShell: parsing, cell semantics, bad input (%poolsize: test_poolsize.py)."""
from __future__ import annotations

import re

import pytest
from IPython.core.error import UsageError

import poolmagic
from poolmagic.cellfunc import split_func_and_iterable, uncalled_functions


def cell(ip, line: str, body: str):
    return ip.run_cell_magic("poolmap", line, body)


# ------------------------------------------------------------------ basics


def test_globals_helpers_classes_and_imports_from_earlier_cells(ip):
    ip.run_cell(
        "OFFSET = 1000\n"
        "class Box:\n    def __init__(self, v): self.v = v\n"
        "def helper(x):\n    return x + OFFSET\n"
    )
    out = cell(ip, "range(5)", "import math\ndef work(x):\n    return Box(helper(math.isqrt(x))).v\n")
    assert out == [1000 + int(x**0.5) for x in range(5)]


def test_lambda_assignment_is_selected(ip):
    assert cell(ip, "range(3)", "f = lambda x: x + 1\n") == [1, 2, 3]


def test_two_unrelated_functions_need_f_which_selects_one(ip):
    body = "def first(x):\n    return 'first'\ndef second(x):\n    return 'second'\n"
    with pytest.raises(UsageError, match=r"\(first, second\).*-f NAME"):
        cell(ip, "range(2)", body)
    assert cell(ip, "-f first range(2)", body) == ["first", "first"]
    assert cell(ip, "-f second range(2)", body) == ["second", "second"]


def test_closure_over_notebook_variable_sees_current_value(ip):
    ip.run_cell("SCALE = 2")
    body = "def scaled(x):\n    return x * SCALE\n"
    assert cell(ip, "range(3)", body) == [0, 2, 4]
    ip.run_cell("SCALE = 10")
    assert cell(ip, "range(3)", body) == [0, 10, 20]  # a new version is shipped


def test_iterable_expression_with_spaces_and_commas(ip):
    ip.run_cell("a = [1, 2, 3]; b = [10, 20, 30]")
    assert cell(ip, "range(1, 10, 3)", "def ident(x):\n    return x\n") == [1, 4, 7]
    assert cell(ip, "--star zip(a, b)", "def add(x, y):\n    return x + y\n") == [11, 22, 33]
    assert cell(ip, "(i for i in a if i != 2)", "def ident(x):\n    return x\n") == [1, 3]
    assert cell(ip, "{'k': 1, 'j': 2}", "def ident(x):\n    return x\n") == ["k", "j"]


def test_o_binds_results_and_returns_nothing(ip):
    assert cell(ip, "-o squares -q range(4)", "def sq(x):\n    return x * x\n") is None
    assert ip.user_ns["squares"] == [0, 1, 4, 9]


def test_a_trailing_semicolon_silences_the_cells_value_as_after_a_python_line(ip):
    """``%%poolmap range(3);`` was refused ('ITERABLE `range(3);` is not a Python expression'),
    and so was ``r = %poolmap f range(3);``."""
    assert cell(ip, "-q range(3);", "def semi(x):\n    return x + 1\n") is None
    assert ip.user_ns["_poolmap"].results == [1, 2, 3]
    assert cell(ip, "-q range(3) ; ", "def semi(x):\n    return x + 1\n") is None
    assert ip.run_line_magic("poolmap", "-q semi range(2);") == [1, 2]  # r = %poolmap semi range(2);


def test_report_bound_to__poolmap(ip):
    cell(ip, "-q range(20)", "def sq(x):\n    return x * x\n")
    r = ip.user_ns["_poolmap"]
    assert isinstance(r, poolmagic.RunReport)
    assert r.results == [x * x for x in range(20)]
    assert r.errors == {}
    assert r.items == 20 and r.status == "done"
    assert r.wall_s > 0 and r.cores >= 1 and 1 <= r.workers <= poolmagic.get_pool().size
    assert r.speedup >= 0
    assert sum(c.count for c in r.chunks) == 20
    assert len(r.item_times()) == 20 and all(t is not None for t in r.item_times())


def test_chunksize_option_is_used(ip):
    cell(ip, "-q -c 5 range(20)", "def sq(x):\n    return x\n")
    assert sorted(c.count for c in ip.user_ns["_poolmap"].chunks) == [5, 5, 5, 5]


def test_workers_option_limits_workers_for_this_cell(ip):
    cell(ip, "-q -n 1 -c 1 range(8)", "def slow(x):\n    import time; time.sleep(0.01); return x\n")
    assert ip.user_ns["_poolmap"].workers == 1


def test_report_html_and_text_forms(ip):
    cell(ip, "-q range(3)", "def sq(x):\n    return x\n")
    r = ip.user_ns["_poolmap"]
    html = r._repr_html_()
    assert "poolmagic" in html and "3 items" in html and "speedup" in html
    assert repr(r).startswith("poolmagic: sq() · 3 items in")


def test_help_is_generated_from_the_option_table(ip):
    doc = ip.find_cell_magic("poolmap").__doc__
    for opt in ("--star", "--chunksize", "--timeout", "--keep-going", "-o", "-n", "-q", "-f"):
        assert opt in doc


def test_line_form_maps_a_callable_expression(ip):
    ip.run_cell("from functools import partial\ndef power(x, y):\n    return x ** y\n")
    assert ip.run_line_magic("poolmap", "-q -f partial(power, y=2) range(1, 5)") == [1, 4, 9, 16]
    assert ip.run_line_magic("poolmap", "-q abs range(-2, 1)") == [2, 1, 0]
    assert ip.run_line_magic("poolmap", "-q --kw y=3 power range(1, 3)") == [1, 8]


# ------------------------------------------------------------------ bad input


def usage_error(ip, line, body) -> str:
    with pytest.raises(UsageError) as e:
        cell(ip, line, body)
    return str(e.value)


def test_cell_without_function_is_rejected_before_running(ip):
    ip.user_ns.pop("ran", None)
    msg = usage_error(ip, "range(3)", "ran = True\nx = 1\n")
    assert "defines no function" in msg
    assert "ran" not in ip.user_ns  # the cell did not run


def test_a_cell_that_deletes_its_function_is_told_so(ip):
    """It said 'the function to map is a NoneType, which is not callable'."""
    msg = usage_error(ip, "range(3)", "def gone(x):\n    return x\ndel gone\n")
    assert msg == "the cell defines gone(), but once it ran the name 'gone' is not defined", msg


def test_f_name_undefined_or_not_callable(ip):
    assert "not defined" in usage_error(ip, "-f nosuchfn range(3)", "x = 1\n")
    ip.run_cell("notfn = 5")
    assert "not callable" in usage_error(ip, "-f notfn range(3)", "x = 1\n")


def test_iterable_undefined_name_is_named(ip):
    msg = usage_error(ip, "range(N_UNDEFINED)", "def f(x):\n    return x\n")
    assert "N_UNDEFINED" in msg and "not defined" in msg


def test_iterable_not_iterable_says_its_type(ip):
    assert "int" in usage_error(ip, "42", "def f(x):\n    return x\n")
    assert "not iterable" in usage_error(ip, "42", "def f(x):\n    return x\n")


def test_iterable_that_raises(ip):
    msg = usage_error(ip, "1 / 0", "def f(x):\n    return x\n")
    assert "ZeroDivisionError" in msg


def test_iterable_syntax_error_before_running_the_cell(ip):
    ip.user_ns.pop("ran2", None)
    msg = usage_error(ip, "range(3", "ran2 = 1\ndef f(x):\n    return x\n")
    assert "not a Python expression" in msg
    assert "ran2" not in ip.user_ns


def test_missing_iterable(ip):
    assert "ITERABLE" in usage_error(ip, "-q", "def f(x):\n    return x\n")


def test_unpicklable_capture_names_the_variable_and_type(ip):
    ip.run_cell("import threading\nLOCK = threading.Lock()")
    msg = usage_error(ip, "range(3)", "def locked(x):\n    with LOCK:\n        return x\n")
    assert "'LOCK'" in msg and "lock" in msg.lower() and "cannot be pickled" in msg


def test_unpicklable_capture_through_a_helper(ip):
    ip.run_cell("import threading\nLOCK2 = threading.Lock()\ndef uses_lock(x):\n    with LOCK2:\n        return x\n")
    msg = usage_error(ip, "range(3)", "def outer(x):\n    return uses_lock(x)\n")
    assert "'LOCK2'" in msg and "uses_lock" in msg


def test_open_file_capture_is_named(ip, tmp_path):
    ip.run_cell(f"FH = open({str(tmp_path / 'f.txt')!r}, 'w')")
    msg = usage_error(ip, "range(2)", "def write(x):\n    FH.write(str(x))\n")
    assert "'FH'" in msg and "TextIOWrapper" in msg
    ip.run_cell("FH.close()")


def test_undefined_global_in_function_is_named(ip):
    msg = usage_error(ip, "range(3)", "def typo(x):\n    return x + OFSET\n")
    assert "OFSET" in msg and "not defined" in msg and "typo" in msg


def test_star_with_non_sequence_item(ip):
    msg = usage_error(ip, "--star range(3)", "def add(x, y):\n    return x + y\n")
    assert "--star" in msg and "item 0" in msg and "int" in msg


def test_unknown_option_and_bad_values(ip):
    assert "unknown option" in usage_error(ip, "--bogus range(3)", "def f(x):\n    return x\n")
    msg = usage_error(ip, "--keepgoing range(3)", "def f(x):\n    return x\n")
    assert msg.startswith("unknown option --keepgoing (did you mean --keep-going?); the options are: -o,"), msg
    assert "whole number" in usage_error(ip, "-c many range(3)", "def f(x):\n    return x\n")
    assert "at least 1" in usage_error(ip, "-n 0 range(3)", "def f(x):\n    return x\n")
    assert "more than 0" in usage_error(ip, "--timeout -1 range(3)", "def f(x):\n    return x\n")
    assert "variable name" in usage_error(ip, "-o 1abc range(3)", "def f(x):\n    return x\n")
    assert "variable name, not 'class'" in usage_error(ip, "-o class range(3)", "def f(x):\n    return x\n")


def test_error_in_cell_body_propagates_and_nothing_is_mapped(ip):
    with pytest.raises(ZeroDivisionError):
        cell(ip, "range(3)", "def f(x):\n    return x\n1 / 0\n")


def test_a_cell_run_again_in_a_loop_keeps_its_lines_in_tracebacks(ip):
    """The cell's compiled code is reused when the same cell runs the magic again
    (a loop, %timeit): its tracebacks must still show its lines, even after the
    line cache was cleared, and a changed cell must run as changed."""
    import linecache
    import traceback

    body = "def f(x):\n    return x\nif FAIL:\n    raise ValueError('cell line shown')\n"
    ip.user_ns["FAIL"] = False
    assert cell(ip, "-q range(3)", body) == [0, 1, 2]
    assert cell(ip, "-q range(3)", body) == [0, 1, 2]
    ip.user_ns["FAIL"] = True
    for clear in (False, True):
        if clear:
            linecache.clearcache()
        with pytest.raises(ValueError) as info:
            cell(ip, "-q range(3)", body)
        shown = "".join(traceback.format_exception(info.value))
        assert "raise ValueError('cell line shown')" in shown, shown
    ip.user_ns["FAIL"] = False
    assert cell(ip, "-q range(3)", body.replace("return x", "return -x")) == [0, -1, -2]


def test_a_failed_map_outside_a_cell_leaves_the_next_cells_traceback_whole(ip, capsys):
    """A magic called from a widget's callback runs in no cell: the flag that hides the
    magic's own cell line must not hide the next cell's lines (it stayed until a cell ended)."""
    ip.run_cell("def half_bad(x):\n    return 1 / (x - 1)\n")
    with pytest.raises(ZeroDivisionError):
        ip.run_line_magic("poolmap", "-q half_bad range(3)")  # as an ipywidgets on_click callback would
    capsys.readouterr()
    result = ip.run_cell("def g():\n    return 1 / 0\ng()  # the line that failed\n")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "----> 3 g()  # the line that failed" in shown and "skipping hidden" not in shown, shown
    assert "__tracebackhide__" not in ip.user_ns


def test_an_interrupted_maps_traceback_hides_the_cell_as_a_string_as_a_failed_maps_does(ip, capsys):
    """Ctrl-C during a map (here: while the kernel reads the ITERABLE) is a BaseException: its
    traceback began with the cell's ``get_ipython().run_cell_magic('poolmap', ...)`` line."""
    ip.run_cell("def stopped_items():\n    yield 1\n    raise KeyboardInterrupt\n")
    capsys.readouterr()
    result = ip.run_cell("%%poolmap stopped_items()\ndef ident_i(x):\n    return x\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    # (the cell as a string; IPython 8 on 3.10 also shows its own run_cell_magic frame, which is not it)
    assert "run_cell_magic('poolmap'" not in shown and "----> 1 def ident_i(x):" in shown, shown
    assert "poolmagic: interrupted" in shown, shown
    assert "__tracebackhide__" not in ip.user_ns


# ------------------------------------------------------------------ pure helpers


def test_uncalled_functions():
    import ast

    assert uncalled_functions(ast.parse("def a(): pass\nb = lambda: 1\n")) == (("a", "b"), ("a", "b"))
    assert uncalled_functions(ast.parse("def a(): pass\nb = lambda: a()\n")) == (("a", "b"), ("b",))
    assert uncalled_functions(ast.parse("x = 1\n")) == ((), ())
    assert uncalled_functions(ast.parse("async def c(): pass\n")) == (("c",), ("c",))


def test_split_func_and_iterable():
    assert split_func_and_iterable("partial(f, y=2) range(1, 10)") == ("partial(f, y=2)", "range(1, 10)")
    assert split_func_and_iterable("math.factorial range(5)") == ("math.factorial", "range(5)")
    with pytest.raises(UsageError):
        split_func_and_iterable("onlyone")


@pytest.mark.parametrize(
    "source",
    [
        "def f(x):\n    return x\n",
        "def f(x):\n    return x",
        "import math\nOFFSET = 3\nf = lambda x: math.sqrt(x) + OFFSET\n",
        "class A:\n    '''doc'''\n    def m(self):\n        return {'a': [1, 2]}\n",
        "x = 1 \\\n    + 2\ndef g(y):\n    return y * x\n",
        "s = '''multi\nline'''\ndef h(v):\n    return s + v\n",
    ],
)
def test_fast_transform_matches_ipython(ip, source):
    from poolmagic.cellfunc import transform

    assert transform(ip, source) == ip.transform_cell(source)


@pytest.mark.parametrize("source", ["%time x = 1\ndef f(x):\n    return x\n", "  def f(x):\n      return x\n", "!ls\n", ">>> x = 1\n"])
def test_cells_with_ipython_syntax_still_go_through_ipython(ip, source):
    from poolmagic.cellfunc import transform

    assert transform(ip, source) == ip.transform_cell(source)


def test_a_cell_with_lru_cache_functions_maps_like_the_loop(ip):
    """A mapped function decorated with @functools.cache, or calling a helper that is, failed in
    every worker: "Can't get attribute 'lru_sq' on <module '__main__'>"."""
    ip.run_cell("import functools\n@functools.lru_cache(maxsize=None)\ndef lru_sq(x):\n    return x * x\n")
    assert ip.run_line_magic("poolmap", "-q lru_sq range(4)") == [0, 1, 4, 9]
    assert cell(ip, "-q range(4)", "def uses_lru(x):\n    return lru_sq(x) + 1\n") == [1, 2, 5, 10]
