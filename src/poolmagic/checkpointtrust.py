"""Trust a checkpoint deliberately: re-sign a file with this user's key.

``read`` refuses a checkpoint this user's key did not sign (another user's,
one from a machine without this key, an unsigned file of the format before,
an edited one), because loading its results runs whatever code they hold.
``trust_checkpoint(path)`` is the explicit way to say "I trust this file": it
copies every record whose framing is intact into a new file signed with this
user's key. It unpickles nothing: the envelopes of the old format are pickles
of plain data (tuples, lists, ints, bytes, str, a ``range``), read here by
walking their opcodes (``pickletools.genops``); any other opcode is refused.
"""
from __future__ import annotations

import fcntl
import os
import pickletools
import secrets
import stat
import struct
import zlib
from typing import Any

from . import checkpointformat as fmt
from .checkpointfile import Writer, parse
from .checkpointformat import CheckpointFileError


def trust_checkpoint(path: str | os.PathLike, dest: str | os.PathLike | None = None) -> str:
    """Re-sign the checkpoint ``path`` with your key so that poolmagic loads it; the path written.

    Only for a file you trust: loading its results runs the code they hold. On a file of
    your own key, it keeps only the records that verify (a way to drop damaged ones).
    ``dest``: where to write the signed copy (default: replace ``path``; a file
    of another user in a shared directory cannot be replaced, so give ``dest``).
    Converts a file of the older, unsigned format too. Nothing is unpickled.
    """
    src = os.fspath(path)
    target = os.fspath(dest) if dest is not None else src
    data = _read_any(src)
    head = bytes(data[: len(fmt.MAGIC)])
    if head == fmt.MAGIC_V1:
        records = list(_records_v1(data))
    elif head == fmt.MAGIC:
        records = _own_records(data) or list(_records_v2(data))
    else:
        raise CheckpointFileError(f"cannot trust {src!r}: it is not a poolmagic checkpoint file")
    where = os.path.dirname(os.path.abspath(target))
    tmp = os.path.join(where, f".poolmagic-trust-{secrets.token_hex(8)}")
    try:
        w = Writer(tmp, 0, new=True)  # 0600, O_EXCL | O_NOFOLLOW
        try:
            for kind, value in records:
                if kind == b"M":
                    w.meta(value)
                else:
                    w.chunk(*value)
        finally:
            w.close(sync=True)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise CheckpointFileError(
                f"cannot replace {target!r} ({exc.strerror}): give another path, "
                f"trust_checkpoint({src!r}, dest='mine.ckpt')"
            ) from None
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return target


def _read_any(path: str) -> bytearray:
    """The bytes of a regular file, whoever owns it (trusting it is the caller's decision)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointFileError(f"cannot trust {path!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointFileError(f"cannot trust {path!r}: it is not a regular file")
        try:  # a map writing it would go on appending to the file this one replaces
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointFileError(f"cannot trust {path!r} now: a map is writing it") from None
        out = bytearray()
        while chunk := os.read(fd, 1 << 24):
            out += chunk
        return out
    finally:
        os.close(fd)


def _own_records(data: bytearray) -> list | None:
    """A file this user's key signed: only its verified records (a damaged one would be
    re-signed as it is, and could load as a silently wrong result); None for another key's."""
    key = fmt.signing_key()
    try:
        file_id = fmt.check_header(data, key)
    except CheckpointFileError:
        return None
    stored = parse(data, key, file_id)
    records, meta = [], None
    for chunk, version in zip(stored.chunks, stored.versions):  # each chunk after the meta it was written under
        if version is not meta and version:
            records.append((b"M", version))
        meta = version
        records.append((b"C", chunk))
    return records + ([(b"M", stored.meta)] if stored.meta and stored.meta is not meta else [])


def _records_v2(data: bytearray) -> Any:
    """(kind, value) of every record whose frame is intact, in the file's order (MACs ignored)."""
    view, n = memoryview(data), len(data)
    pos = fmt.HEADER_SIZE
    while pos < n:
        rec = fmt.frame(view, pos, n)
        if rec is not None and rec[3] <= n:
            kind, elen, plen, end = rec
            start = pos + fmt.HEAD.size
            out = fmt.Stored()
            try:
                fmt.decode_record(out, kind, view[start : start + elen], view[start + elen : start + plen], "")
            except CheckpointFileError:
                pos = fmt.next_sync(data, pos)
                continue
            yield (b"M", out.meta) if kind == b"M" else (b"C", out.chunks[0])
            pos = end
        else:
            pos = fmt.next_sync(data, pos)


_V1_HEAD = struct.Struct("<cQI")


def _records_v1(data: bytearray) -> Any:
    view, pos = memoryview(data), len(fmt.MAGIC_V1)
    number = 0
    while pos + _V1_HEAD.size <= len(data):
        kind, size, crc = _V1_HEAD.unpack_from(view, pos)
        start = pos + _V1_HEAD.size
        payload = view[start : start + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            return  # a torn or damaged tail: the old format cannot resync past it
        number += 1
        try:
            n = struct.unpack_from("<I", payload)[0]
            envelope = plain_pickle(bytes(payload[4 : 4 + n]))
            if kind == b"M":
                if type(envelope) is not dict:
                    raise ValueError("a meta record that is not a dict")
                yield b"M", envelope
            elif kind == b"C":
                indices, digest, sizes = envelope
                blobs, at = [], 4 + n
                for s in sizes:
                    blobs.append(bytes(payload[at : at + s]))
                    at += s
                yield b"C", (indices, bytes(digest), blobs[0], blobs[1:])
        except (ValueError, TypeError, struct.error, IndexError) as exc:
            raise CheckpointFileError(f"cannot trust it: record {number} (at byte {pos}): {exc}") from None
        pos = start + size


_PUSH = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
         "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BINFLOAT"}
_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def plain_pickle(data: bytes) -> Any:
    """The value of a pickle of plain data (numbers, str, bytes, tuples, lists, dicts, a range),
    computed from its opcodes without unpickling; ValueError for anything else."""
    try:
        return _plain(data)
    except (AttributeError, KeyError, IndexError, TypeError) as exc:  # (APPENDS onto a str, a missing memo...)
        raise ValueError(f"its opcodes do not build plain data ({type(exc).__name__}: {exc})") from None


def _plain(data: bytes) -> Any:
    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            break
        if name in _PUSH:
            stack.append(arg)
        elif name in _CONST:
            stack.append(_CONST[name])
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE"):
            stack.append({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple}[name]())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif name in ("TUPLE", "APPENDS", "SETITEMS"):
            at = marks.pop()
            items = stack[at:]
            del stack[at:]
            if name == "TUPLE":
                stack.append(tuple(items))
            elif name == "APPENDS":
                stack[-1].extend(items)
            else:
                stack[-1].update(zip(items[::2], items[1::2]))
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "SETITEM":
            value, k = stack.pop(), stack.pop()
            stack[-1][k] = value
        elif name in ("STACK_GLOBAL", "GLOBAL"):
            if name == "GLOBAL":
                ref = tuple(arg.split(" ", 1))
            else:
                qualname, module = stack.pop(), stack.pop()
                ref = (module, qualname)
            if ref not in (("builtins", "range"), ("__builtin__", "xrange")):
                raise ValueError(f"it refers to {'.'.join(map(str, ref))}, not plain data")
            stack.append(range)
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if fn is not range or not all(type(a) is int for a in args):
                raise ValueError("it calls something other than range()")
            stack.append(range(*args))
        else:
            raise ValueError(f"it holds the opcode {name}, not plain data")
    if len(stack) != 1:
        raise ValueError("it is not one value")
    return stack[0]
