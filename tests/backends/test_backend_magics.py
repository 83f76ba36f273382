"""%%poolmap in a real InteractiveShell, on every backend: what a cell user sees must not depend on it.

The shared pool the magics use is each backend's pool in turn (``set_pool``);
these tests were in test_magics.py and test_failures.py, run on the local
backend only. Results in order, notebook classes both ways, print() and
stderr in item order, the summary, errors by item with the cell's own lines
in the traceback, --keep-going, and bad input refused before any work.
"""
from __future__ import annotations

import threading
import traceback

import pytest
from IPython.core.error import UsageError

import poolmagic
from conftest import check_partial

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module", autouse=True)
def shared(ip, backend):
    """The backend's pool is the magics' shared pool for this module."""
    poolmagic.set_pool(backend.pool)
    yield backend
    poolmagic.shutdown_pool()  # the next module's magics get a fresh local pool


def cell(ip, line: str, body: str):
    return ip.run_cell_magic("poolmap", line, body)


def test_the_magics_run_on_this_backend(ip, shared):
    assert poolmagic.get_pool() is shared.pool
    cell(ip, "-q range(3)", "def sq(x):\n    return x\n")
    assert ip.user_ns["_poolmap"].backend == shared.pool.backend.description


def test_an_error_shows_the_cells_own_lines(ip):
    body = "def fails_at_two(x):\n    if x == 2:\n        raise ValueError('bad item 2')\n    return x\n"
    with pytest.raises(ValueError) as ei:
        cell(ip, "-c 1 range(4)", body)
    lines = [f.line for f in traceback.extract_tb(ei.value.__traceback__)]
    assert "raise ValueError('bad item 2')" in lines, lines


def test_cell_defines_function_mapped_in_order(ip):
    out = cell(ip, "range(10)", "def sq(x):\n    return x * x\n")
    assert out == [x * x for x in range(10)]
    # the cell ran as a normal cell: its definitions stay in the notebook
    assert ip.user_ns["sq"](3) == 9


def test_results_can_be_notebook_class_instances(ip):
    ip.run_cell("class Point:\n    def __init__(self, x): self.x = x\n")
    out = cell(ip, "range(3)", "def mk(i):\n    return Point(i)\n")
    assert [p.x for p in out] == [0, 1, 2]
    assert type(out[0]) is ip.user_ns["Point"]


def test_items_can_be_notebook_class_instances(ip):
    ip.run_cell("class Item:\n    def __init__(self, x): self.x = x\nITEMS = [Item(i) for i in range(4)]\n")
    assert cell(ip, "ITEMS", "def get(it):\n    return it.x * 2\n") == [0, 2, 4, 6]


def test_summary_shown_in_text_and_suppressed_by_q(ip, capsys):
    cell(ip, "range(3)", "def sq(x):\n    return x\n")
    out = capsys.readouterr().out
    assert "poolmagic: sq() · 3 items in" in out and "cores available" in out and "speedup" in out
    cell(ip, "-q range(3)", "def sq(x):\n    return x\n")
    assert "poolmagic:" not in capsys.readouterr().out


def test_print_in_workers_lands_in_the_cell_in_item_order(ip, capsys):
    body = "def talk(x):\n    import time; time.sleep(0.01 * (5 - x))\n    print('item', x)\n    return x\n"
    cell(ip, "-q -c 1 range(5)", body)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("item")] == [f"item {i}" for i in range(5)]
    assert ip.user_ns["_poolmap"].outputs[0][0] == 0


def test_stderr_from_workers_is_captured(ip, capsys):
    cell(ip, "-q range(2)", "import sys\ndef warn(x):\n    print('careful', x, file=sys.stderr)\n    return x\n")
    err = capsys.readouterr().err
    assert "careful 0" in err and "careful 1" in err


def test_exception_via_magic(ip):
    cell = (
        "def fails_at_four(x):\n"
        "    if x == 4:\n"
        "        raise ValueError('bad item 4')\n"
        "    return x * 2\n"
    )
    with pytest.raises(ValueError, match="bad item 4") as ei:
        ip.run_cell_magic("poolmap", "range(10)", cell)
    exc = ei.value
    assert type(exc) is ValueError
    assert "poolmagic: item 4 (value 4) failed." in exc.__notes__
    report = ip.user_ns["_poolmap"]
    assert report is exc.poolmap_report
    check_partial(report.results, [2 * x for x in range(10)], failed={4})
    assert 4 in report.errors
    # the next cell works with no manual step
    assert ip.run_cell_magic("poolmap", "-q range(5)", "def ok(x):\n    return x + 1\n") == [1, 2, 3, 4, 5]


# ================================================================ timeouts


def test_keep_going_via_magic(ip):
    cell = (
        "def odd_fails(x):\n"
        "    if x % 2:\n"
        "        raise KeyError(x)\n"
        "    return x\n"
    )
    with pytest.raises(poolmagic.MapFailedError) as ei:
        ip.run_cell_magic("poolmap", "--keep-going range(8)", cell)
    exc = ei.value
    assert "4 of 8 items failed" in str(exc)
    assert set(exc.errors) == {1, 3, 5, 7}
    assert all(type(e) is KeyError for e in exc.errors.values())
    report = ip.user_ns["_poolmap"]
    assert report is exc.report
    assert [report.results[i] for i in (0, 2, 4, 6)] == [0, 2, 4, 6]


def test_bad_input_via_magic(ip):
    from poolmagic.engine.core.transport import OWN_PROCESS

    before = poolmagic.get_pool().last_report
    ip.user_ns["LOCK"] = threading.Lock()
    if OWN_PROCESS in poolmagic.get_pool().backend.lacks:  # threads: the items call the function itself
        assert ip.run_cell_magic("poolmap", "-q range(3)", "def locked(x):\n    with LOCK:\n        return x\n") == [0, 1, 2]
        before = poolmagic.get_pool().last_report
    else:
        with pytest.raises(UsageError) as ei:
            ip.run_cell_magic("poolmap", "range(3)", "def locked(x):\n    with LOCK:\n        return x\n")
        assert "'LOCK'" in str(ei.value) and "_thread.lock" in str(ei.value)
    with pytest.raises(UsageError) as ei:
        ip.run_cell_magic("poolmap", "42", "def fine(x):\n    return x\n")
    assert "int" in str(ei.value) and "not iterable" in str(ei.value)
    with pytest.raises(UsageError) as ei:
        ip.run_cell_magic("poolmap", "range(3)", "def typo(x):\n    return x + undefined_thing\n")
    assert "'undefined_thing'" in str(ei.value)
    assert poolmagic.get_pool().last_report is before, "a map started on bad input"
