"""Maps through the API that must behave alike on every backend (local, dask, threads).

Run once per backend by the ``backend`` fixture (tests/conftest.py), the way
loky runs its executor tests once per start method; a test that needs what a
backend declares it lacks (``Backend.lacks``) is skipped with the reason.
These tests were the "both backends" part of test_dask.py.

Functions mapped here are pickled by value (like notebook code), so the
workers never import this test module.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from conftest import wait_dead, wait_for

import poolmagic
from poolmagic import NOT_DONE

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------- mapped functions


def double(x):
    return 2 * x


def add(x, y):
    return x + y


def scaled(x, factor=1, offset=0):
    return x * factor + offset


def uneven(x):
    time.sleep(0.03 if x % 5 == 0 else 0)
    return x


def constant():
    return 7


def raise_at(x, bad=5):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return 2 * x


def raise_odd(x):
    if x % 2:
        raise KeyError(x)
    return x


def talk(x):
    print(f"item {x} says hi")
    return x


def sleep_at(x, bad=1, seconds=30.0):
    if x == bad:
        time.sleep(seconds)
    return x


def exit_at_once(x, bad=4):
    if x == bad:
        os._exit(1)  # before any message of the task can leave the worker
    return x


def sleepy(x):
    time.sleep(30)
    return x


def frame_stats(df):
    return df.assign(total=df["a"] + df["b"])


def array_stats(a):
    return a * 2


BIG = None


def read_big(i):
    return float(BIG[i]) + float(BIG[-1])


# ---------------------------------------------------------------- every backend


def test_results_in_input_order(backend):
    report = backend.run(uneven, range(40))
    assert report.results == list(range(40))
    assert report.status == "done"


def spin(x):
    """About 20 ms of CPU (a loop, not a sleep)."""
    end = time.thread_time() + 0.02
    while time.thread_time() < end:
        pass
    return x


def test_each_chunk_reports_its_cpu_and_wait_time(backend):
    """The map's card compares CPU with wall time: every backend's chunk records its cpu_s
    and waited_s (before: None and 0 on dask)."""
    report = backend.run(spin, range(6), chunksize=2)
    assert len(report.chunks) == 3
    assert all(c.cpu_s is not None and c.cpu_s >= 0.03 for c in report.chunks), [c.cpu_s for c in report.chunks]
    assert all(0.0 <= c.waited_s <= c.t1 - c.t0 for c in report.chunks)


def test_tiny_items_go_in_chunks_not_one_task_each(backend):
    report = backend.run(double, range(50_000))
    assert report.results[-1] == 99_998
    assert len(report.chunks) < 100


def test_a_generator_is_fed_by_the_callers_thread(backend):
    assert backend.map(double, (i for i in range(3000))) == [2 * i for i in range(3000)]


def test_star_kwargs_repeat(backend):
    assert backend.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
    assert backend.map(scaled, range(3), kwargs={"factor": 10, "offset": 1}) == [1, 11, 21]
    assert backend.map(constant, repeat=3) == [7, 7, 7]


def test_errors_keep_their_type_and_name_the_item(backend):
    with pytest.raises(ValueError, match="bad item 5") as ei:
        backend.map(raise_at, range(10), chunksize=1)
    exc = ei.value
    assert "poolmagic: item 5 (value 5) failed." in getattr(exc, "__notes__", [])
    results = exc.poolmap_report.results
    assert results[5] is NOT_DONE
    assert all(r is NOT_DONE or r == 2 * i for i, r in enumerate(results))


def test_keep_going_keeps_partial_results(backend):
    with pytest.raises(poolmagic.MapFailedError) as ei:
        backend.map(raise_odd, range(8), keep_going=True)
    report = ei.value.report
    assert sorted(report.errors) == [1, 3, 5, 7]
    assert all(isinstance(e, KeyError) for e in report.errors.values())
    assert [report.results[i] for i in (0, 2, 4, 6)] == [0, 2, 4, 6]


def test_print_output_comes_back_in_item_order(backend, capsys):
    backend.map(talk, range(6), chunksize=1)
    out = capsys.readouterr().out
    assert out == "".join(f"item {i} says hi\n" for i in range(6))


def test_timeout_fails_the_item(backend):
    backend.need("kill-on-timeout")
    with pytest.raises(poolmagic.ItemTimeoutError) as ei:
        backend.map(sleep_at, range(4), timeout=1.0)
    assert ei.value.index == 1 and "item 1 (1)" in str(ei.value)
    assert backend.map(double, range(6)) == [0, 2, 4, 6, 8, 10]


def exit_at_gate(x, gate, bad=3):
    if x == bad:
        while not os.path.exists(gate):  # the test opens it once items 0-2 are back
            time.sleep(0.01)
        os._exit(1)
    return 2 * x


def test_crashed_worker_names_the_item(backend, tmp_path):
    """Items 0-2 came back before item 3 crashed (a gate, not a sleep, orders them): kept."""
    backend.need("crash-isolation")
    backend.map(double, range(4))
    gate = str(tmp_path / "gate")
    handle = backend.map_async(exit_at_gate, range(8), chunksize=1, kwargs={"gate": gate})
    try:
        wait_for(lambda: NOT_DONE not in handle.report.results[:3], what="items 0-2 to come back")
    finally:
        open(gate, "w").close()
    with pytest.raises(poolmagic.WorkerCrashedError) as ei:
        handle.get(30)
    exc = ei.value
    assert exc.indices == [3] and "item 3 (3)" in str(exc), str(exc)
    assert exc.report.results[:3] == [0, 2, 4]
    assert backend.map(double, range(10)) == [2 * x for x in range(10)]


def test_an_item_that_exits_at_once_is_the_one_named(backend):
    backend.need("crash-isolation")
    with pytest.raises(poolmagic.WorkerCrashedError) as ei:
        backend.map(exit_at_once, range(6), chunksize=1)
    assert ei.value.indices == [4], str(ei.value)
    assert "poolmagic: item 4 (value 4) failed." in getattr(ei.value, "__notes__", [])


def test_cancel_then_next_map_runs(backend):
    backend.need("kill-on-interrupt")
    assert backend.map(double, range(6)) == [0, 2, 4, 6, 8, 10]
    for _ in range(2):  # dask: both workers go, and the cached version of double with them
        handle = backend.map_async(sleepy, range(4), chunksize=1)
        deadline = time.monotonic() + 20
        while not handle.report.chunks and time.monotonic() < deadline and not _running(backend, handle):
            time.sleep(0.02)
        handle.cancel()
        assert handle.ready() and handle.report.status == "cancelled"
        with pytest.raises(poolmagic.errors.MapCancelledError):
            handle.get(1)
        assert backend.map(double, range(6)) == [0, 2, 4, 6, 8, 10]


def _running(pool, handle) -> bool:
    """Some item of the map has begun on a worker (dask tells; locally, give it a moment)."""
    inflight = getattr(pool.backend, "_inflight", None)
    if inflight is None:
        time.sleep(0.2)
        return True
    return any(c.began is not None for c in list(inflight.values()))


def meet(x, folder, n, deadline):
    """Write this worker's pid down, then wait until ``n`` workers have (or the deadline)."""
    Path(folder, str(os.getpid())).touch()
    while len(os.listdir(folder)) < n and time.time() < deadline:
        time.sleep(0.01)
    return os.getpid()


def test_n_above_the_pool_size_runs_that_many_workers_at_once(backend, tmp_path):
    """``-n 4`` on a 2-worker pool: 4 workers run its items at the same time
    (local: extra worker processes; dask: our LocalCluster scaled up, where it
    ran on 2 before), and the pool is back to 2 workers after the map."""
    backend.need("own-process")
    deadline = time.time() + 60
    pids = backend.map(meet, range(8), workers=4, chunksize=1,
                       kwargs={"folder": str(tmp_path), "n": 4, "deadline": deadline})
    assert time.time() < deadline, "4 workers never ran at the same time"
    assert len(set(pids)) == 4 and len(os.listdir(tmp_path)) == 4, pids
    assert wait_for(lambda: len(backend.backend.worker_pids()) == 2, timeout=30), backend.backend.worker_pids()
    extra = set(pids) - set(backend.backend.worker_pids())
    assert len(extra) == 2 and not wait_dead(extra), "an extra worker outlived its map"
    assert backend.map(double, range(4)) == [0, 2, 4, 6]


def test_numpy_and_pandas_items_and_results(backend):
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    arrays = [np.arange(5) + i for i in range(4)] + [np.ones(200_000)]  # the last one goes out of band
    got = backend.map(array_stats, arrays)
    for a, g in zip(arrays, got):
        np.testing.assert_array_equal(g, a * 2)
    assert got[-1].flags.writeable  # a result array is the caller's to change
    frames = [pd.DataFrame({"a": range(i, i + 3), "b": [1.5, 2.5, 3.5]}) for i in range(3)]
    for df, out in zip(frames, backend.map(frame_stats, frames)):
        pd.testing.assert_frame_equal(out, df.assign(total=df["a"] + df["b"]))


def test_a_50_mb_global_travels_once(backend):
    np = pytest.importorskip("numpy")
    global BIG
    BIG = np.arange(50_000_000 // 8, dtype=np.float64)
    try:
        assert backend.map(read_big, range(64), chunksize=1) == [i + BIG[-1] for i in range(64)]
        dask_backend = getattr(backend.backend, "_blobs", None)
        if dask_backend is not None:  # one scattered copy, referenced by every task
            key = backend.last_job.payload.key
            assert list(dask_backend).count(key) == 1
            loaded = backend.backend.client.run(_loaded_functions)
            assert all(key in keys for keys in loaded.values()), loaded  # unpickled once per worker
            assert key in backend.backend.link.memfds  # our own cluster: mapped from shared memory, not sent
    finally:
        BIG = None


def _loaded_functions():
    from poolmagic.engine.dask import task as dasktask

    return list(dasktask._FNS)


def flaky(x, folder):
    """Item 2 raises ConnectionError on its first two calls; item 4 always raises ValueError."""
    path = Path(folder) / f"{x}.calls"
    calls = len(path.read_text()) if path.exists() else 0
    path.write_text("x" * (calls + 1))
    if x == 2 and calls < 2:
        raise ConnectionError(f"flaky {x}")
    if x == 4:
        raise ValueError(f"bad {x}")
    return x * 10


def test_retries_checkpoint_and_resume(backend, tmp_path):
    """--retries/--retry-on, --checkpoint and --resume work the same on every backend."""
    calls = tmp_path / "calls"
    calls.mkdir()
    ck = tmp_path / "run.ckpt"
    kw = {"folder": str(calls)}
    with pytest.raises(poolmagic.MapFailedError, match="item 4: ValueError: bad 4") as ei:
        backend.run(flaky, range(6), kwargs=kw, chunksize=1, retries=2, retry_on=(ConnectionError,),
                    checkpoint=str(ck), keep_going=True)
    first = ei.value.report
    assert (calls / "2.calls").read_text() == "xxx"  # two failures, then it worked
    assert (calls / "4.calls").read_text() == "x"  # ValueError is not retried
    assert first.results[2] == 20 and first.results[4] is NOT_DONE
    assert isinstance(first.errors[4], ValueError) and set(first.errors) == {4}
    # the same map with the same file: only the item without a result runs
    with pytest.raises(poolmagic.MapFailedError) as ei:
        backend.run(flaky, range(6), kwargs=kw, chunksize=1, checkpoint=str(ck), keep_going=True)
    again = ei.value.report
    assert again.resumed == (5, 1) and set(again.errors) == {4}
    assert (calls / "4.calls").read_text() == "xx" and (calls / "0.calls").read_text() == "x"
    # --resume of a report: what it left unfinished, merged into its results
    resumed = backend.run(double, range(6), resume=again)
    assert resumed.results == [0, 10, 20, 30, 8, 50]


def blas_threads(_):
    import numpy  # noqa: F401  (its BLAS loaded)
    from threadpoolctl import threadpool_info

    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})


def test_threads_sets_the_native_threads_per_worker(backend):
    backend.need("native-thread-limit")
    pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    assert backend.map(blas_threads, range(2), threads=2, chunksize=1) == [[2], [2]]
    assert backend.map(blas_threads, range(2), threads=1, chunksize=1) == [[1], [1]]
