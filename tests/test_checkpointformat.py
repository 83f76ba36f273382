"""The checkpoint file format stays byte-compatible: a file poolmagic wrote at commit 1598cff
(tests/data/checkpoint-1598cff.ckpt, signed with the fixed key below) is still read, loaded
by a checkpointed map, and written again byte for byte.

The file was made by ``_records`` below with that commit's ``Writer``, its random file id
fixed: a meta record, a chunk of ``range(0, 3)`` (its items stored as a range) and a chunk
of positions [5, 3] (8-byte keys per item, a numpy array out of band).
"""
from __future__ import annotations

import os
import pickle
import secrets
import shutil
from pathlib import Path

import numpy as np
import pytest

from poolmagic import checkpointfile
from poolmagic.checkpointing import Checkpoint
from poolmagic.itemkeys import items_hash

GOLDEN = Path(__file__).parent / "data" / "checkpoint-1598cff.ckpt"
KEY = bytes(range(32))  # not a secret: only this test's files are signed with it
FILE_ID = b"golden-file-id16"
ITEMS = [0, 1, 2, "three", 4, "five", 6]


@pytest.fixture
def golden_key(tmp_path, monkeypatch):
    """This user's key is KEY (a key home of the test's own)."""
    home = tmp_path / "xdg-golden"
    (home / "poolmagic").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    key = home / "poolmagic" / "checkpoint.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.setattr(secrets, "token_bytes", lambda n: FILE_ID[:n])


def _records(w, bodies=None) -> None:
    """The records of the golden file, in order (``bodies``: the pickles to store, else made)."""
    def body(values):
        frames: list = []
        data = pickle.dumps((values, [], []), protocol=5, buffer_callback=frames.append)
        return data, [f.raw() for f in frames]

    w.meta({"items": len(ITEMS), "function": "fkey"})
    first, second = bodies or (body([0, 1, 4]), body([np.arange(4.0), "THREE"]))
    w.chunk(range(0, 3), items_hash(range(0, 3)), *first)
    w.chunk([5, 3], items_hash([ITEMS[5], ITEMS[3]], [5, 3]), *second)


def test_a_checkpoint_written_at_1598cff_is_read_record_by_record(golden_key):
    got = checkpointfile.read(str(GOLDEN))
    assert got.meta == {"items": 7, "function": "fkey"}
    assert (got.damaged, got.torn, got.end) == (0, 0, GOLDEN.stat().st_size)
    (idx1, h1, b1, f1), (idx2, h2, b2, f2) = got.chunks
    assert (idx1, idx2) == (range(0, 3), [5, 3])
    assert (h1, h2) == (items_hash(range(0, 3)), items_hash(["five", "three"], [5, 3]))
    assert pickle.loads(b1, buffers=f1)[0] == [0, 1, 4]
    assert len(f2) == 1, "the array went out of band, a blob of its own"
    array, three = pickle.loads(b2, buffers=f2)[0]
    assert np.array_equal(array, np.arange(4.0)) and three == "THREE"


def test_a_checkpoint_written_at_1598cff_loads_and_runs_only_what_it_lacks(golden_key, tmp_path):
    path = tmp_path / "copy.ckpt"
    shutil.copy(GOLDEN, path)
    os.chmod(path, 0o600)
    ck = Checkpoint(str(path))
    report, missing, todo = ck.load(ITEMS, "f", "fkey")
    ck._put("close")
    assert ck.wait() is None
    assert (missing, todo, report.resumed, ck.function_changed) == ([4, 6], [4, 6], (5, 2), False)
    assert report.results[:4] == [0, 1, 4, "THREE"] and np.array_equal(report.results[5], np.arange(4.0))


def test_todays_writer_writes_the_1598cff_file_byte_for_byte(golden_key, tmp_path):
    stored = checkpointfile.read(str(GOLDEN))
    path = tmp_path / "again.ckpt"
    w = checkpointfile.Writer(str(path), 0)
    _records(w, [(body, frames) for _, _, body, frames in stored.chunks])
    w.close(sync=False)
    assert path.read_bytes() == GOLDEN.read_bytes()
