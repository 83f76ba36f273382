"""Failure plans combined, found by a hostile round: each test is one wrong answer it met.

The plain loop ``[f(x) for x in items]`` is the specification: what the user sees of an
item names it by its index in the ITERABLE, whatever run of the map it failed in.
"""
from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest
from conftest import wait_dead, wait_for

from poolmagic import NOT_DONE, MapFailedError, Pool
from poolmagic.errors import WorkerCrashedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def fails_then_crashes_at_12(x: int, folder: str) -> int:
    """Items from 6 raise on their first attempt; item 12 then kills its worker."""
    n = len([m for m in os.listdir(folder) if m.startswith(f"{x}.")])
    open(os.path.join(folder, f"{x}.{n}"), "w").close()
    if x >= 6 and n == 0:
        raise ValueError(x)
    if x == 12:
        os._exit(3)
    return 10 * x


@pytest.mark.timeout(60)
def test_a_crash_in_a_resumed_run_names_the_item_by_its_index(tmp_path):
    """--resume runs items 6..19 at the job's positions 0..13: the crash of item 12 read
    'item 12: WorkerCrashedError: ... while running item 6 (12)', its .indices [6]."""
    kw = {"kwargs": {"folder": str(tmp_path)}, "keep_going": True}
    with Pool(2) as pool:
        with pytest.raises(MapFailedError) as info:
            pool.run(fails_then_crashes_at_12, range(20), **kw)
        first = info.value.poolmap_report
        with pytest.raises(MapFailedError) as info:
            pool.run(fails_then_crashes_at_12, range(20), resume=first, chunksize=2, **kw)
        r = info.value.poolmap_report
        assert list(r.errors) == [12]
        err = r.errors[12]
        assert isinstance(err, WorkerCrashedError) and err.indices == [12], err.indices
        assert "running item 12 (12)" in str(err), str(err)
        assert r.results == [NOT_DONE if x == 12 else 10 * x for x in range(20)]


def naps(x: int) -> int:
    time.sleep(0.05)
    return x


@pytest.mark.timeout(60)
def test_a_closed_pool_leaves_no_worker_process():
    """pool.close() with no map running, or with one that then ends: its workers ran on (a
    dropped closed pool's too) until the process exited; multiprocessing's leave."""
    pool = Pool(2)
    assert pool.run(naps, range(4)).results == [0, 1, 2, 3]
    pids = pool.backend.worker_pids()
    assert pids
    pool.close()
    assert not wait_dead(pids), "a closed pool's idle workers still run"

    pool = Pool(2)
    handle = pool.map_async(naps, range(20))
    pool.close()
    assert handle.get(30) == list(range(20))
    wait_for(lambda: not pool.backend.worker_pids(), what="the workers to stop after the last map")
    pool.join()
