"""The plain Python API, without the magics: Pool, pmap, map_async, seeds, repeat."""
from __future__ import annotations

import os
import random
import time

import pytest

import poolmagic
from poolmagic import BadInputError, Pool, pmap

from conftest import wait_dead, wait_for, write_pid, written_pids


def test_pmap_uses_the_shared_pool():
    assert pmap(abs, range(-3, 0)) == [3, 2, 1]
    assert poolmagic.get_pool().last_report.results == [3, 2, 1]


def test_notebook_function_works_under_both_safe_start_methods(ip, start_method):
    """A function defined in __main__ (a cell) must load in workers under spawn too."""
    ip.run_cell("BASE = 7\ndef nb_func(x):\n    return x + BASE\n")
    fn = ip.user_ns["nb_func"]
    assert fn.__module__ == "__main__"
    with Pool(2, start_method=start_method) as pool:
        assert pool.backend.description == f"local processes ({start_method})"
        assert pool.map(fn, range(5)) == [7, 8, 9, 10, 11]
        assert pool.map(lambda x: -x, range(3)) == [0, -1, -2]


def test_results_in_input_order_with_uneven_items():
    def uneven(x):
        time.sleep(0.02 if x % 3 == 0 else 0)
        return x

    with Pool(2) as pool:
        report = pool.run(uneven, range(60))
    assert report.results == list(range(60))
    assert report.workers == 2


def test_large_input_uses_adaptive_chunks():
    with Pool(2) as pool:
        report = pool.run(lambda x: x + 1, range(200_000))
        assert report.results[-1] == 200_000
        # tiny items: few, large chunks, not one message per item
        assert len(report.chunks) < 100
        assert max(c.count for c in report.chunks) > 1000


def test_slow_items_get_chunks_of_one_for_load_balance():
    with Pool(2) as pool:
        pool.map(abs, [1, 2], chunksize=1)  # both workers up
        report = pool.run(lambda x: time.sleep(0.3) or x, range(8))
    assert all(c.count == 1 for c in report.chunks)
    # two workers really ran at once: some item on each worker overlapped (no speed threshold)
    tl = report.timeline
    assert any(a.worker != b.worker and a.start < b.end and b.start < a.end for a in tl for b in tl), tl


def test_per_item_times_and_worker_ids_are_recorded():
    with Pool(2) as pool:
        report = pool.run(lambda x: time.sleep(0.3 * (x % 2)) or x, range(4), chunksize=2)
    times = report.item_times()
    assert all(t is not None for t in times)
    # measured per item, not the chunk average (which is 0.15 s): a sleep never ends early
    assert times[1] >= 0.3 and times[3] >= 0.3, times
    assert times[0] < times[1] and times[2] < times[3], times
    tl = report.timeline
    assert {r.worker for r in tl} <= {0, 1} and all(r.end >= r.start for r in tl)
    assert sum(r.items for r in tl) == 4 and {(r.first_item, r.last_item) for r in tl} == {(0, 1), (2, 3)}


def test_big_global_is_shipped_once_per_worker():
    np = pytest.importorskip("numpy")
    arr = np.arange(2_000_000, dtype=np.float64)  # 16 MB

    def read(i):
        return float(arr[i])

    with Pool(2) as pool:
        assert pool.map(read, range(64), chunksize=1) == [float(i) for i in range(64)]
        key = pool.last_report and pool.backend.workers.procs[0].fns
        assert len(key) == 1  # one function version cached in the worker
        arr[0] = -1.0  # a changed global is a new version: shipped again
        assert pool.map(read, range(2))[0] == -1.0


def test_map_async_returns_at_once_and_get_waits(tmp_path):
    """The items wait for a gate the test opens only after map_async returned:
    a map_async that waited for them would never return (the test's timeout)."""
    gate = str(tmp_path / "gate")

    def gated(x):
        while not os.path.exists(gate):
            time.sleep(0.01)
        return x * 2

    with Pool(2) as pool:
        handle = pool.map_async(gated, range(4), chunksize=1)
        assert not handle.ready()
        assert handle.wait(0.01) is False
        with pytest.raises(TimeoutError):
            handle.get(timeout=0.01)
        open(gate, "w").close()
        assert handle.get(timeout=30) == [0, 2, 4, 6]
        assert handle.ready() and handle.successful()


def test_two_async_maps_share_the_pool():
    with Pool(2) as pool:
        a = pool.map_async(lambda x: time.sleep(0.05) or ("a", x), range(6), chunksize=1)
        b = pool.map_async(lambda x: time.sleep(0.05) or ("b", x), range(6), chunksize=1)
        assert a.get(10) == [("a", i) for i in range(6)]
        assert b.get(10) == [("b", i) for i in range(6)]
        # fair sharing: both ran interleaved, neither waited for the other to finish
        assert min(c.t0 for c in b.report.chunks) < max(c.t0 for c in a.report.chunks)


def test_async_cancel_keeps_finished_results(tmp_path):
    """Items from 2 on sleep 30 s, then leave a file: cancel stops them (their workers
    are killed), it does not wait for them."""
    done = str(tmp_path)

    def item(x):
        if x >= 2:
            write_pid(done, x)
            time.sleep(30)
            open(os.path.join(done, f"done-{x}"), "w").close()
        return x

    with Pool(2) as pool:
        h = pool.map_async(item, range(6), chunksize=1)
        assert wait_for(lambda: h.report.done >= 2), "items 0 and 1 never finished"
        running = wait_for(lambda: written_pids(tmp_path), what="a sleeping item to start")
        h.cancel()
        assert h.ready() and h.report.status == "cancelled"
        assert not list(tmp_path.glob("done-*")), "cancel waited for the running items"
        assert not wait_dead(running.values()), "cancel left the running items' workers running"
        assert h.report.results[:2] == [0, 1]
        assert pool.map(abs, [-1]) == [1]


def test_repeat_calls_a_zero_argument_function():
    with Pool(2) as pool:
        out = pool.map(lambda: 42, repeat=5)
    assert out == [42] * 5


def test_seed_gives_reproducible_independent_streams_whatever_the_chunking():
    def draw(_):
        return random.random()

    with Pool(2) as pool:
        a = pool.map(draw, range(20), seed=123, chunksize=1)
        b = pool.map(draw, range(20), seed=123, chunksize=7)
    with Pool(1) as pool:
        c = pool.map(draw, range(20), seed=123)
    assert a == b == c
    assert len(set(a)) == 20  # independent per item
    with Pool(2) as pool:
        assert pool.map(draw, range(20), seed=124) != a


def test_seed_also_seeds_numpy():
    np = pytest.importorskip("numpy")

    def draw(_):
        import numpy

        return float(numpy.random.rand())

    with Pool(2) as pool:
        a = pool.map(draw, range(6), seed=5, chunksize=1)
        b = pool.map(draw, range(6), seed=5, chunksize=3)
    assert a == b and len(set(a)) == 6
    del np


def test_without_seed_workers_do_not_share_random_state():
    with Pool(2) as pool:
        # the first draw of each fresh worker: equal if they shared a state
        draws = pool.map(lambda: (__import__("os").getpid(), random.random()), repeat=2, chunksize=1)
    assert draws[0][0] != draws[1][0]
    assert draws[0][1] != draws[1][1]


def test_kwargs_are_constant_arguments():
    def power(x, y):
        return x**y

    assert pmap(power, range(4), kwargs={"y": 3}) == [0, 1, 8, 27]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"chunksize": 0}, "chunksize"),
        ({"workers": -1}, "workers"),
        ({"timeout": 0}, "timeout"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_are_rejected_before_work(kwargs, fragment):
    with pytest.raises(BadInputError, match=fragment):
        pmap(abs, range(3), **kwargs)


def test_not_callable_and_not_iterable():
    with pytest.raises(BadInputError, match="not callable"):
        pmap(5, range(3))
    with pytest.raises(BadInputError, match="int, which is not iterable"):
        pmap(abs, 5)


def test_resize_takes_effect_without_restart():
    with Pool(1) as pool:
        pool.map(abs, [1])
        first = set(pool.backend.worker_pids())
        pool.resize(2)
        report = pool.run(lambda x: time.sleep(0.05) or x, range(6), chunksize=1)
        assert report.workers == 2
        assert first <= set(pool.backend.worker_pids())  # the old worker kept running


def test_status_line():
    with Pool(2) as pool:
        pool.map(abs, [1, 2])
        s = pool.status()
    assert s.startswith("poolmagic: 2 workers · local processes (")
    assert "cores available" in s and "pool warm" in s


def test_empty_iterable():
    assert pmap(abs, []) == []
    assert pmap(abs, iter([])) == []


def test_big_arrays_are_writable_copy_on_write_in_workers():
    np = pytest.importorskip("numpy")
    arr = np.zeros(1_000_000)  # 8 MB: travels through shared memory on Linux

    def poke(i):
        arr[0] = i  # private to the worker: nobody else sees it
        return float(arr[0]), float(arr[1])

    with Pool(2) as pool:
        assert pool.map(poke, range(6), chunksize=1) == [(float(i), 0.0) for i in range(6)]
    assert arr[0] == 0.0


def test_a_function_seen_before_is_chunked_right_away():
    """The measured time per item is remembered per function version: no probe chunks."""

    def tiny(x):
        return x

    with Pool(2) as pool:
        first = pool.run(tiny, range(4))
        assert len(first.chunks) == 4  # unknown function: one-item probes
        again = pool.run(tiny, range(4))
        assert len(again.chunks) == 1  # tiny items: one chunk is cheapest


class NeedsTwoArgs(Exception):
    """An exception that does not survive pickling (its __init__ wants two args)."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")


def test_unpicklable_exception_keeps_its_type():
    def fail(x):
        raise NeedsTwoArgs(x, "boom")

    with pytest.raises(NeedsTwoArgs, match="3: boom"):
        pmap(fail, [3])


def test_generator_that_raises_midway_keeps_what_finished():
    def items():
        yield from range(5)
        raise RuntimeError("source broke")

    with Pool(2) as pool:
        with pytest.raises(RuntimeError, match="source broke") as e:
            pool.map(lambda x: x, items(), chunksize=1)
        assert "raised by the ITERABLE" in " ".join(getattr(e.value, "__notes__", []))
        assert pool.map(abs, [-1]) == [1]


def test_workers_have_numpy_before_the_first_item_when_the_parent_uses_it(start_method):
    """Under forkserver the server preloads numpy, so every worker (replacements
    too) is a fork that already has it; under spawn each worker imports it at start."""
    pytest.importorskip("numpy")
    from multiprocessing import forkserver

    from poolmagic.engine.processes import stop_helper_processes

    poolmagic.shutdown_pool()
    stop_helper_processes()  # a fresh forkserver preloads what this process uses now

    def numpy_loaded(_):
        import sys

        return "numpy" in sys.modules

    with Pool(2, start_method=start_method) as pool:
        assert pool.map(numpy_loaded, range(4)) == [True] * 4
        if start_method == "forkserver":
            server = forkserver._forkserver._forkserver_pid
            with open(f"/proc/{server}/maps") as maps:
                assert "_multiarray_umath" in maps.read(), "numpy not preloaded in the forkserver"


def test_a_function_that_assigns_a_global_is_said_to_change_only_the_workers_copy(ip):
    """``global total; total += x`` in a mapped function changed each worker's copy; the
    notebook's stayed 0 without a word, where the plain loop leaves it at the sum. The summary
    says so on backends whose items run in processes of their own (threads share the kernel's)."""
    ip.run_cell("total = 0\ndef adds(x):\n    global total\n    total += x\n    return x\n"
                "def reads(x):\n    return x + total\n")
    adds, reads = ip.user_ns["adds"], ip.user_ns["reads"]
    report = poolmagic.get_pool().run(adds, range(4))
    assert ip.user_ns["total"] == 0
    said = [n for n in report.notes if "'total'" in n]
    assert said and "global" in said[0] and "notebook" in said[0], report.notes
    assert "'total'" in report.summary()
    assert not [n for n in poolmagic.get_pool().run(reads, range(4)).notes if "total" in n]
    with Pool(2, backend="threads") as threads:
        assert not [n for n in threads.run(adds, range(4)).notes if "total" in n]
    assert ip.user_ns["total"] == 6  # the threads ran in the kernel: like the loop
    lib: dict = {"__name__": "somelib", "COUNT": 0}
    exec("def lib_adds(x):\n    global COUNT\n    COUNT += 1\n    return x\n", lib)
    assert not [n for n in poolmagic.get_pool().run(lib["lib_adds"], range(2)).notes if "COUNT" in n]


def test_a_stream_that_raises_midway_has_a_place_for_every_item_it_yielded():
    """The map of a generator that raised after 5 items said "1/5 items" but its results held 2
    places: ``len(_poolmap.results)`` must be the items the stream yielded, NOT_DONE where none came."""
    def items():
        yield from range(5)
        raise KeyError("source broke")

    def first_only(x):
        if x:
            time.sleep(0.3)  # still running when the stream breaks
        return x

    with pytest.raises(KeyError) as e:
        poolmagic.get_pool().map(first_only, items(), chunksize=1)
    r = e.value.poolmap_report
    assert r.items == 5 and len(r.results) == 5, (r.items, r.results)
    assert r.done == sum(v is not poolmagic.NOT_DONE for v in r.results)
