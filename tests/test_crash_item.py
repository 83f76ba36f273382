"""A worker that dies inside a chunk of many items: the error names exactly the item."""
from __future__ import annotations

import os
import sys

import cloudpickle
import pytest

from conftest import read_pid, wait_dead, write_pid
from poolmagic import NOT_DONE, Pool
from poolmagic.errors import MapFailedError, WorkerCrashedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers never import this module


def dies_on_13(x, piddir):
    write_pid(piddir, x)
    if x == 13:
        os._exit(3)
    return 2 * x


@pytest.mark.timeout(60)
def test_crash_in_a_chunk_of_ten_names_item_13(tmp_path):
    with Pool(2) as pool:
        with pytest.raises(WorkerCrashedError) as e:
            pool.run(dies_on_13, range(40), chunksize=10, kwargs={"piddir": str(tmp_path)})
        exc = e.value
        assert exc.indices == [13]
        assert exc.exitcode == 3
        msg = str(exc)
        assert "item 13 (13)" in msg and "died with exit code 3" in msg, msg
        r = exc.report
        assert r.errors.keys() == {13} and r.results[13] is NOT_DONE
        assert all(v is NOT_DONE or v == 2 * i for i, v in enumerate(r.results)), r.results
        pid = read_pid(tmp_path, 13)
        assert wait_dead([pid]) == [] and pid not in pool.backend.worker_pids()
        assert pool.map(abs, range(-3, 0)) == [3, 2, 1]  # the pool still works


@pytest.mark.timeout(60)
def test_crash_with_keep_going_keeps_every_other_result(tmp_path):
    with Pool(2) as pool:
        with pytest.raises(MapFailedError) as e:
            pool.run(dies_on_13, range(40), chunksize=10, keep_going=True, kwargs={"piddir": str(tmp_path)})
        exc = e.value
        assert list(exc.errors) == [13]
        crash = exc.errors[13]
        assert isinstance(crash, WorkerCrashedError) and crash.indices == [13] and crash.exitcode == 3
        r = exc.report
        assert r.results == [NOT_DONE if i == 13 else 2 * i for i in range(40)]
        assert r.done == 39 and r.failed == 1
        assert "1 of 40 items failed" in str(exc) and "item 13: WorkerCrashedError" in str(exc)
        assert pool.map(abs, range(-3, 0)) == [3, 2, 1]
