"""A result tied to its worker process is an error naming the item, never a silent copy (issue 22).

cloudpickle turns a file opened for reading into an ``io.StringIO`` of its
contents; a socket, a lock or a generator cannot be pickled at all. Each is
an error naming the item's index and value, on both backends, and the other
items' results are kept.
"""
from __future__ import annotations

import sys

import cloudpickle
import pytest

from poolmagic import NOT_DONE, ItemPicklingError, MapFailedError, Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def tied(x, path):
    import socket
    import threading

    if x == 1:
        return open(path)  # text, for reading: cloudpickle would copy it
    if x == 2:
        return {"data": [open(path, "rb")]}  # nested, binary
    if x == 3:
        return socket.socket()
    if x == 4:
        return threading.Lock()
    if x == 5:
        return (i for i in range(3))
    if x == 6:
        return threading.RLock()
    return x * 10


@pytest.fixture
def backend(pool_of_each):
    """A warm pool of each backend in turn (tests/conftest.py)."""
    return pool_of_each


@pytest.mark.parametrize("chunksize", [1, 8])
def test_files_sockets_locks_generators_are_errors_naming_the_item(backend, tmp_path, chunksize):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(MapFailedError) as info:
        backend.run(tied, range(8), keep_going=True, chunksize=chunksize, kwargs={"path": str(path)})
    r = info.value.poolmap_report
    assert r.results == [0, NOT_DONE, NOT_DONE, NOT_DONE, NOT_DONE, NOT_DONE, NOT_DONE, 70]
    assert sorted(r.errors) == [1, 2, 3, 4, 5, 6]
    for i, err in r.errors.items():
        assert isinstance(err, ItemPicklingError), (i, err)
        assert f"the result of item {i} (value {i})" in str(err), err
    assert "open file" in str(r.errors[1]) and "data.csv" in str(r.errors[1])
    assert "open file" in str(r.errors[2]) and "'rb'" in str(r.errors[2])
    assert "socket" in str(r.errors[3])
    assert "lock" in str(r.errors[4]) and "lock" in str(r.errors[6])
    assert "generator" in str(r.errors[5])


def test_without_keep_going_the_first_is_raised(local_pool, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("x")
    with pytest.raises(ItemPicklingError, match=r"item 1 \(value 1\).*open file"):
        local_pool.run(tied, range(2), kwargs={"path": str(path)})


def test_ordinary_results_still_travel(backend):
    import io

    import numpy as np

    got = backend.map(_ordinary, range(3))
    assert [g[0] for g in got] == [0, 1, 2]
    assert all(isinstance(g[1], io.BytesIO) and g[1].getvalue() == b"x" for g in got)
    assert all(np.array_equal(g[2], np.arange(4)) for g in got)
    assert all(g[3] is sys.stdout for g in got)  # sys.stdout travels as a reference, as before


def _ordinary(x):
    import io
    import sys

    import numpy as np

    return (x, io.BytesIO(b"x"), np.arange(4), sys.__stdout__)
