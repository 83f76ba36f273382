"""The checkpoint file: read every valid record, append signed ones (format: checkpointformat.py).

``read`` checks the header and each record's HMAC with ``hmac.compare_digest``
before anything of it is used: nothing is ever unpickled here, and the results
it returns are from records this user's key signed. A file signed with another
key, unsigned or with a changed header is refused whole; a record that fails
its HMAC (a damaged disk block, an edit) is skipped and counted
(``Stored.damaged``): its items re-run. The reader then finds the next record
by its SYNC marker, so later records are kept. Only the tail after the last
valid record (a record torn by a kill mid-write) is cut off by the next writer.
Files are opened by checkpointpaths.py: private, regular, this user's.

A record is written with one ``writev`` on an ``O_APPEND`` descriptor. Nothing
is fsynced per record: what ``write`` returned survives the process (a kernel
restart, crash or OOM kill); the file is fsynced when a map that ran a second
or more ends. Why not SQLite: docs/design.md ("Long runs").
"""
from __future__ import annotations

import fcntl
import hmac
import json
import os
import secrets
import shlex
from typing import Any

from .checkpointformat import (
    HEAD,
    HEADER_SIZE,
    SYNC,
    TRAIL,
    CheckpointFileError,
    Stored,
    check_header,
    check_magic,
    decode_record,
    encode_chunk_envelope,
    frame,
    make_header,
    next_sync,
    record_mac,
    signing_key,
)
from .checkpointpaths import open_checked

__all__ = ["CheckpointFileError", "HEADER_SIZE", "SYNC", "Stored", "Writer", "named", "parse", "read"]


# ------------------------------------------------------------------ reading


def read(path: str) -> Stored:
    """Every valid record of the file, in sequence order. Raises CheckpointFileError."""
    try:
        try:
            fd = open_checked(path, os.O_RDONLY)
        except CheckpointFileError as exc:
            raise named(exc, path) from None
        try:
            buf = bytearray(os.fstat(fd).st_size)  # writable: arrays loaded from it are too
            got = 0
            while got < len(buf):
                n = os.readv(fd, [memoryview(buf)[got:]])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointFileError(exc.strerror or str(exc)) from None
    del buf[got:]
    if not buf:
        return Stored(end=0)
    try:
        check_magic(buf)
        key = signing_key()
        file_id = check_header(buf, key)
    except CheckpointFileError as exc:
        raise named(exc, path) from None
    return parse(buf, key, file_id)


def named(exc: CheckpointFileError, path: str) -> CheckpointFileError:
    """The error with the file's path in the commands it suggests."""
    text = str(exc).replace("trust_checkpoint(PATH", f"trust_checkpoint({os.fspath(path)!r}")
    return CheckpointFileError(text.replace("chmod go-w PATH", f"chmod go-w {shlex.quote(os.fspath(path))}"))


def parse(buf: bytearray, key: bytes, file_id: bytes) -> Stored:
    """Every record of ``buf`` that ``key`` signed for ``file_id``, in sequence order."""
    data, n = memoryview(buf), len(buf)
    out, found = Stored(), []  # found: (seq, ordinal, offset, kind, envelope, blobs area)
    pos = region = HEADER_SIZE
    failed, junk, ordinal = 0, False, 0
    base = record_mac(key, file_id)
    while pos < n:
        rec = frame(data, pos, n)
        if rec is not None:
            kind, elen, plen, end = rec
            if end > n:  # runs past the end of the file: torn
                pos = next_sync(buf, pos)
                continue
            ordinal += 1
            mac = base.copy()
            mac.update(data[pos : end - 32])
            if hmac.compare_digest(mac.digest(), bytes(data[end - 32 : end])):
                if pos > region:
                    out.damaged += failed + junk or 1
                seq = TRAIL.unpack_from(data, end - TRAIL.size)[0]
                start = pos + HEAD.size
                found.append((seq, ordinal, pos, kind, data[start : start + elen], data[start + elen : start + plen]))
                pos = region = out.end = end
                failed, junk = 0, False
                continue
            failed += 1
        elif pos == region:
            junk = True
        pos = next_sync(buf, pos)
    if n > region:  # the tail: complete records that failed count; a torn one does not
        out.damaged += failed + (junk and n - region >= HEAD.size + TRAIL.size)
    out.torn = n - out.end
    found.sort(key=lambda r: r[0])
    last = None
    for seq, ordinal, offset, kind, envelope, blobs in found:
        if seq == last:  # a copy of a record: only an edit makes one
            out.damaged += 1
            continue
        last = seq
        decode_record(out, kind, envelope, blobs, f"record {ordinal} (at byte {offset})")
    return out



# ------------------------------------------------------------------ writing


class Writer:
    """Appends signed records to one checkpoint file; holds an exclusive lock on it while open."""

    def __init__(self, path: str, end: int, new: bool = False, *, key: bytes | None = None):
        """Open ``path`` for appending at ``end`` (from ``read``: what follows, a torn tail, is cut
        off), or create it ``0600`` (``new``: only create it; a file another process made
        meanwhile is left alone). A file this user's key did not sign is refused."""
        try:
            self._start(os.fspath(path), end, new, signing_key() if key is None else key)
        except CheckpointFileError as exc:
            raise named(exc, path) from None

    def _start(self, path: str, end: int, new: bool, key: bytes) -> None:
        self.key = key
        flags = os.O_RDWR | os.O_APPEND
        try:
            try:
                fd = open_checked(path, flags, create=True)
            except FileExistsError:
                if new:
                    raise CheckpointFileError("another process created it meanwhile") from None
                fd = open_checked(path, flags)
        except OSError as exc:
            raise CheckpointFileError(exc.strerror or str(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointFileError("another process is writing it") from None
        try:
            self._open(fd, end)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _open(self, fd: int, end: int) -> None:
        size = os.fstat(fd).st_size
        self.seq, self._base = 0, None
        if size == 0:
            self.file_id = secrets.token_bytes(16)
            os.write(fd, make_header(self.key, self.file_id))
            return
        self.file_id = check_header(os.pread(fd, HEADER_SIZE, 0), self.key)
        if not HEADER_SIZE <= end <= size:
            raise CheckpointFileError(f"it changed since it was read ({size} bytes, valid up to {end}); try again")
        if end > HEADER_SIZE:  # the sequence number of the last valid record (the highest)
            self.seq = TRAIL.unpack(os.pread(fd, TRAIL.size, end - TRAIL.size))[0] + 1
        if size > end:
            os.ftruncate(fd, end)

    @property
    def _mac(self) -> Any:
        if self._base is None:
            self._base = record_mac(self.key, self.file_id)
        return self._base

    def meta(self, meta: dict) -> None:
        """Record ``meta`` (a JSON-able dict); the last one recorded counts, key by key."""
        self._append(b"M", json.dumps(meta, separators=(",", ":")).encode(), [])

    def chunk(self, indices: Any, items_hash: bytes, body: Any, frames: list) -> None:
        """Record a finished chunk: its item indices, their hash, the results' pickle and buffers."""
        blobs = [memoryview(body).cast("B"), *(memoryview(f).cast("B") for f in frames)]
        self._append(b"C", encode_chunk_envelope(indices, items_hash, [b.nbytes for b in blobs]), blobs)

    def _append(self, kind: bytes, envelope: bytes, blobs: list) -> None:
        head = HEAD.pack(SYNC, kind, len(envelope), len(envelope) + sum(b.nbytes for b in blobs))
        seq = self.seq.to_bytes(8, "little")
        mac = self._mac.copy()
        for part in (head, envelope, *blobs, seq):
            mac.update(part)
        _write_all(self.fd, [memoryview(head), memoryview(envelope), *blobs, memoryview(seq + mac.digest())])
        self.seq += 1

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
