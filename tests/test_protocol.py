"""engine/protocol.py: the messages between the parent and a worker.

No worker process here: messages go through ``encode``/``decode`` and, for
out-of-band frames, through a real ``multiprocessing.Pipe()``, exactly as
handle.py (parent) and worker.py (worker) use them.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import textwrap
import threading
import typing
import uuid

import cloudpickle
import numpy as np
import pytest
from multiprocessing import Pipe

from poolmagic.engine import protocol as P
from poolmagic.engine.mapoptions import MapOptions
from poolmagic.errors import pack_exception

# Modules whose classes an envelope may name: unpickling one must import nothing
# a worker has not already imported (protocol.py's promise).
ENVELOPE_MODULES = {"builtins", P.__name__, MapOptions.__module__}


def _packed_error() -> dict:
    try:
        raise ValueError("bad item 7")
    except ValueError as exc:
        return pack_exception(exc, "")


def _key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _items_blob():
    """A chunk of items as handle.encode_chunk makes it: a list with a big array."""
    items = [np.arange(1 << 14, dtype=np.float64), {"id": 3}, "text"]
    return P.dumps_oob(items, cloudpickle.dumps)


def samples() -> dict[str, list]:
    """Realistic instances of every message, by class name."""
    fn_data = cloudpickle.dumps(lambda x, y=2: x * y)
    items_blob, items_frames = _items_blob()
    result_body, result_frames = P.dumps_oob(([4, 6, None], [(1, "stdout", "hello\n")], []), cloudpickle.dumps)
    options = MapOptions(star=True, chunksize=8, timeout=2.5, keep_going=True, seed=11, threads=2,
                         max_memory="500MB")
    return {
        "LoadFunction": [
            P.LoadFunction(_key(fn_data), fn_data, (), False),
            P.LoadFunction(_key(b"f2"), fn_data, (1 << 20, 1 << 17), True),
        ],
        "SetContext": [
            P.SetContext(_key(b"ctx"), os.getcwd(), dict(os.environ), list(sys.path), 4),
            P.SetContext(_key(b"ctx2"), "/tmp", {"PATH": "/usr/bin", "LANG": "C.UTF-8"}, [""], None),
        ],
        "RunChunk": [
            P.RunChunk(3, _key(fn_data), _key(b"ctx"), 100, 25, range(100, 125), (),
                       P.OptionsWire().dump(MapOptions()), False),
            P.RunChunk(4, _key(fn_data), _key(b"ctx"), 125, 3, items_blob,
                       tuple(f.nbytes for f in items_frames), P.OptionsWire().dump(options), True),
        ],
        "Ready": [P.Ready()],
        "Began": [P.Began(4)],
        "Progress": [P.Progress(seq=4, done=17)],
        "ChunkDone": [
            P.ChunkDone(4, 1234.5, 1236.25, [0.5, 0.75, 0.5], result_body,
                        tuple(f.nbytes for f in result_frames), {"mymod": ("/work/mymod.py", 1700000000)}, None),
            P.ChunkDone(5, 1.0, 2.0, None, result_body, (1 << 20,), None, "sys.path changed"),
        ],
        "ChunkFailed": [
            P.ChunkFailed(6, "context", _packed_error()),
            P.ChunkFailed(7, "decode", _packed_error()),
        ],
        "WorkerFailed": [P.WorkerFailed(_packed_error())],
    }


class RecordingUnpickler(pickle.Unpickler):
    """Unpickles like ``pickle.loads`` and records every class/function it looks up."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.looked_up: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        self.looked_up.add((module, name))
        return super().find_class(module, name)


# ---------------------------------------------------------------- the message set


def _namedtuple_classes() -> set[type]:
    return {
        obj for obj in vars(P).values()
        if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
        and obj.__module__ == P.__name__
    }


def test_every_message_class_of_the_module_is_in_MESSAGES():
    """A message class added to protocol.py must also be added to MESSAGES (and Message)."""
    missing = sorted(c.__name__ for c in _namedtuple_classes() - set(P.MESSAGES))
    assert not missing, f"message classes not in protocol.MESSAGES: {missing}"
    assert len(set(P.MESSAGES)) == len(P.MESSAGES)
    assert set(typing.get_args(P.Message)) == set(P.MESSAGES)


def test_every_message_is_described_in_the_module_docstring():
    for cls in P.MESSAGES:
        assert f"    {cls.__name__} " in P.__doc__, f"{cls.__name__} is not described in protocol.py's docstring"


def test_every_message_has_a_round_trip_sample_here():
    """A new message needs realistic values in samples() (so the round trip below covers it)."""
    have = samples()
    assert sorted(have) == sorted(c.__name__ for c in P.MESSAGES)


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("name", sorted(c.__name__ for c in P.MESSAGES))
def test_round_trip(name):
    for msg in samples()[name]:
        data = P.encode(msg)
        assert isinstance(data, bytes)
        back = P.decode(data)
        assert type(back) is type(msg)
        assert back == msg
        assert back._fields == msg._fields


def test_an_envelope_is_a_plain_tuple_that_names_no_message_class():
    """The message types are known to both ends: the wire holds a tag, not a class to look up."""
    for name, msgs in samples().items():
        for msg in msgs:
            u = RecordingUnpickler(P.encode(msg))
            wire = u.load()
            assert type(wire) is tuple and P.MESSAGES[wire[0]] is type(msg), name
            assert not {n for m, n in u.looked_up if m == P.__name__}, (name, u.looked_up)


def test_options_are_pickled_once_per_options_and_read_once_per_change():
    parent, worker = P.OptionsWire(), P.OptionsWire()
    a, b = MapOptions.from_kwargs({"seed": 1}), MapOptions.from_kwargs({"seed": 2})
    assert MapOptions.from_kwargs({"seed": 1}) is a  # made once: the parent keys on the object
    blob_a = parent.dump(a)
    assert parent.dump(a) is blob_a  # not pickled again
    assert worker.load(blob_a) == a
    assert worker.load(bytes(blob_a)) is worker.load(blob_a)  # equal bytes: not unpickled again
    blob_b = parent.dump(b)
    assert worker.load(blob_b) == b and worker.load(blob_b).seed == 2
    assert worker.load(parent.dump(a)).seed == 1  # and back: each change is read
    equal = MapOptions(seed=1)  # equal, another object: pickled again, the same bytes
    assert equal is not a and parent.dump(equal) == blob_a


def test_a_range_travels_as_a_range():
    msg = samples()["RunChunk"][0]
    back = P.decode(P.encode(msg))
    assert type(back.items) is range and back.items == range(100, 125)
    assert back.count == len(back.items)


def test_run_chunk_items_bytes_rebuild_the_items():
    msg = samples()["RunChunk"][1]
    _, frames = _items_blob()
    back = P.decode(P.encode(msg))
    assert back.sizes == tuple(f.nbytes for f in frames) == ((1 << 14) * 8,)
    items = pickle.loads(back.items, buffers=[bytearray(f) for f in frames])
    assert np.array_equal(items[0], np.arange(1 << 14, dtype=np.float64))
    assert items[1:] == [{"id": 3}, "text"]
    assert P.OptionsWire().load(back.options).max_memory == 500 * 2**20


@pytest.mark.parametrize("name", sorted(c.__name__ for c in P.MESSAGES))
def test_envelopes_name_only_builtins_protocol_and_mapoptions(name):
    """Whatever the user owns travels as bytes: the envelope itself refers to no other module."""
    for msg in samples()[name]:
        u = RecordingUnpickler(P.encode(msg))
        assert P.from_wire(u.load()) == msg
        foreign = sorted({m for m, _ in u.looked_up} - ENVELOPE_MODULES)
        assert not foreign, f"{name} envelope refers to {foreign}"


def test_decoding_an_envelope_imports_no_module(tmp_path, monkeypatch):
    """A worker's reader thread decodes envelopes: that must never run an import."""
    modname = f"pm_never_imported_{uuid.uuid4().hex}"
    (tmp_path / f"{modname}.py").write_text(textwrap.dedent("""
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(modname)
    items = pickle.dumps([mod.Point(1, 2), mod.Point(3, 4)], protocol=5)  # by reference, to the module
    del mod
    sys.modules.pop(modname)
    try:
        envelope = P.encode(P.RunChunk(1, "f", "c", 0, 2, items, (), P.OptionsWire().dump(MapOptions(seed=1)), False))
        before = set(sys.modules)
        msg = P.decode(envelope)
        assert set(sys.modules) - before == set(), "decoding an envelope imported modules"
        assert modname not in sys.modules
        # the control: the user's bytes do need that module (decoded later, on the main thread)
        points = pickle.loads(msg.items)
        assert modname in sys.modules
        assert [(p.x, p.y) for p in points] == [(1, 2), (3, 4)]
    finally:
        sys.modules.pop(modname, None)


# ---------------------------------------------------------------- out-of-band frames


def _send_and_receive(msg, frames):
    """Send ``msg`` and its frames through a real Pipe (from a thread: a frame may
    exceed the pipe's buffer) and read them back as the parent does."""
    a, b = Pipe()
    errors = []

    def send():
        try:
            a.send_bytes(P.encode(msg))
            P.send_frames(a, frames)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    try:
        assert b.poll(5), "nothing arrived"
        got = P.decode(b.recv_bytes())
        received = P.recv_frames(b, got.sizes)
    finally:
        t.join(5)
        a.close()
        b.close()
    assert not errors, errors
    return got, received


def _base_chain_end(arr):
    x = arr
    while isinstance(x, np.ndarray) and x.base is not None:
        x = x.base
    if isinstance(x, memoryview):
        x = x.obj
    return x


def test_chunk_done_with_out_of_band_frames_through_a_pipe():
    big = np.random.default_rng(0).random(1 << 17)  # 1 MB of float64
    assert big.nbytes == 1 << 20
    body, frames = P.dumps_oob([big, 1, 2, 3], cloudpickle.dumps)
    assert [f.nbytes for f in frames] == [big.nbytes]
    assert len(body) < P.OUT_OF_BAND_MIN, "the array went in band"
    msg = P.ChunkDone(9, 10.0, 11.5, None, body, tuple(f.nbytes for f in frames), None, None)

    got, received = _send_and_receive(msg, frames)

    assert got == msg
    assert [type(r) for r in received] == [bytearray]
    assert [len(r) for r in received] == [big.nbytes]
    out = pickle.loads(got.body, buffers=received)
    assert out[1:] == [1, 2, 3]
    arr = out[0]
    assert arr.dtype == big.dtype and np.array_equal(arr, big)
    # no copy: the array lives in the bytearray the frame was received into
    assert _base_chain_end(arr) is received[0]
    assert np.shares_memory(arr, np.frombuffer(received[0], dtype=np.uint8))
    assert arr.flags.writeable


def test_frames_of_size_zero_and_the_next_message_stay_in_step():
    payload = memoryview(bytes(range(256)) * 512)
    a, b = Pipe()
    try:
        P.send_frames(a, [memoryview(b""), payload[:1000]])
        a.send_bytes(P.encode(P.Began(2)))
        received = P.recv_frames(b, (0, 1000))
        assert received == [bytearray(), bytearray(payload[:1000])]
        assert P.decode(b.recv_bytes()) == P.Began(2)
    finally:
        a.close()
        b.close()


def test_a_frame_bigger_than_the_socket_buffer_arrives_whole_and_a_cut_one_raises_eoferror():
    big = np.arange(5_000_000, dtype=np.float64)  # 40 MB: many socket buffers' worth
    a, b = Pipe()
    P.widen_buffers(a)
    P.widen_buffers(b)
    t = threading.Thread(target=P.send_frames, args=(a, [memoryview(big)]))
    t.start()
    try:
        (got,) = P.recv_frames(b, (big.nbytes,))
    finally:
        t.join(10)
    assert np.array_equal(np.frombuffer(got, dtype=np.float64), big)

    P.send_frames(a, [memoryview(big).cast("B")[:1000]])
    a.close()  # the sender dies after 1,000 of the 8,000 bytes promised
    with pytest.raises(EOFError, match="closed while sending a frame"):
        P.recv_frames(b, (8000,))
    b.close()


def test_dumps_oob_keeps_small_buffers_in_band():
    small = np.ones(P.OUT_OF_BAND_MIN - 1, dtype=np.uint8)
    body, frames = P.dumps_oob([small, 5], pickle.dumps)
    assert frames == []
    out = pickle.loads(body)  # no buffers needed
    assert np.array_equal(out[0], small) and out[1] == 5


def test_dumps_oob_sends_a_buffer_of_exactly_the_threshold_out_of_band():
    edge = np.ones(P.OUT_OF_BAND_MIN, dtype=np.uint8)
    body, frames = P.dumps_oob(edge, pickle.dumps)
    assert [f.nbytes for f in frames] == [P.OUT_OF_BAND_MIN]
    assert np.array_equal(pickle.loads(body, buffers=frames), edge)


def test_dumps_oob_splits_a_mix_of_big_and_small_buffers():
    big, small = np.arange(1 << 15, dtype=np.int64), np.arange(10, dtype=np.int64)
    strided = np.arange(1 << 16, dtype=np.int64)[::2]  # not contiguous: pickled in band
    body, frames = P.dumps_oob({"big": big, "small": small, "strided": strided, "n": 3}, pickle.dumps)
    assert [f.nbytes for f in frames] == [big.nbytes]
    out = pickle.loads(body, buffers=frames)
    assert np.array_equal(out["big"], big) and np.array_equal(out["small"], small)
    assert np.array_equal(out["strided"], strided) and out["n"] == 3
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(body)  # the big one really is out of band


def test_dumps_oob_frames_are_views_not_copies():
    big = np.zeros(1 << 16, dtype=np.uint8)
    _, frames = P.dumps_oob(big, pickle.dumps)
    assert np.shares_memory(np.frombuffer(frames[0], dtype=np.uint8), big)
