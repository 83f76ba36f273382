"""checkpointfile.py: the append-only log of checksummed records, on real files."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from poolmagic.checkpointfile import MAGIC, CheckpointFileError, Writer, read


def _body_and_frames(values):
    frames: list = []
    body = pickle.dumps((values, [], []), protocol=5, buffer_callback=frames.append)
    return body, [f.raw() for f in frames]


def test_records_round_trip_with_out_of_band_arrays_that_stay_writable(tmp_path):
    path = str(tmp_path / "ck")
    w = Writer(path, 0)
    w.meta({"items": 6, "function": "f1"})
    arrays = [np.arange(1000, dtype=np.float64) * k for k in range(3)]
    body, frames = _body_and_frames(arrays)
    w.chunk(range(0, 3), b"h1", body, frames)
    w.chunk([5, 3], b"h2", pickle.dumps((["a", "b"], [], [])), [])
    w.meta({"function": "f2"})
    w.close()

    got = read(path)
    assert got.meta == {"items": 6, "function": "f2"}, "the last meta record counts"
    assert got.torn == 0 and got.end == os.path.getsize(path)
    (idx1, h1, b1, f1), (idx2, h2, b2, f2) = got.chunks
    assert (idx1, h1, idx2, h2) == (range(0, 3), b"h1", [5, 3], b"h2")
    values = pickle.loads(b1, buffers=f1)[0]
    assert all(np.array_equal(v, a) for v, a in zip(values, arrays))
    values[0][0] = 42.0  # a loaded array is the user's to change
    assert pickle.loads(b2, buffers=f2)[0] == ["a", "b"]


def test_a_chunk_of_more_buffers_than_one_writev_takes(tmp_path):
    path = str(tmp_path / "ck")
    arrays = [np.full(20, k, dtype=np.int64) for k in range(1500)]  # > IOV_MAX (1024) blobs
    frames: list = []
    body = pickle.dumps((arrays, [], []), protocol=5, buffer_callback=frames.append)
    assert len(frames) == 1500
    w = Writer(path, 0)
    w.chunk(range(1500), b"h", body, [f.raw() for f in frames])
    w.close()
    (_, _, b, f), = read(path).chunks
    assert [int(a[0]) for a in pickle.loads(b, buffers=f)[0]] == list(range(1500))


@pytest.mark.parametrize("cut", [1, 5, 13, 40])
def test_a_torn_last_record_is_skipped_and_cut_off_by_the_next_writer(tmp_path, cut):
    path = str(tmp_path / "ck")
    w = Writer(path, 0)
    for k in range(3):
        w.chunk([k], b"h", pickle.dumps(([k * 10], [], [])), [])
    w.close()
    os.truncate(path, os.path.getsize(path) - cut)  # the third record loses its last `cut` bytes
    got = read(path)
    assert [idx for idx, *_ in got.chunks] == [[0], [1]] and got.torn > 0

    w = Writer(path, got.end)
    w.chunk([2], b"h", pickle.dumps(([20], [], [])), [])
    w.close()
    again = read(path)
    assert again.torn == 0 and [idx for idx, *_ in again.chunks] == [[0], [1], [2]]


def test_a_corrupted_record_ends_what_is_read(tmp_path):
    path = str(tmp_path / "ck")
    w = Writer(path, 0)
    for k in range(3):
        w.chunk([k], b"h", pickle.dumps(([k], [], [])), [])
    w.close()
    data = bytearray(open(path, "rb").read())
    first_end = read(path).end  # all three
    data[len(MAGIC) + 20] ^= 0xFF  # a flipped bit inside the first record's payload
    open(path, "wb").write(bytes(data))
    got = read(path)
    assert got.chunks == [] and got.end == len(MAGIC) and got.torn == first_end - len(MAGIC)


def test_a_file_that_is_not_a_checkpoint_and_a_held_lock_are_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n" * 10)
    with pytest.raises(CheckpointFileError, match="not a poolmagic checkpoint file"):
        read(str(notes))
    path = str(tmp_path / "ck")
    first = Writer(path, 0)
    try:
        with pytest.raises(CheckpointFileError, match="another process is writing it"):
            Writer(path, 0)
    finally:
        first.close()
    Writer(path, read(path).end).close()  # free again once the first writer closed


def test_an_empty_file_becomes_a_checkpoint(tmp_path):
    path = tmp_path / "ck"
    path.touch()
    assert read(str(path)).end == 0
    Writer(str(path), 0).close()
    assert path.read_bytes() == MAGIC
    assert read(str(path)).chunks == []
