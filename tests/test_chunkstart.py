"""The steps before run_chunk, shared by the local worker and the dask task (engine/core/chunkstart.py)."""
import pickle

import pytest

from poolmagic.engine.core.chunkstart import NOT_SENT, FunctionCache, Pickled, StageFailed, start_chunk
from poolmagic.engine.worker import Worker
from poolmagic.engine.dask import task


class _Applier:
    def __init__(self):
        self.applied = []

    def apply(self, ctx):
        if ctx == "bad":
            raise OSError("no such folder")
        self.applied.append(ctx)


def _double(x):
    return 2 * x


def test_the_local_worker_and_the_dask_task_share_the_steps():
    assert task.start_chunk is start_chunk
    import poolmagic.engine.worker as worker

    assert worker.start_chunk is start_chunk
    assert type(task._FNS) is FunctionCache and task._FNS.by_use
    assert type(Worker(None, 0).fns) is FunctionCache and not Worker(None, 0).fns.by_use


def test_a_received_version_keeps_its_place_when_used():
    """The local parent mirrors the cache in the order it sent the versions: use must not reorder it."""
    cache = FunctionCache(size=2)
    cache.put("a", Pickled(pickle.dumps(_double), None))
    cache.put("b", Pickled(pickle.dumps(_double), None))
    assert cache.get("a")(3) == 6  # loaded, still the oldest
    cache.put("c", _double)
    assert list(cache.entries) == ["b", "c"]


def test_by_use_keeps_the_last_used():
    cache = FunctionCache(size=2, by_use=True)
    cache.put("a", _double)
    cache.put("b", _double)
    cache.get("a")
    cache.put("c", _double)
    assert list(cache.entries) == ["a", "c"]


def test_a_version_never_received_fails_the_load_stage():
    with pytest.raises(StageFailed) as info:
        start_chunk(_Applier(), None, FunctionCache(), "k", range(2))
    assert info.value.stage == "load"
    assert "not sent" in info.value.packed["message"] or "not sent" in str(info.value.packed)


def test_each_stage_names_itself():
    fns = FunctionCache()
    fns.put("k", Pickled(pickle.dumps(_double), None))
    applier = _Applier()
    fn, items = start_chunk(applier, "ctx", fns, "k", pickle.dumps([1, 2]))
    assert applier.applied == ["ctx"] and list(map(fn, items)) == [2, 4]
    assert start_chunk(applier, None, fns, "k", range(3))[1] == range(3)
    for ctx, items, stage in [("bad", range(1), "context"), (NOT_SENT, range(1), "context"),
                              (None, b"not a pickle", "decode")]:
        with pytest.raises(StageFailed) as info:
            start_chunk(applier, ctx, fns, "k", items)
        assert info.value.stage == stage


def test_a_dask_blob_is_loaded_once_per_process():
    blob = task.Blob("v1", pickle.dumps(_double), [])
    fns = FunctionCache(by_use=True)
    fn, items = start_chunk(_Applier(), None, fns, "v1", task.Blob(None, pickle.dumps([5]), []), source=blob)
    assert fn(items[0]) == 10
    assert start_chunk(_Applier(), None, fns, "v1", range(1), source=None)[0] is fn
