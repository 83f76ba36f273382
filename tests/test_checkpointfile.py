"""checkpointfile.py: the append-only log of signed records (checkpointformat.py), on real files."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from poolmagic import checkpointfile
from poolmagic.checkpointfile import HEADER_SIZE, CheckpointFileError, Writer, read
from poolmagic.checkpointformat import MAGIC


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
    assert path.read_bytes().startswith(MAGIC) and path.stat().st_size == HEADER_SIZE
    assert read(str(path)).chunks == []


# ---------------------------------------------------------------- damage costs only itself


def _eleven(path: str, key: bytes | None = None) -> list[tuple[int, int]]:
    """A checkpoint of 11 one-item chunk records; the (start, end) offset of each."""
    w = Writer(path, 0, key=key)
    spans = []
    for k in range(11):
        start = os.fstat(w.fd).st_size
        w.chunk([k], b"h%d" % k, pickle.dumps(([k * 10], [], [])), [])
        spans.append((start, os.fstat(w.fd).st_size))
    w.close()
    return spans


def _values(stored) -> list[int]:
    return [pickle.loads(b, buffers=f)[0][0] for _, _, b, f in stored.chunks]


def _flip(path: str, at: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_a_flipped_payload_byte_costs_only_its_own_record(tmp_path):
    path = str(tmp_path / "ck")
    spans = _eleven(path)
    size = os.path.getsize(path)
    start, end = spans[5]  # record 6 of 11
    _flip(path, start + 40)
    got = read(path)
    assert _values(got) == [k * 10 for k in range(11) if k != 5]
    assert got.damaged == 1 and got.torn == 0 and got.end == size

    w = Writer(path, got.end)  # the writer keeps every valid record after the damaged one
    w.chunk([5], b"h5", pickle.dumps(([50], [], [])), [])
    w.close()
    again = read(path)
    assert sorted(_values(again)) == [k * 10 for k in range(11)] and again.damaged == 1


@pytest.mark.parametrize("where", ["length", "sync", "kind", "sequence", "mac"])
def test_a_damaged_record_frame_is_skipped_and_the_reader_finds_the_next(tmp_path, where):
    path = str(tmp_path / "ck")
    spans = _eleven(path)
    start, end = spans[5]
    at = {"length": start + 13 + 3, "sync": start + 2, "kind": start + 8, "sequence": end - 40, "mac": end - 1}[where]
    _flip(path, at)
    got = read(path)
    assert _values(got) == [k * 10 for k in range(11) if k != 5], where
    assert got.damaged == 1 and got.torn == 0


def test_two_damaged_records_in_a_row_and_a_damaged_last_record(tmp_path):
    path = str(tmp_path / "ck")
    spans = _eleven(path)
    _flip(path, spans[3][0] + 2)  # its SYNC marker
    _flip(path, spans[4][0] + 40)  # its payload
    _flip(path, spans[10][0] + 40)  # the last record, complete but damaged
    got = read(path)
    assert _values(got) == [k * 10 for k in range(11) if k not in (3, 4, 10)]
    assert got.damaged == 3 and got.end == spans[9][1] and got.torn == spans[10][1] - spans[9][1]


def test_reordered_records_count_in_the_order_they_were_written(tmp_path):
    path = str(tmp_path / "ck")
    w = Writer(path, 0)
    spans = []
    for meta in ({"function": "old"}, {"function": "new"}):
        start = os.fstat(w.fd).st_size
        w.meta(meta)
        spans.append((start, os.fstat(w.fd).st_size))
    w.close()
    data = open(path, "rb").read()
    (a0, a1), (b0, b1) = spans
    open(path, "wb").write(data[:a0] + data[b0:b1] + data[a0:a1])  # swapped: "old" now last
    got = read(path)
    assert got.meta == {"function": "new"} and got.damaged == 0

    open(path, "wb").write(data + data[a0:a1])  # a replayed copy of the first record
    got = read(path)
    assert got.meta == {"function": "new"} and got.damaged == 1


def test_a_record_spliced_from_another_file_of_the_same_user_is_refused(tmp_path):
    mine, other = str(tmp_path / "mine"), str(tmp_path / "other")
    spans = _eleven(mine)
    other_spans = _eleven(other)
    data, foreign = open(mine, "rb").read(), open(other, "rb").read()
    s, e = other_spans[2]
    open(mine, "wb").write(data[: spans[5][1]] + foreign[s:e] + data[spans[5][1] :])
    got = read(mine)
    assert _values(got) == [k * 10 for k in range(11)] and got.damaged == 1


def test_records_written_after_a_resume_continue_the_sequence(tmp_path):
    path = str(tmp_path / "ck")
    w = Writer(path, 0)
    w.meta({"function": "f1"})
    w.close()
    w = Writer(path, read(path).end)
    w.meta({"function": "f2"})
    w.close()
    assert read(path).meta == {"function": "f2"}


# ---------------------------------------------------------------- authenticity


def test_a_file_signed_with_another_key_is_refused_naming_the_fix(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    _eleven(path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "someone-else"))
    with pytest.raises(CheckpointFileError, match="not written by you") as info:
        read(path)
    assert f"poolmagic.trust_checkpoint({path!r})" in str(info.value), str(info.value)
    with pytest.raises(CheckpointFileError, match="not written by you"):
        Writer(path, 0)


def test_a_changed_header_is_refused(tmp_path):
    path = str(tmp_path / "ck")
    _eleven(path)
    _flip(path, 30)  # inside the file id
    with pytest.raises(CheckpointFileError, match="header was changed"):
        read(path)


def _planted_v1(path: str, marker: str) -> None:
    """A file in the old unsigned format whose envelope, unpickled, creates ``marker``."""
    import struct
    import zlib

    class Plant:
        def __reduce__(self):
            return (open, (marker, "w"))

    env = pickle.dumps(Plant())
    payload = struct.pack("<I", len(env)) + env
    with open(path, "wb") as fh:
        fh.write(b"poolmagic-ckpt1\n" + struct.pack("<cQI", b"M", len(payload), zlib.crc32(payload)) + payload)
    os.chmod(path, 0o600)


def test_an_old_unsigned_file_is_refused_without_unpickling_it(tmp_path):
    path, marker = str(tmp_path / "ck"), str(tmp_path / "marker")
    _planted_v1(path, marker)
    with pytest.raises(CheckpointFileError, match="unsigned checkpoint") as info:
        read(path)
    assert "trust_checkpoint" in str(info.value)
    assert not os.path.exists(marker)


def test_a_malformed_envelope_in_a_signed_record_names_the_record(tmp_path):
    path = str(tmp_path / "ck")
    w = Writer(path, 0)
    w.meta({"items": 3})
    w._append(b"C", b"Xjunk", [memoryview(b"body")])  # signed, but not an envelope
    w.close()
    with pytest.raises(CheckpointFileError, match=r"record 2 \(at byte \d+\): its envelope is malformed"):
        read(path)


# ---------------------------------------------------------------- fuzzing: damage, edits, splices

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _Plant:
    """Unpickled, creates the marker file: it must never be, from a record whose HMAC fails."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_records(path: str, bodies: list, key: bytes | None = None) -> list[tuple[int, int]]:
    w = Writer(path, 0, key=key)
    spans = []
    for k, (body, frames) in enumerate(bodies):
        start = os.fstat(w.fd).st_size
        if k == 0:
            w.meta({"items": 99, "function": "fuzz"})
        else:
            w.chunk(range(k * 10, k * 10 + 3), b"hash-%d" % k, body, frames)
        spans.append((start, os.fstat(w.fd).st_size))
    w.close()
    return spans


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory):
    """A real checkpoint (a meta and 8 chunks, two with out-of-band arrays); a file signed with
    another key and one with this key but another file id, whose bodies plant the marker."""
    where = tmp_path_factory.mktemp("fuzz")
    marker = str(where / "MARKER")
    good = [(b"", [])]
    for k in range(1, 9):
        values = [f"value-{k}-" * 12, np.arange(k * 100, dtype=np.int32) if k in (2, 5) else k]
        good.append(_body_and_frames(values))
    evil = pickle.dumps(([_Plant(marker)], [], []))
    assert all(len(evil) < len(b) for b, _ in good[1:])
    bad = [(b"", [])] + [(evil, [])] * 4
    spans = _write_records(str(where / "good"), good)
    other_key = _write_records(str(where / "other-key"), bad, key=os.urandom(32))
    same_key = _write_records(str(where / "same-key"), bad)
    files = {name: open(where / name, "rb").read() for name in ("good", "other-key", "same-key")}
    return dict(files=files, spans=spans, good=good, evil=evil, marker=marker, where=where,
                foreign={"other-key": other_key, "same-key": same_key})


_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("zero"), st.integers(0, 10**6), st.integers(1, 300)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert-sync"), st.integers(0, 10**6), st.binary(max_size=40)),
    st.tuples(st.just("move"), st.integers(0, 8), st.integers(0, 9)),
    st.tuples(st.just("splice"), st.sampled_from(["other-key", "same-key"]), st.integers(1, 4), st.integers(0, 10**6)),
    st.tuples(st.just("evil"), st.integers(1, 8)),
)


def _mutate(data: bytearray, spans: list, op: tuple, env: dict) -> bytearray:
    """Apply ``op``; ``spans`` ([start, end] of the header and each record, or None once
    touched) follow the bytes that moved."""

    def insert(at: int, blob: bytes) -> bytearray:
        for s in spans:
            if s is not None:
                if s[0] < at < s[1]:
                    s[:] = [-1, -1]
                elif s[0] >= at:
                    s[0] += len(blob)
                    s[1] += len(blob)
        return data[:at] + blob + data[at:]

    def touch(lo: int, hi: int) -> None:
        for i, s in enumerate(spans):
            if s is not None and s[0] < hi and lo < s[1]:
                spans[i] = None

    kind, n = op[0], len(data)
    if kind == "flip" and n:
        at = op[1] % n
        data[at] ^= 1 << op[2]
        touch(at, at + 1)
    elif kind == "zero" and n:
        at = op[1] % n
        data[at : at + op[2]] = bytes(len(data[at : at + op[2]]))
        touch(at, at + op[2])
    elif kind == "truncate":
        at = op[1] % (n + 1)
        del data[at:]
        touch(at, 1 << 62)
    elif kind in ("insert", "insert-sync"):
        blob = op[2] if kind == "insert" else checkpointfile.SYNC + b"C" + op[2]
        data = insert(op[1] % (n + 1), blob)
    elif kind == "splice":
        s, e = env["foreign"][op[1]][op[2]]
        data = insert(op[3] % (n + 1), env["files"][op[1]][s:e])
    elif kind == "move":
        i = op[1] + 1  # a record (span 0 is the header)
        if spans[i] is None or spans[i][0] < 0:
            return data
        s, e = spans[i]
        blob = bytes(data[s:e])
        del data[s:e]
        spans[i] = None
        for t in spans:
            if t is not None and t[0] >= e:
                t[0] -= e - s
                t[1] -= e - s
        targets = [t[0] for t in spans if t is not None and t[0] >= checkpointfile.HEADER_SIZE] + [len(data)]
        at = sorted(targets)[op[2] % len(targets)]
        data = insert(at, blob)
        spans[i] = [at, at + len(blob)]
    elif kind == "evil":
        i = op[1] + 1
        if spans[i] is None or spans[i][0] < 0:
            return data
        body = env["good"][op[1]][0]
        at = data.index(body, spans[i][0])
        data[at : at + len(body)] = env["evil"] + bytes(len(body) - len(env["evil"]))
        spans[i] = None
    for i, s in enumerate(spans):
        if s is not None and s[0] < 0:
            spans[i] = None
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=4))
def test_fuzz_damage_and_edits_never_unpickle_a_bad_record_and_keep_every_intact_one(fuzz_files, ops):
    env = fuzz_files
    data = bytearray(env["files"]["good"])
    # spans: 0 the header, 1 the meta record, k + 1 chunk k
    spans = [[0, checkpointfile.HEADER_SIZE]] + [list(s) for s in env["spans"]]
    for op in ops:
        data = _mutate(data, spans, op, env)
    path = str(env["where"] / "mutated")
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    try:
        got = read(path)
    except CheckpointFileError:
        assert spans[0] is None or spans[0][0] != 0, "refused a file whose header is intact"
        return
    for _, _, body, frames in got.chunks:  # what longrun does with what read returned
        pickle.loads(body, buffers=frames)
    assert not os.path.exists(env["marker"]), "a record that failed its HMAC was unpickled"

    want = {k: (range(k * 10, k * 10 + 3), b"hash-%d" % k, bytes(env["good"][k][0]),
                [bytes(f) for f in env["good"][k][1]]) for k in range(1, 9)}
    returned = [(idx, h, bytes(b), [bytes(f) for f in fs]) for idx, h, b, fs in got.chunks]
    assert all(r in want.values() for r in returned), "returned a record this file never held"
    for k in range(1, 9):
        if spans[k + 1] is not None:
            assert want[k] in returned, f"the intact record {k} was lost"
    if spans[1] is not None:
        assert got.meta == {"items": 99, "function": "fuzz"}
    assert got.end + got.torn == len(data) and got.damaged >= 0
