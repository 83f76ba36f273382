"""Plain regression tests for bugs the oracle found (each failed before its fix)."""
from __future__ import annotations

import random
import sys

import cloudpickle
import pytest

import model as M
from poolmagic import NOT_DONE, ItemTimeoutError
from poolmagic.errors import MapFailedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(M.TEST_TIMEOUT)


def test_timeout_fails_only_the_item_that_ran_too_long(backend, tmp_path):
    """A chunk of several items with one past --timeout: only that item fails.

    Before: every item of the chunk failed with ItemTimeoutError ("items 0–1
    ran longer than the 1 s timeout"), the quick ones included (local and dask).
    """
    backend.need("kill-on-timeout")
    items = [0, 1, 2]
    plans = {M.key(1): ("sleep",)}
    with pytest.raises(MapFailedError) as ei:
        backend.pool.run(M.work, items, chunksize=5, timeout=1, keep_going=True,
                         kwargs={"plans": plans, "markers": str(tmp_path)})
    r = ei.value.report
    assert r.results == [M.compute(0), NOT_DONE, M.compute(2)]
    assert sorted(r.errors) == [1] and isinstance(r.errors[1], ItemTimeoutError)
    assert "item 1 " in str(r.errors[1])


def double(x):
    return 2 * x


def test_dask_maps_after_a_larger_n_lose_nothing(backend):
    """Found by the oracle (test_resume_runs_only_what_is_missing[dask], the state machine).

    Before: dask retired the LocalCluster's newest worker when a -n map ended
    (``cluster.scale``), whatever it ran, and a worker still starting was
    dropped before it registered, then got a chunk: the item failed with
    WorkerCrashedError, exit code 0, 3 maps of 160. Now the workers to retire
    get no new chunk and go once idle (daskscale.py).
    """
    if backend.name != "dask":
        pytest.skip("a dask LocalCluster's grow and shrink")
    for _ in range(15):
        for w in (3, None, 1, None):
            got = backend.pool.map(double, range(3), **({"workers": w} if w else {}))
            assert got == [0, 2, 4]


def test_dask_workers_come_back_after_many_kills(tmp_path):
    """Found by the oracle (test_map_matches_loop[dask] hung). A pool of its own: this one kills workers.

    Before: dask's SpecCluster closed for good a nanny whose worker was absent
    (restarting after a kill) 15 s after an earlier removal: after about six
    kills no worker was left and the next map waited for ever (8 maps in one run).
    """
    pytest.importorskip("distributed")
    from conftest import _dask_pool, wait_dead

    pool = _dask_pool()
    try:
        for i in range(10):
            items = [0, 1, 2]
            plans = {M.key(0): ("crash",)} if i % 2 == 0 else {M.key(0): ("sleep",)}
            h = pool.map_async(M.work, items, keep_going=True, timeout=None if i % 2 == 0 else 1,
                               chunksize=3 if i % 4 < 2 else 1, kwargs={"plans": plans, "markers": str(tmp_path)})
            assert h.wait(60), f"map {i} waits forever; workers left: {pool.backend.worker_pids()}"
            assert h.report.results[1:] == [M.compute(1), M.compute(2)], (i, h.report.results)
    finally:
        pids = pool.backend.worker_pids()
        pool.shutdown()
        wait_dead(pids)


def seeded_with_big_result(x):
    """A seeded item whose result the worker samples (compresses) as it sends it."""
    import os
    import random
    import time

    big = os.urandom(200_000)
    time.sleep(0.02)  # the next item runs while the worker sends this one's result
    return random.random(), len(big)


def test_seed_is_not_moved_by_the_workers_own_draws(backend):
    """On dask, item i drew other numbers than --seed gives it, in 5 runs of 5 (issue 22, bug c).

    A dask worker's event loop draws from the module-level ``random`` (it
    samples a payload of 10 kB or more before compressing it) while the next
    item runs in another thread of the same process: the item's stream moved.
    """
    from poolmagic.engine import seeds

    want = []
    for i in range(30):
        seeds.seed_item(7, i)
        want.append(random.random())
    seeds.clear()
    got = backend.pool.map(seeded_with_big_result, range(30), seed=7, chunksize=1)
    assert [g[0] for g in got] == want


DRAWS = r"""
import random, threading
from poolmagic.engine import seeds
from poolmagic.engine.dask import draws
from distributed.protocol import compression
draws.isolate()
out = {}
def item():
    seeds.seed_item(7, 3)
    go.wait()
    out["item"] = random.random()
go = threading.Event()
t = threading.Thread(target=item, name="0-Dask-Default-Threads-1-0")
t.start()
for _ in range(100):  # the worker's event loop (this main thread) samples payloads meanwhile
    random.random(); compression.randint(0, 10); random.shuffle([1, 2, 3])
go.set(); t.join()
def quiet():
    seeds.seed_item(7, 3)
    out["want"] = random.random()
t = threading.Thread(target=quiet)
t.start(); t.join()
print(out["item"] == out["want"])
"""


def test_dask_threads_draw_from_their_own_random():
    """The cause of the bug above, without a cluster: deterministic."""
    pytest.importorskip("distributed")
    import subprocess

    out = subprocess.run([sys.executable, "-c", DRAWS], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def nap(x):
    import time

    time.sleep(0.1)
    return 2 * x


def test_dask_map_right_after_a_larger_n_keeps_its_chunks(backend):
    """A -n map grows the LocalCluster; the map right after it runs while the extra worker
    is retired: none of its chunks may be on that worker when it goes (bug a)."""
    if backend.name != "dask":
        pytest.skip("a dask LocalCluster's grow and shrink")
    for _ in range(4):
        assert backend.pool.map(double, range(6), workers=3) == [0, 2, 4, 6, 8, 10]
        assert backend.pool.map(nap, range(12), chunksize=1) == [2 * x for x in range(12)]


def test_dask_cluster_that_lost_its_nannies_starts_them_again():
    """dask's SpecCluster gave up on both nannies (as its lost-worker timer did): the next
    map started them again instead of waiting for ever (bug b, deterministic)."""
    pytest.importorskip("distributed")
    from conftest import _dask_pool, wait_dead

    pool = _dask_pool()
    try:
        cluster = pool.backend.cluster

        async def forget_nannies():
            for name in list(cluster.workers):
                await cluster.workers.pop(name).close()

        cluster.sync(forget_nannies)
        h = pool.map_async(double, range(6))
        assert h.wait(120), "the map waits for ever: no worker was started again"
        assert h.get() == [0, 2, 4, 6, 8, 10]
    finally:
        pids = pool.backend.worker_pids()
        pool.shutdown()
        wait_dead(pids)


def test_the_model_expects_a_nap_to_return(tmp_path):
    """The state machine's interrupt rule maps items planned to "nap"; resuming that map
    (resume_last) asked the model, which read a nap as crash_once and expected a crash."""
    items = [1000, 1001]
    case = M.Case(items, {M.key(x): ("nap",) for x in items}, {"chunksize": 1})
    assert [o.value for o in M.expect(case, str(tmp_path))] == [True, True]
