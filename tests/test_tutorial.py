"""The multiprocessing tutorial's idioms, each as one line of poolmagic (issue 5)."""
from __future__ import annotations

import time

import pytest
from IPython.core.error import UsageError

import poolmagic
from poolmagic.tune import TuneResult, candidate_sizes
from conftest import wait_dead


def test_async_map_returns_a_handle_at_once(ip, tmp_path):
    """The items wait for a gate the test opens only after the magic returned:
    a magic that waited for them would never return (the test's timeout)."""
    ip.user_ns["_gate"] = str(tmp_path / "gate")
    out = ip.run_cell_magic("poolmap", "--async -o handle -c 1 range(4)",
                            "import os, time\ndef slow(x, gate=_gate):\n"
                            "    while not os.path.exists(gate):\n        time.sleep(0.01)\n    return x * 10\n")
    assert out is None
    h = ip.user_ns["handle"]
    assert isinstance(h, poolmagic.MapHandle) and not h.ready()
    ip.run_cell("other = 1 + 1")  # the kernel is free meanwhile
    assert ip.user_ns["other"] == 2
    (tmp_path / "gate").touch()
    assert h.get(timeout=10) == [0, 10, 20, 30]
    assert h.ready() and ip.user_ns["_poolmap"] is h.report


def test_async_error_is_raised_by_get(ip):
    ip.run_cell_magic("poolmap", "--async -o h2 -q range(3)", "def bad(x):\n    raise KeyError(x)\n")
    with pytest.raises(KeyError):
        ip.user_ns["h2"].get(timeout=10)


def test_async_without_o_returns_the_handle(ip):
    h = ip.run_cell_magic("poolmap", "--async -q range(3)", "def ident(x):\n    return x\n")
    assert isinstance(h, poolmagic.MapHandle)
    assert h.get(10) == [0, 1, 2]


def test_async_cancel(ip, tmp_path):
    """The items sleep 60 s, then leave a file: cancel stops them, it does not wait."""
    ip.user_ns["_donedir"] = str(tmp_path)
    ip.run_cell_magic("poolmap", "--async -o h3 -q -c 1 range(4)",
                      "import os, time\ndef forever(x, d=_donedir):\n    time.sleep(60)\n"
                      "    open(os.path.join(d, f'done-{x}'), 'w').close()\n")
    h = ip.user_ns["h3"]
    time.sleep(0.3)
    h.cancel()
    assert not list(tmp_path.glob("done-*")), "cancel waited for the running items"
    assert h.ready() and h.report.status == "cancelled"
    assert ip.run_line_magic("poolmap", "-q abs [-5]") == [5]


def test_line_form_and_its_value(ip):
    ip.run_cell("import math")
    ip.run_cell("r = %poolmap -q math.factorial range(6)")
    assert ip.user_ns["r"] == [1, 1, 2, 6, 24, 120]
    ip.run_cell("from functools import partial\ndef f(x, y):\n    return x * y\n")
    ip.run_cell("r2 = %poolmap -q -f partial(f, y=2) range(1, 4)")
    assert ip.user_ns["r2"] == [2, 4, 6]
    ip.run_cell("Y = 5")
    ip.run_cell("r3 = %poolmap -q --kw y=Y f range(1, 4)")
    assert ip.user_ns["r3"] == [5, 10, 15]


def test_kw_in_cell_form(ip):
    ip.run_cell("K = 100")
    out = ip.run_cell_magic("poolmap", "-q --kw offset=K+1 range(3)", "def add(x, offset):\n    return x + offset\n")
    assert out == [101, 102, 103]


def test_kw_with_undefined_name(ip):
    with pytest.raises(UsageError, match="NOPE"):
        ip.run_cell_magic("poolmap", "-q --kw offset=NOPE range(3)", "def add(x, offset):\n    return x + offset\n")


def test_repeat_runs_a_zero_argument_function(ip):
    out = ip.run_cell_magic("poolmap", "-q --repeat 6 --seed 7", "import random\ndef trial():\n    return random.random()\n")
    assert len(out) == 6 and len(set(out)) == 6
    again = ip.run_cell_magic("poolmap", "-q --repeat 6 --seed 7", "import random\ndef trial():\n    return random.random()\n")
    assert again == out  # same seed, same streams


def test_repeat_with_iterable_is_rejected(ip):
    with pytest.raises(UsageError, match="--repeat"):
        ip.run_cell_magic("poolmap", "--repeat 3 range(3)", "def trial():\n    return 1\n")


def test_seed_reproducible_across_worker_counts_and_chunks(ip):
    body = "import random\ndef draw(i):\n    return random.randint(0, 10**9)\n"
    a = ip.run_cell_magic("poolmap", "-q --seed 3 -n 1 range(12)", body)
    b = ip.run_cell_magic("poolmap", "-q --seed 3 -n 2 -c 5 range(12)", body)
    assert a == b and len(set(a)) == 12


def test_candidate_sizes():
    assert candidate_sizes(1) == [1, 2]
    assert candidate_sizes(2) == [1, 2, 4]
    assert candidate_sizes(6) == [1, 2, 4, 6, 12]


def test_tune_measures_sizes_and_sets_the_best(ip):
    ip.run_line_magic("poolsize", "2")
    # items of 0.5 s: 4 workers give twice the throughput of 2 whatever the load, and the
    # budget leaves 5 s to spare before the largest size is timed (no race on the machine's speed)
    ip.run_cell_magic("poolmap", "-q range(4)", "import time\ndef io_bound(x):\n    time.sleep(0.5)\n    return x\n")
    result = ip.run_line_magic("poolsize", "--tune --budget 10")
    assert isinstance(result, TuneResult)
    # sizes in order
    sizes = [r.workers for r in result.rows]
    assert len(sizes) >= 2 and sizes == candidate_sizes(poolmagic.get_pool().cores)[: len(sizes)]
    # sleeping items scale past the cores: the most workers win
    assert result.chosen == max(r.workers for r in result.rows)
    assert poolmagic.get_pool().size == result.chosen
    assert "waiting-bound" in result.reason
    html = result._repr_html_()
    assert "<svg" in html and "<table>" in html and "pool size set to" in html
    assert "chosen" in repr(result)
    assert "  1 worker  " in repr(result) and "1 workers" not in repr(result), repr(result)
    # the report of the user's own map is untouched
    assert ip.user_ns["_poolmap"].func_name == "io_bound"
    ip.run_line_magic("poolsize", "auto")


def test_tune_before_any_map_is_a_usage_error(ip):
    saved = poolmagic.get_pool().last_job
    poolmagic.get_pool().last_job = None
    try:
        with pytest.raises(UsageError, match="run a %%poolmap first"):
            ip.run_line_magic("poolsize", "--tune")
    finally:
        poolmagic.get_pool().last_job = saved


def test_shutdown_closes_now_and_restarts_on_next_use(ip, capsys):
    ip.run_line_magic("poolmap", "-q abs [-1]")
    pids = poolmagic.get_pool().backend.worker_pids()
    assert pids
    ip.run_line_magic("poolsize", "--shutdown")
    assert "shut down" in capsys.readouterr().out
    assert wait_dead(pids) == []
    assert ip.run_line_magic("poolmap", "-q abs [-2]") == [2]
