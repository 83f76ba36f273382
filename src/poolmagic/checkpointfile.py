"""The checkpoint file: an append-only log of checksummed records.

::

    header   b"poolmagic-ckpt1\\n"                                  16 bytes
    record   kind (1 byte) · payload length (u64) · CRC-32 (u32)   13 bytes
             payload: an envelope (pickle of builtins), then raw byte blobs

    kind "M"  meta: {"items": n, "function": key}; the last one counts
    kind "C"  a finished chunk: envelope (indices, items_hash, blob sizes),
              then the results as the worker pickled them and their
              out-of-band buffers (big arrays), each a blob: no re-pickling

A record is written with one ``writev`` on an ``O_APPEND`` descriptor: a
kernel killed mid-map leaves whole records and at most one torn last record,
which ``read`` detects (length or CRC) and ignores; the next writer cuts it
off before appending. Nothing is fsynced per record: what ``write`` returned
is in the operating system's cache and survives the process (the case this
exists for: a kernel restart, crash or OOM kill); the file is fsynced when a
map that ran a second or more ends, so a power loss costs at most the last
records, cut off as torn. Why not SQLite: docs/design.md ("Long runs").
"""
from __future__ import annotations

import fcntl
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"poolmagic-ckpt1\n"
_HEAD = struct.Struct("<cQI")  # kind, payload length, CRC-32 of the payload
_ENVELOPE = struct.Struct("<I")  # the envelope's length, first in a payload


class CheckpointFileError(Exception):
    """The file is not a checkpoint, or cannot be used as one (the message says why)."""


@dataclass
class Stored:
    """What a checkpoint file holds: its meta, its whole chunk records, where they end."""

    meta: dict = field(default_factory=dict)
    chunks: list = field(default_factory=list)  #: (indices, items_hash, body, frames) per chunk
    end: int = len(MAGIC)  #: the offset after the last whole record
    torn: int = 0  #: bytes after it (a torn last record), ignored
    damaged: int = 0  #: records skipped as damaged (their items run again)


def read(path: str) -> Stored:
    """Every whole record of the file; a torn tail is skipped. Raises CheckpointFileError."""
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)  # writable: arrays loaded from it are too
            got = f.readinto(buf)
        data = memoryview(buf)[:got]
    except OSError as exc:
        raise CheckpointFileError(str(exc)) from None
    if not data:
        return Stored(end=0)
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise CheckpointFileError("it is not a poolmagic checkpoint file")
    out = Stored()
    pos = len(MAGIC)
    while pos + _HEAD.size <= len(data):
        kind, size, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        payload = data[start : start + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            break  # a torn last record: ignored, and cut off by the next writer
        n = _ENVELOPE.unpack_from(payload)[0]
        envelope = pickle.loads(payload[_ENVELOPE.size : _ENVELOPE.size + n])
        if kind == b"M":
            out.meta.update(envelope)
        elif kind == b"C":
            indices, digest, sizes = envelope
            blobs, at = [], _ENVELOPE.size + n
            for s in sizes:
                blobs.append(payload[at : at + s])
                at += s
            out.chunks.append((indices, digest, blobs[0], blobs[1:]))
        pos = start + size
    out.end, out.torn = pos, len(data) - pos
    return out


class Writer:
    """Appends records to one checkpoint file; holds an exclusive lock on it while open."""

    def __init__(self, path: str, end: int, new: bool = False):
        """Open ``path`` for appending, cutting it at ``end`` (past a torn record), or create it
        (``new``: only create it; a file another process made meanwhile is left alone)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_EXCL if new else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            raise CheckpointFileError("another process created it meanwhile") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointFileError("another process is writing it") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                os.write(fd, MAGIC)
            elif size > end:
                os.ftruncate(fd, end)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def meta(self, meta: dict) -> None:
        self._append(b"M", pickle.dumps(meta), [])

    def chunk(self, indices: Any, items_hash: bytes, body: Any, frames: list) -> None:
        blobs = [memoryview(body).cast("B"), *(memoryview(f).cast("B") for f in frames)]
        envelope = pickle.dumps((indices, items_hash, [b.nbytes for b in blobs]))
        self._append(b"C", envelope, blobs)

    def _append(self, kind: bytes, envelope: bytes, blobs: list) -> None:
        parts = [memoryview(_ENVELOPE.pack(len(envelope))), memoryview(envelope), *blobs]
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        _write_all(self.fd, [memoryview(_HEAD.pack(kind, sum(p.nbytes for p in parts), crc)), *parts])

    def close(self, sync: bool = True) -> None:
        """Flush to disk (``sync``) and release the lock."""
        try:
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


_IOV_MAX = 1024


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write the views back to back, however ``writev`` splits them (short writes, IOV_MAX)."""
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        while n:
            if n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
