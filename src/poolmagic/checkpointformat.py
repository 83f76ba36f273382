"""The checkpoint file format: an append-only log of records signed with this user's key.

::

    header   MAGIC · key id (8) · file id (16, random) · HMAC (32)          72 bytes
    record   SYNC (8) · kind (1) · envelope length (u32) · payload length (u64)
             payload: the envelope (JSON or struct: never pickle), then raw blobs
             sequence number (u64) · HMAC (32)

    kind "M"  meta: a JSON object; the one with the highest sequence number counts
    kind "C"  a finished chunk: envelope (indices, items hash, blob sizes), then
              the results as the worker pickled them and their out-of-band
              buffers (big arrays), each a blob: no re-pickling

Each HMAC-SHA256 is keyed by this user's secret (userkey.py). A record's
covers the file id, its head, payload and sequence number, so a record cannot
be edited, moved into another file, or reordered (records count in sequence
order, whatever their place). This module holds the layout, the header's
signature and the records' MAC, and the framing and decoding of one record;
checkpointfile.py reads and appends whole files with them, checkpointpaths.py
opens them safely.
"""
from __future__ import annotations

import hmac
import json
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

from .userkey import KeyFileError, key_id, key_path, user_key

MAGIC = b"poolmagic-ckpt2\n"
MAGIC_V1 = b"poolmagic-ckpt1\n"  # the unsigned format before: refused (trust_checkpoint converts it)
SYNC = b"\xd3PMrec\x1a\n"
HEADER = struct.Struct("<16s8s16s32s")  # MAGIC, key id, file id, HMAC
HEAD = struct.Struct("<8scIQ")  # SYNC, kind, envelope length, payload length
TRAIL = struct.Struct("<Q32s")  # sequence number, HMAC
HEADER_SIZE = HEADER.size
KINDS = (b"M", b"C")
_RANGE = struct.Struct("<cqqq")  # b"R", start, stop, step
_LIST = struct.Struct("<cI")  # b"L", count; then count int64
_BLOBS = struct.Struct("<I")  # blob count; then that many uint64 sizes


class CheckpointFileError(Exception):
    """The file is not a checkpoint, or cannot be used as one (the message says why)."""


@dataclass
class Stored:
    """What a checkpoint file holds: its meta, its valid chunk records, where they end."""

    meta: dict = field(default_factory=dict)
    chunks: list = field(default_factory=list)  #: (indices, items_hash, body, frames) per chunk
    end: int = HEADER_SIZE  #: the offset after the last valid record: a writer appends there
    torn: int = 0  #: bytes after it (a torn last record), ignored and cut off by the next writer
    damaged: int = 0  #: records skipped because they failed their HMAC (their items re-run)
    #: per chunk, the meta in effect when it was written (its function's version, its --kw values)
    versions: list = field(default_factory=list)


# ------------------------------------------------------------------ signing


def signing_key() -> bytes:
    """This user's key (made on first use), or CheckpointFileError saying what is wrong with it."""
    try:
        return user_key()
    except (KeyFileError, OSError) as exc:
        raise CheckpointFileError(str(exc)) from None


def make_header(key: bytes, file_id: bytes) -> bytes:
    kid = key_id(key)
    return HEADER.pack(MAGIC, kid, file_id, hmac.digest(key, MAGIC + kid + file_id, "sha256"))


def check_magic(data: Any) -> None:
    """Refuse what is not a checkpoint of this format, before any key is needed."""
    if len(data) == 0:
        raise CheckpointFileError("it is empty")
    head = bytes(data[: len(MAGIC)])
    if head == MAGIC_V1:
        raise CheckpointFileError(
            "it is an unsigned checkpoint (the format before checkpoints were signed): nothing shows "
            "you wrote it. " + _TRUST)
    if not MAGIC.startswith(head) or (len(head) < len(MAGIC) and not head.startswith(b"poolmagic-")):
        raise CheckpointFileError("it is not a poolmagic checkpoint file")
    if len(data) < HEADER_SIZE:
        raise CheckpointFileError("its header is cut short; delete it to start over")


def check_header(data: Any, key: bytes) -> bytes:
    """The file id of a header this key signed; CheckpointFileError naming what is wrong."""
    check_magic(data)
    _, kid, file_id, tag = HEADER.unpack_from(data, 0)
    if kid != key_id(key):
        raise CheckpointFileError(
            "it was not written by you, or not with this machine's key: it is signed with another "
            f"key than yours ({key_path()}; to use your checkpoints on several machines, copy your "
            "key file to each, mode 0600). " + _TRUST)
    if not hmac.compare_digest(tag, hmac.digest(key, MAGIC + kid + file_id, "sha256")):
        raise CheckpointFileError("its header was changed since it was written. " + _TRUST)
    return file_id


_TRUST = ("A checkpoint holds pickled results, and loading one runs the code in it: if you trust "
          "this file, re-sign it with your key first: poolmagic.trust_checkpoint(PATH)")


def record_mac(key: bytes, file_id: bytes) -> Any:
    """The HMAC state every record of the file starts from (``.copy()`` it: ~1 µs, not ~4)."""
    return hmac.new(key, b"R" + file_id, "sha256")



# ------------------------------------------------------------------ one record


def frame(data: memoryview, pos: int, n: int) -> tuple[bytes, int, int, int] | None:
    """(kind, envelope length, payload length, end) of a plausible record at ``pos``, else None."""
    if n - pos < HEAD.size or data[pos : pos + len(SYNC)] != SYNC:
        return None
    _, kind, elen, plen = HEAD.unpack_from(data, pos)
    if kind not in KINDS or elen > plen:
        return None
    return kind, elen, plen, pos + HEAD.size + plen + TRAIL.size


def next_sync(buf: bytearray, pos: int) -> int:
    at = buf.find(SYNC, pos + 1)
    return len(buf) if at < 0 else at


def decode_record(out: Stored, kind: bytes, envelope: memoryview, blobs: memoryview, where: str) -> None:
    try:
        if kind == b"M":
            meta = json.loads(bytes(envelope))
            if type(meta) is not dict:
                raise ValueError("the meta is not a JSON object")
            out.meta = {**out.meta, **meta}  # a new dict: the chunks written before keep theirs
            return
        indices, digest, sizes = decode_chunk_envelope(envelope)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointFileError(f"{where}: its envelope is malformed ({exc})") from None
    if sum(sizes) != len(blobs) or not sizes:
        raise CheckpointFileError(f"{where}: its blob sizes ({sum(sizes)} bytes) do not match its "
                                  f"payload ({len(blobs)} bytes)")
    parts, at = [], 0
    for s in sizes:
        parts.append(blobs[at : at + s])
        at += s
    out.chunks.append((indices, digest, parts[0], parts[1:]))
    out.versions.append(out.meta)



def encode_chunk_envelope(indices: Any, items_hash: bytes, sizes: list[int]) -> bytes:
    """indices (a range or int sequence), the items' hash (<= 255 bytes) and blob sizes, packed."""
    if type(indices) is range:
        head = _RANGE.pack(b"R", indices.start, indices.stop, indices.step)
    else:
        arr = array("q", indices)
        head = _LIST.pack(b"L", len(arr)) + arr.tobytes()
    digest = bytes(items_hash)
    if len(digest) > 255:
        raise ValueError("an items hash is at most 255 bytes")
    return b"".join([head, bytes([len(digest)]), digest, _BLOBS.pack(len(sizes)), array("Q", sizes).tobytes()])


def decode_chunk_envelope(env: Any) -> tuple[Any, bytes, list[int]]:
    """The inverse of ``encode_chunk_envelope``; ValueError/struct.error when malformed."""
    env = memoryview(env)
    if bytes(env[:1]) == b"R":
        _, a, b, c = _RANGE.unpack_from(env)
        indices: Any = range(a, b, c)
        at = _RANGE.size
    elif bytes(env[:1]) == b"L":
        count = _LIST.unpack_from(env)[1]
        at = _LIST.size + 8 * count
        if at > len(env):
            raise ValueError("its index list is cut short")
        arr = array("q")
        arr.frombytes(env[_LIST.size : at])
        indices = arr.tolist()
    else:
        raise ValueError("unknown index form")
    hlen = env[at]
    digest = bytes(env[at + 1 : at + 1 + hlen])
    at += 1 + hlen
    count = _BLOBS.unpack_from(env, at)[0]
    at += _BLOBS.size
    if at + 8 * count != len(env):
        raise ValueError("its length does not match its blob count")
    sizes = array("Q")
    sizes.frombytes(env[at:])
    return indices, digest, sizes.tolist()

