"""The checkpoint file: an append-only log of records signed with this user's key.

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
order, whatever their place). ``read`` checks the header and each record's
HMAC with ``hmac.compare_digest`` before anything of it is used: nothing is
ever unpickled here, and the results it returns are from records this user's
key signed. A file signed with another key, unsigned or with a changed header
is refused whole; a record that fails its HMAC (a damaged disk block, an
edit) is skipped and counted (``Stored.damaged``): its items re-run. The
reader then finds the next record by its SYNC marker, so later records are
kept. Only the tail after the last valid record (a record torn by a kill
mid-write) is cut off by the next writer.

Paths are opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``
before a byte is read: a symbolic link, anything but a regular file (a FIFO
would block forever), a file of another user, or one group or others can
write is refused. New files are created ``0600`` with ``O_EXCL``.

A record is written with one ``writev`` on an ``O_APPEND`` descriptor. Nothing
is fsynced per record: what ``write`` returned survives the process (a kernel
restart, crash or OOM kill); the file is fsynced when a map that ran a second
or more ends. Why not SQLite: docs/design.md ("Long runs").
"""
from __future__ import annotations

import errno
import fcntl
import hmac
import json
import os
import secrets
import shlex
import stat
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

from .filesafety import unsafe
from .userkey import KeyFileError, key_id, key_path, user_key

MAGIC = b"poolmagic-ckpt2\n"
MAGIC_V1 = b"poolmagic-ckpt1\n"  # the unsigned format before: refused (trust_checkpoint converts it)
SYNC = b"\xd3PMrec\x1a\n"
_HEADER = struct.Struct("<16s8s16s32s")  # MAGIC, key id, file id, HMAC
_HEAD = struct.Struct("<8scIQ")  # SYNC, kind, envelope length, payload length
_TRAIL = struct.Struct("<Q32s")  # sequence number, HMAC
HEADER_SIZE = _HEADER.size
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


# ------------------------------------------------------------------ paths


def check_stat(st: os.stat_result) -> None:
    """Refuse what another user could have planted or could change: anything but a regular
    file of this user that group and others cannot write."""
    bad = unsafe(st, stat.S_ISREG, 0o022)
    if bad is None:
        return
    if bad.reason == "kind":
        if bad.kind == "a symbolic link":
            raise CheckpointFileError("it is a symbolic link: give the path of the file itself "
                                      "(a link in a shared directory could point anywhere)")
        raise CheckpointFileError(f"it is {bad.kind}, not a regular file")
    if bad.reason == "owner":
        raise CheckpointFileError(
            f"it belongs to {bad.owner}, not to you: a checkpoint holds pickled results, and "
            f"loading one another user wrote would run their code. If you trust it, make a copy of "
            f"your own, signed with your key: poolmagic.trust_checkpoint(PATH, dest='mine.ckpt')"
        )
    raise CheckpointFileError(
        f"group or others can write it (mode {bad.mode:04o}), so it may not hold "
        f"what you wrote; fix it with: chmod go-w PATH"
    )


def open_checked(path: str, flags: int, *, create: bool = False) -> int:
    """A descriptor on ``path``, checked with ``fstat`` (``check_stat``) before anything is read.

    ``create``: make it (``0600``, ``O_EXCL``); FileExistsError if something is there.
    """
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if create:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    try:  # refuse a device or FIFO without opening it (opening one can have effects)
        check_stat(os.lstat(path))
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            check_stat(os.lstat(path))
        raise CheckpointFileError(exc.strerror or str(exc)) from None
    try:
        check_stat(os.fstat(fd))  # the file opened: no race between the lstat and the open
    except BaseException:
        os.close(fd)
        raise
    return fd


# ------------------------------------------------------------------ signing


def signing_key() -> bytes:
    """This user's key (made on first use), or CheckpointFileError saying what is wrong with it."""
    try:
        return user_key()
    except (KeyFileError, OSError) as exc:
        raise CheckpointFileError(str(exc)) from None


def make_header(key: bytes, file_id: bytes) -> bytes:
    kid = key_id(key)
    return _HEADER.pack(MAGIC, kid, file_id, hmac.digest(key, MAGIC + kid + file_id, "sha256"))


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
    _, kid, file_id, tag = _HEADER.unpack_from(data, 0)
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


def _record_mac(key: bytes, file_id: bytes) -> Any:
    """The HMAC state every record of the file starts from (``.copy()`` it: ~1 µs, not ~4)."""
    return hmac.new(key, b"R" + file_id, "sha256")


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
    return _parse(buf, key, file_id)


def named(exc: CheckpointFileError, path: str) -> CheckpointFileError:
    """The error with the file's path in the commands it suggests."""
    text = str(exc).replace("trust_checkpoint(PATH", f"trust_checkpoint({os.fspath(path)!r}")
    return CheckpointFileError(text.replace("chmod go-w PATH", f"chmod go-w {shlex.quote(os.fspath(path))}"))


def _parse(buf: bytearray, key: bytes, file_id: bytes) -> Stored:
    data, n = memoryview(buf), len(buf)
    out, found = Stored(), []  # found: (seq, ordinal, offset, kind, envelope, blobs area)
    pos = region = HEADER_SIZE
    failed, junk, ordinal = 0, False, 0
    base = _record_mac(key, file_id)
    while pos < n:
        rec = _frame(data, pos, n)
        if rec is not None:
            kind, elen, plen, end = rec
            if end > n:  # runs past the end of the file: torn
                pos = _next_sync(buf, pos)
                continue
            ordinal += 1
            mac = base.copy()
            mac.update(data[pos : end - 32])
            if hmac.compare_digest(mac.digest(), bytes(data[end - 32 : end])):
                if pos > region:
                    out.damaged += failed + junk or 1
                seq = _TRAIL.unpack_from(data, end - _TRAIL.size)[0]
                start = pos + _HEAD.size
                found.append((seq, ordinal, pos, kind, data[start : start + elen], data[start + elen : start + plen]))
                pos = region = out.end = end
                failed, junk = 0, False
                continue
            failed += 1
        elif pos == region:
            junk = True
        pos = _next_sync(buf, pos)
    if n > region:  # the tail: complete records that failed count; a torn one does not
        out.damaged += failed + (junk and n - region >= _HEAD.size + _TRAIL.size)
    out.torn = n - out.end
    found.sort(key=lambda r: r[0])
    last = None
    for seq, ordinal, offset, kind, envelope, blobs in found:
        if seq == last:  # a copy of a record: only an edit makes one
            out.damaged += 1
            continue
        last = seq
        _decode(out, kind, envelope, blobs, f"record {ordinal} (at byte {offset})")
    return out


def _frame(data: memoryview, pos: int, n: int) -> tuple[bytes, int, int, int] | None:
    """(kind, envelope length, payload length, end) of a plausible record at ``pos``, else None."""
    if n - pos < _HEAD.size or data[pos : pos + len(SYNC)] != SYNC:
        return None
    _, kind, elen, plen = _HEAD.unpack_from(data, pos)
    if kind not in KINDS or elen > plen:
        return None
    return kind, elen, plen, pos + _HEAD.size + plen + _TRAIL.size


def _next_sync(buf: bytearray, pos: int) -> int:
    at = buf.find(SYNC, pos + 1)
    return len(buf) if at < 0 else at


def _decode(out: Stored, kind: bytes, envelope: memoryview, blobs: memoryview, where: str) -> None:
    try:
        if kind == b"M":
            meta = json.loads(bytes(envelope))
            if type(meta) is not dict:
                raise ValueError("the meta is not a JSON object")
            out.meta.update(meta)
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
            self.seq = _TRAIL.unpack(os.pread(fd, _TRAIL.size, end - _TRAIL.size))[0] + 1
        if size > end:
            os.ftruncate(fd, end)

    @property
    def _mac(self) -> Any:
        if self._base is None:
            self._base = _record_mac(self.key, self.file_id)
        return self._base

    def meta(self, meta: dict) -> None:
        """Record ``meta`` (a JSON-able dict); the last one recorded counts, key by key."""
        self._append(b"M", json.dumps(meta, separators=(",", ":")).encode(), [])

    def chunk(self, indices: Any, items_hash: bytes, body: Any, frames: list) -> None:
        """Record a finished chunk: its item indices, their hash, the results' pickle and buffers."""
        blobs = [memoryview(body).cast("B"), *(memoryview(f).cast("B") for f in frames)]
        self._append(b"C", encode_chunk_envelope(indices, items_hash, [b.nbytes for b in blobs]), blobs)

    def _append(self, kind: bytes, envelope: bytes, blobs: list) -> None:
        head = _HEAD.pack(SYNC, kind, len(envelope), len(envelope) + sum(b.nbytes for b in blobs))
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
