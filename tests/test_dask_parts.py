"""engine/dask's parts that need no cluster: marks.py (what a worker wrote of its chunks) and
connecterror.py (why a cluster cannot be reached, in words). The rest of the dask
backend is tested with a cluster in test_dask.py and test_remote_cluster.py."""
from __future__ import annotations

import pytest

pytest.importorskip("distributed", reason="the dask backend needs: pip install 'poolmagic[dask]'")

from poolmagic.engine.dask.connecterror import connect_error  # noqa: E402
from poolmagic.engine.dask.marks import read_marks  # noqa: E402
from poolmagic.engine.dask.task import mark_name  # noqa: E402
from poolmagic.errors import PoolmapError  # noqa: E402

ADDRESS = "tls://127.0.0.1:8786"


@pytest.mark.parametrize("written, marks", [
    (b"%20d\n" % 7, (7, None)),  # running chunk 7
    (b"%20d\n%20d\n" % (-1, 7), (-1, 7)),  # none running; chunk 7 ended last
    (b"", (-1, None)),  # nothing written yet
    (b"garbage\n", (None, None)),
])
def test_a_workers_marks_are_read_from_its_file(tmp_path, written, marks):
    (tmp_path / mark_name(ADDRESS)).write_bytes(written)
    assert read_marks(str(tmp_path), ADDRESS) == marks


def test_no_marks_where_none_are_kept(tmp_path):
    assert read_marks(None, ADDRESS) == (None, None)  # not our cluster
    assert read_marks(str(tmp_path), ADDRESS) == (None, None)  # no file


def test_a_connect_error_says_where_it_tried_and_how_to_set_up_tls():
    cause = OSError("[SSL: WRONG_VERSION_NUMBER] wrong version number")
    err = connect_error(cause, ADDRESS)
    assert isinstance(err, PoolmapError) and err.__cause__ is cause
    assert str(err).startswith(f"could not connect to the dask scheduler at {ADDRESS}: OSError: [SSL")
    assert "needs dask's TLS configuration" in str(err)
    assert str(connect_error(RuntimeError("x"), None)) == "could not start a dask LocalCluster: RuntimeError: x"


def test_a_connect_error_of_poolmagics_own_is_said_once_with_again():
    own = PoolmapError(f"could not connect to the dask scheduler at {ADDRESS}: nothing listens there")
    assert connect_error(own, ADDRESS) is own
    again = connect_error(own, ADDRESS, again=True)
    assert str(again) == (f"could not connect again to the dask scheduler at {ADDRESS} after losing "
                          f"the connection: nothing listens there")
