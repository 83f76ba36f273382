"""Small pure pieces: option parsing, cores, serialization helpers, report rendering."""
from __future__ import annotations

import functools
import os
import threading

import pytest
from IPython.core.error import UsageError

from poolmagic import cores
from poolmagic.errors import SerializationError
from poolmagic.options import POOLMAP_OPTIONS, parse
from poolmagic.report import NOT_DONE, ChunkRecord, RunReport
from poolmagic.captures import explain_unpicklable, undefined_globals
from poolmagic.serialize import dump_function


def test_parse_keeps_the_expression_whole():
    p = parse("-o out --star -c 4 zip(a, b)", POOLMAP_OPTIONS)
    assert p.opts == {"out": "out", "star": True, "chunksize": 4}
    assert p.rest == "zip(a, b)"
    assert parse("  range(1, 10)  ", POOLMAP_OPTIONS).rest == "range(1, 10)"


def test_parse_bracketed_values_and_repeatable_kw():
    p = parse("--kw y=[1, 2] --kw z={'a': 1} -f partial(f, k=1) data", POOLMAP_OPTIONS)
    assert p.opts["kwargs"] == {"y": "[1, 2]", "z": "{'a': 1}"}
    assert p.opts["func"] == "partial(f, k=1)"
    assert p.rest == "data"


def test_parse_errors_are_usage_errors():
    with pytest.raises(UsageError, match="needs a value"):
        parse("-c", POOLMAP_OPTIONS)
    with pytest.raises(UsageError, match="NAME=EXPR"):
        parse("--kw y range(3)", POOLMAP_OPTIONS)
    with pytest.raises(UsageError, match="unclosed"):
        parse("--kw y=[1, range(3)", POOLMAP_OPTIONS)


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert cores._quota_from_files(tmp_path) == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores._quota_from_files(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cores._quota_from_files(tmp_path) == 1.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cores._quota_from_files(tmp_path) is None


def test_available_cores_honours_affinity_and_quota(monkeypatch):
    n = cores.available_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert n <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(cores, "cgroup_quota", lambda: 0.5)
    assert cores.available_cores() == 1
    monkeypatch.setenv("POOLMAGIC_CORES", "3")
    assert cores.available_cores() == 3


def test_payload_key_changes_with_captured_values():
    scale = [2]

    def f(x):
        return x * scale[0]

    k1 = dump_function(f).key
    assert dump_function(f).key == k1  # deterministic
    scale[0] = 3
    assert dump_function(f).key != k1


def test_numpy_buffers_travel_out_of_band():
    np = pytest.importorskip("numpy")
    big = np.ones(1_000_000)

    def f(i):
        return big[i]

    p = dump_function(f)
    assert len(p.data) < 10_000 and p.buffers and p.buffers[0].nbytes == big.nbytes


def test_explain_unpicklable_names_closure_partial_and_default():
    lock = threading.Lock()

    def closure(x):
        return lock

    assert "closure variable 'lock'" in explain_unpicklable(closure, TypeError())
    part = functools.partial(abs, lock)
    assert "positional argument 0 of the partial" in explain_unpicklable(part, TypeError())

    def with_default(x, lk=lock):
        return lk

    with pytest.raises(SerializationError, match="default argument"):
        dump_function(with_default)


def test_undefined_globals_follows_helpers_and_ignores_builtins():
    g: dict = {}
    exec("def helper(x):\n    return x + MISSING\ndef main(x):\n    return len([helper(x)])\n", g)
    assert undefined_globals(g["main"]) == [("helper", "MISSING")]
    exec("def setter():\n    global LATER\n    LATER = 1\n    return LATER\n", g)
    assert undefined_globals(g["setter"]) == []


def test_report_figures_and_rendering():
    r = RunReport(func_name="f", items=4, results=[1, 2, NOT_DONE, 4], cores=8, t_start=0.0, t_end=2.0)
    r.chunks = [ChunkRecord(0, 0, 2, 0.0, 1.5, [0.5, 1.0]), ChunkRecord(1, 2, 2, 0.0, 1.5)]
    r.done = 3
    r.errors = {2: ValueError("x")}
    r.status = "failed"
    assert r.busy_s == 3.0 and r.speedup == 1.5 and r.workers == 2
    assert r.item_times() == [0.5, 1.0, 0.75, 0.75]
    assert "4 items (3 ok, 1 failed)" in r.summary() and "8 cores" in r.summary()
    assert "1 failed" in r._repr_html_()
    assert repr(NOT_DONE) == "NOT_DONE" and not NOT_DONE


def test_run_chunk_keeps_results_before_a_failure_and_attributes_output():
    from poolmagic.engine.core.chunk import run_chunk  # the item loop (core.runchunk reads the options)

    def f(x):
        print("at", x)
        if x == 12:
            raise ValueError(x)
        return x * 2

    for timed in (False, True):
        out, t0, t1, times, records, errors = run_chunk(f, range(10, 15), 10, timed=timed)
        assert out == [20, 22, NOT_DONE]  # stopped at the failure, earlier results kept
        assert [i for i, _ in errors] == [12] and errors[0][1]["type"] == "builtins.ValueError"
        assert [(i, text) for i, _, text in records] == [(10, "at 10\n"), (11, "at 11\n"), (12, "at 12\n")]
        assert t1 >= t0 and (times is None) is (not timed)
    out, *_, errors = run_chunk(f, range(10, 15), 10, keep_going=True)
    assert out == [20, 22, NOT_DONE, 26, 28] and [i for i, _ in errors] == [12]
