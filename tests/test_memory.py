"""Memory that must never kill the kernel: --max-memory and the always-on guard.

A worker grows in 50 MB steps (numpy arrays it writes to, so the pages are
resident) with a short sleep between steps, well past the limit if nothing
stopped it, but never near the machine's memory: at most 1.5 GB, once.
"""
from __future__ import annotations

import re
import sys
import time

import cloudpickle
import pytest
from IPython.core.error import UsageError

import poolmagic
from conftest import read_pid, run_script, wait_dead, wait_for, write_pid
from poolmagic import NOT_DONE, Pool
from poolmagic.engine import memory
from poolmagic.errors import BadInputError, WorkerMemoryError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers never import this module

pytestmark = pytest.mark.skipif(not memory.SUPPORTED, reason="the memory guard needs Linux /proc")

MB = 1 << 20
STEP = 50 * MB


def grow(x, piddir=None, which=3, upto_mb=1500):
    """Item ``which`` grows by 50 MB steps up to ``upto_mb`` (returns the steps); others return x."""
    if piddir is not None:
        write_pid(piddir, x)
    if x != which:
        return x
    import numpy as np

    held = []
    for _ in range(upto_mb // 50):
        held.append(np.ones(STEP // 8))
        time.sleep(0.05)
    return len(held)


def check_memory_error(exc: BaseException, item: int, limit_mb: int) -> None:
    assert isinstance(exc, WorkerMemoryError) and isinstance(exc, MemoryError), repr(exc)
    assert exc.indices == [item]
    assert exc.limit == limit_mb * MB
    msg = str(exc)
    assert f"item {item} (" in msg, msg
    assert f"--max-memory limit of {limit_mb:.1f} MB" in msg, msg
    m = re.search(r"its memory \(([\d.]+) (MB|GB)\)", msg)
    assert m, msg
    said = float(m.group(1)) * (1024 if m.group(2) == "GB" else 1)
    assert said == pytest.approx(exc.rss / MB, abs=0.06)
    assert limit_mb * MB < exc.rss < 1500 * MB, f"stopped at {exc.rss / MB:.0f} MB"


def backend_kwargs(backend: str) -> dict:
    """Pool() arguments for one backend: the local pool, or a dask LocalCluster poolmagic starts."""
    if backend == "dask":
        pytest.importorskip("distributed")
        return {"backend": "dask"}
    return {}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["local", "dask"])
def test_max_memory_stops_the_worker_and_names_the_item(tmp_path, backend):
    pytest.importorskip("numpy")
    with Pool(2, **backend_kwargs(backend)) as pool:
        with pytest.raises(WorkerMemoryError) as e:
            # one worker, one item per chunk: items 0-2 finish before item 3 runs
            pool.run(grow, range(6), kwargs={"piddir": str(tmp_path)}, chunksize=1, workers=1,
                     max_memory="300MB")
        exc = e.value
        check_memory_error(exc, 3, 300)
        assert exc.report is not None and exc.report.results[:3] == [0, 1, 2]
        assert exc.report.results[3] is NOT_DONE
        assert exc.report.errors.keys() == {3}
        pid = read_pid(tmp_path, 3)
        assert f"pid {pid})" in str(exc)
        assert wait_dead([pid]) == [], f"the worker {pid} that ran item 3 is still running"
        assert wait_for(lambda: pid not in pool.backend.worker_pids() and len(pool.backend.worker_pids()) == 2), \
            "the stopped worker was not replaced"
        assert pool.map(abs, range(-4, 0), chunksize=1) == [4, 3, 2, 1]
        report = pool.run(grow, range(4), kwargs={"which": -1})  # no growth: nothing is stopped
        assert report.results == [0, 1, 2, 3] and not report.errors


@pytest.mark.timeout(90)
def test_max_memory_option_of_the_magic(ip):
    pytest.importorskip("numpy")
    ip.run_cell("from test_memory import grow as grow_item")
    with pytest.raises(WorkerMemoryError) as e:
        ip.run_cell_magic("poolmap", "-q --max-memory 300MB -c 1 -n 1 range(6)",
                          "def grows(x):\n    return grow_item(x)\n")
    check_memory_error(e.value, 3, 300)
    report = ip.user_ns["_poolmap"]
    assert report is e.value.report and report.results[:3] == [0, 1, 2]
    assert ip.run_cell_magic("poolmap", "-q range(3)", "def fine(x):\n    return -x\n") == [0, -1, -2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["lots", "-5MB", "0", "12 parsecs"])
def test_bad_size_is_bad_input(bad):
    with Pool(1) as pool:
        with pytest.raises(BadInputError, match="max_memory must be a size such as 500MB"):
            pool.run(abs, range(3), max_memory=bad)
        assert pool.map(abs, [-1], max_memory="1GB") == [1]


@pytest.mark.timeout(30)
def test_bad_size_in_the_magic_is_a_usage_error(ip):
    ip.user_ns.pop("ran_anyway", None)
    with pytest.raises(UsageError, match=r"--max-memory takes a size such as 500MB or 4GB, not 'lots'"):
        ip.run_cell_magic("poolmap", "--max-memory lots range(3)", "ran_anyway = True\ndef f(x):\n    return x\n")
    assert "ran_anyway" not in ip.user_ns  # rejected before the cell ran
    with pytest.raises(UsageError, match="--max-memory takes a size"):
        ip.run_line_magic("poolsize", "--max-memory lots")


@pytest.mark.timeout(90)
def test_poolsize_max_memory_applies_to_maps_without_the_option(ip, capsys):
    pytest.importorskip("numpy")
    pool = poolmagic.get_pool()
    ip.run_cell("from test_memory import grow as grow_item")
    try:
        ip.run_line_magic("poolsize", "--max-memory 400MB")
        out = capsys.readouterr().out
        assert "at most 400.0 MB per worker" in out, out
        assert pool.max_memory == 400 * MB
        ip.run_line_magic("poolsize", "")
        assert "at most 400.0 MB per worker" in capsys.readouterr().out  # it stays
        with pytest.raises(WorkerMemoryError) as e:
            ip.run_cell_magic("poolmap", "-q -c 1 -n 1 range(5)", "def grows(x):\n    return grow_item(x, which=1)\n")
        check_memory_error(e.value, 1, 400)
        # a map's own option wins over the pool's
        with pytest.raises(WorkerMemoryError) as e:
            ip.run_cell_magic("poolmap", "-q --max-memory 300MB -c 1 -n 1 range(5)",
                              "def grows(x):\n    return grow_item(x, which=1)\n")
        check_memory_error(e.value, 1, 300)
    finally:
        ip.run_line_magic("poolsize", "--max-memory off")
    out = capsys.readouterr().out
    assert pool.max_memory is None and "at most" not in out, out
    # cleared: the same growth, up to 500 MB, now finishes
    steps = ip.run_cell_magic("poolmap", "-q -c 1 -n 1 range(3)",
                              "def grows(x):\n    return grow_item(x, which=1, upto_mb=500)\n")
    assert steps == [0, 10, 2]


GUARD_SCRIPT = r"""
import os, sys, time
from poolmagic import Pool
from poolmagic.engine import memory
from poolmagic.errors import WorkerMemoryError

def grow(x):
    if x != 1:
        return x
    import numpy as np
    held = []
    for _ in range(20):  # up to 1 GB
        held.append(np.ones(50 * 2**20 // 8))
        time.sleep(0.05)
    return len(held)

with Pool(2, **BACKEND) as pool:
    pool.map(abs, range(4))
    free, total = memory.available()
    os.environ["POOLMAGIC_MEMORY_RESERVE"] = str(free - 300 * 2**20)
    try:
        print("RESULTS", pool.map(grow, range(4), chunksize=1))
    except WorkerMemoryError as e:
        print("INDICES", e.indices)
        print("LIMIT", e.limit)
        print("RSS", e.rss)
        print("MESSAGE", str(e).replace("\n", " "))
    del os.environ["POOLMAGIC_MEMORY_RESERVE"]
    print("NEXT", pool.map(abs, range(-3, 0)))
print("NUMPY_IN_KERNEL", "numpy" in sys.modules)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "dask"])
def test_always_on_guard_stops_the_largest_worker(backend):
    pytest.importorskip("numpy")
    assert memory.available() is not None
    out, err, code = run_script(f"BACKEND = {backend_kwargs(backend)!r}\n" + GUARD_SCRIPT, timeout=90)
    assert code == 0, err[-3000:]
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert "RESULTS" not in lines, f"the worker grew to 1 GB unstopped: {out}"
    assert lines.get("INDICES") == "[1]", out
    assert lines["LIMIT"] == "None"  # no --max-memory: the guard, not a limit
    assert "memory was nearly exhausted" in lines["MESSAGE"], lines["MESSAGE"]
    assert "this worker was the largest" in lines["MESSAGE"] and "item 1 (" in lines["MESSAGE"]
    assert int(lines["RSS"]) < 1024 * MB
    assert lines["NEXT"] == "[3, 2, 1]", out
