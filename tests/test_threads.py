"""Native thread pools (BLAS, OpenMP) in workers: limited to cores ÷ workers by
default, set per map (``threads=``), per pool (``Pool.threads``, ``%poolsize
--threads``), whether the library was loaded before the pool started (forkserver
preload) or only inside the mapped function; the kernel itself is left alone.
"""
from __future__ import annotations

import inspect
import json
import os
import sys

import cloudpickle
import pytest

import poolmagic
from conftest import run_script
from poolmagic import Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers never import this module

pytest.importorskip("numpy")
pytest.importorskip("threadpoolctl")

VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def blas_info(x):
    """What a worker sees: BLAS thread counts, the thread variables, whether numpy was already loaded."""
    import os
    import sys

    preloaded = "numpy" in sys.modules
    import numpy  # noqa: F401
    from threadpoolctl import threadpool_info

    return {
        "preloaded": preloaded,
        "blas": [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"],
        "env": {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "pid": os.getpid(),
    }


def blas_threads(results: list[dict]) -> set[int]:
    seen = {n for r in results for n in r["blas"]}
    if not seen:
        pytest.skip("threadpoolctl finds no BLAS library in the workers' numpy")
    return seen


# Both scenarios run in a fresh interpreter: the forkserver (and so what it
# preloaded) is per process, and this test process may have started it already.
SCRIPT = r"""
import json, os, sys
os.environ["POOLMAGIC_CORES"] = "2"  # 2 workers on 2 cores, whatever the machine
for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.pop(v, None)
if NUMPY_FIRST:
    import numpy
    from threadpoolctl import threadpool_info
    kernel_before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
from poolmagic import Pool
with Pool(2) as pool:
    results = pool.map(blas_info, range(6), chunksize=1)
    pids = sorted(set(pool.backend.worker_pids()))
kernel = {
    "numpy": "numpy" in sys.modules,
    "env": {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
}
if NUMPY_FIRST:
    kernel["before"] = kernel_before
    kernel["after"] = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print("RESULT " + json.dumps({"workers": results, "kernel": kernel}))
"""


def run_scenario(numpy_first: bool) -> dict:
    # blas_info's own source: importing this module would import numpy (importorskip)
    src = f"NUMPY_FIRST = {numpy_first!r}\n" + SCRIPT.replace("from poolmagic import Pool",
                                                            inspect.getsource(blas_info) + "\nfrom poolmagic import Pool", 1)
    out, err, code = run_script(src, timeout=90)
    assert code == 0, err[-3000:]
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, out + err[-2000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.timeout(120)
def test_default_limit_when_numpy_was_loaded_before_the_pool():
    got = run_scenario(numpy_first=True)
    workers, kernel = got["workers"], got["kernel"]
    assert blas_threads(workers) == {1}, workers
    assert all(w["preloaded"] for w in workers), "premise: numpy came preloaded (forkserver)"
    assert all(w["env"] == {v: "1" for v in VARS} for w in workers), workers
    # the kernel keeps its own thread pool and environment
    assert kernel["before"] == kernel["after"] and kernel["after"], kernel
    assert kernel["env"] == {v: None for v in VARS}, kernel


@pytest.mark.timeout(120)
def test_default_limit_when_numpy_is_imported_only_by_the_function():
    got = run_scenario(numpy_first=False)
    workers, kernel = got["workers"], got["kernel"]
    assert any(not w["preloaded"] for w in workers), "premise: numpy first loaded inside the function"
    assert blas_threads(workers) == {1}, workers
    assert all(w["env"] == {v: "1" for v in VARS} for w in workers), workers
    assert kernel == {"numpy": False, "env": {v: None for v in VARS}}, kernel


def expected_default(pool: Pool, workers: int = 2) -> int:
    return max(1, pool.cores // workers)


@pytest.mark.timeout(90)
def test_threads_per_map_and_per_pool(monkeypatch):
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")  # the kernel's own value, overridden in workers
    with Pool(2) as pool:
        default = expected_default(pool)
        first = pool.map(blas_info, range(4), chunksize=1)
        assert blas_threads(first) == {default}
        two = pool.map(blas_info, range(4), chunksize=1, threads=2)
        assert blas_threads(two) == {2}
        assert all(w["env"] == {v: "2" for v in VARS} for w in two), two
        assert pool.last_report.threads == 2
        back = pool.map(blas_info, range(4), chunksize=1)  # the limit is per map: back to the default
        assert blas_threads(back) == {default}
        pool.threads = 3
        three = pool.map(blas_info, range(4), chunksize=1)
        assert blas_threads(three) == {3}
        assert all(w["env"] == {v: "3" for v in VARS} for w in three), three
        assert pool.last_report.threads == 3
        assert "3 native threads per worker" in pool.status()
        assert blas_threads(pool.map(blas_info, range(2), threads=1)) == {1}  # a map's own wins
        pids = {w["pid"] for w in first + two + back + three}
        assert pids <= set(pool.backend.worker_pids()), "the same workers, re-limited (not replaced)"
    # the kernel's environment is untouched
    assert all(os.environ.get(v) is None for v in VARS)
    assert os.environ["MKL_NUM_THREADS"] == "7"


@pytest.mark.timeout(90)
def test_poolsize_threads(ip, capsys):
    pool = poolmagic.get_pool()
    ip.run_cell("from test_threads import blas_info")
    try:
        ip.run_line_magic("poolsize", "")
        out = capsys.readouterr().out
        n = pool.threads_per_worker()
        assert n == max(1, pool.cores // pool.size)
        assert f"{n} native thread{'s' if n != 1 else ''} per worker" in out, out
        ip.run_line_magic("poolsize", "--threads 3")
        out = capsys.readouterr().out
        assert pool.threads == 3 and "3 native threads per worker" in out, out
        results = ip.run_cell_magic("poolmap", "-q -c 1 range(4)", "def probe(x):\n    return blas_info(x)\n")
        assert blas_threads(results) == {3}
        assert all(r["env"] == {v: "3" for v in VARS} for r in results), results
        assert ip.user_ns["_poolmap"].threads == 3
    finally:
        ip.run_line_magic("poolsize", "--threads auto")
    out = capsys.readouterr().out
    assert pool.threads is None and f"{pool.threads_per_worker()} native thread" in out
    results = ip.run_cell_magic("poolmap", "-q -c 1 range(4)", "def probe(x):\n    return blas_info(x)\n")
    assert blas_threads(results) == {pool.threads_per_worker()}
