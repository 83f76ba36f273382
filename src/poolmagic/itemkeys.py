"""Items' keys as checkpoints store them and ``--resume`` compares them (keys: identity.py).

A chunk record stores its items' identity as ``R`` + (start, length, step) for
a range of int64s, else ``K`` + 8 bytes per item; both sides are expanded to
keys before they are compared, so a range written and a list read back are the
same items. A refusal names the items that changed.
"""
from __future__ import annotations

import reprlib
import struct
from array import array
from typing import Any

from . import identity

_INT64 = (-(1 << 63), 1 << 63)
_RANGE = struct.Struct("<qqq")


def items_hash(items: Any, indices: Any = None) -> bytes:
    """The stored identity of a chunk's items: ``R`` + (start, length, step) for a range of
    int64s, else ``K`` + each item's 8-byte key (identity.py), equal in any process."""
    if type(items) is range:
        packed = _range_key(items)
        if packed is not None:
            return packed
    return b"K" + identity.keys(items, indices, "a checkpoint")


def _range_key(r: range) -> bytes | None:
    n = len(r)
    if not n or not (_INT64[0] <= min(r[0], r[-1]) and max(r[0], r[-1]) < _INT64[1]):
        return None
    return b"R" + _RANGE.pack(r[0], n, r.step if n > 1 else 1)


def expand(stored: bytes) -> bytes:
    """A stored identity as 8-byte keys, one per item."""
    if stored[:1] == b"R":
        start, n, step = _RANGE.unpack_from(stored, 1)
        return array("q", range(start, start + n * step, step)).tobytes()
    return bytes(stored[1:])


def legacy(stored: Any) -> bool:
    """A chunk hash of poolmagic before stable identities (a SHA-1 of the items' pickle)."""
    if not isinstance(stored, (bytes, bytearray)):
        return True
    tag = stored[:1]
    return not ((tag == b"R" and len(stored) == 1 + _RANGE.size) or (tag == b"K" and (len(stored) - 1) % identity.KEY == 0))


def differ_message(which: list[int], items: Any, limit: int = 5) -> str:
    """"item 7 differs (now -1)", "items 3 and 7 differ (now ...)", "12 items differ, the first ..."."""
    now = ", ".join(reprlib.repr(items[i]) for i in which[:limit])
    if len(which) == 1:
        return f"item {which[0]} differs (it is now {now})"
    if len(which) <= limit:
        names = ", ".join(map(str, which[:-1])) + f" and {which[-1]}"
        return f"items {names} differ (now {now})"
    return f"{len(which):,} items differ, the first {', '.join(map(str, which[:limit]))} (now {now}, …)"


def items_words(where: list[int]) -> str:
    """"item 3", "items 0–5", "7 items (0, 2, 4, 6, 8, …)"."""
    if len(where) == 1:
        return f"item {where[0]}"
    if where == list(range(where[0], where[-1] + 1)):
        return f"items {where[0]}–{where[-1]}"
    if len(where) <= 5:
        return f"items {', '.join(map(str, where[:-1]))} and {where[-1]}"
    return f"{len(where):,} items ({', '.join(map(str, where[:5]))}, …)"


def keys_at(seq: Any, positions: list[int], purpose: str, index: Any = None) -> bytearray:
    """Keys of ``seq`` at ``positions`` (zeros elsewhere), as one buffer of 8 bytes per item;
    ``index`` maps positions in ``seq`` to the map's (a resumed run maps a subset)."""
    k = identity.KEY
    n = (max(index) + 1 if index else 0) if index is not None else len(seq)
    out = bytearray(n * k)
    if index is None and len(positions) * 2 >= len(seq):  # most of it: the whole, by the fast paths
        out[:] = identity.keys(seq, None, purpose)
        return out
    names = positions if index is None else [index[p] for p in positions]
    keys = identity.keys([seq[p] for p in positions], names, purpose)
    for j, i in enumerate(names):
        out[i * k : (i + 1) * k] = keys[j * k : (j + 1) * k]
    return out

