"""A stable identity for items: a hash of a canonical encoding of the value.

Checkpoints and ``--resume`` must tell whether the items behind an ITERABLE are
the ones an earlier run (maybe in another kernel) mapped. A pickle cannot say:
cloudpickle names notebook classes by per-process ids, sets of str iterate in
an order that depends on ``PYTHONHASHSEED``, and ``range(20)`` pickles unlike
``list(range(20))``. So each value is encoded canonically, by type and value:

* builtins by type and value; tuple/list/dict in order; set/frozenset sorted
  by their elements' digests; a ``range`` as the ints it yields;
* numpy arrays and scalars by dtype, shape and C-order bytes (object arrays
  element by element); pandas objects by their values, dtypes, index and names;
* namedtuples (``df.itertuples()`` rows too), dataclasses and plain objects by
  qualified class name and fields (``__dict__``, ``__slots__``, ``__getstate__``);
  anything else by what ``__reduce_ex__`` says it is made of.

What cannot be identified (a lambda, a file, a lock, a generator) raises
``IdentityError`` instead of falling back to an unstable hash. numpy and pandas
are never imported here: a value can only be one if its module is loaded.

``digest(value)`` is 16 bytes of SHA-256; ``keys(items)`` gives 8 bytes per item
(an int within int64 is its own key, so a chunk of ints costs no hashing). This
module is that public face; the encoding is identityencoding.py's (numpy and
pandas: identitynumpy.py).
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Any

from .identityencoding import SCALARS, Encoder, IdentityError

__all__ = ["KEY", "IdentityError", "differing", "digest", "item_key", "keys"]

KEY = 8  #: bytes per item in ``keys``
_INT64 = (-(1 << 63), 1 << 63)


def digest(value: Any) -> bytes:
    """16 bytes that are equal for equal values in any process (raises IdentityError)."""
    f = SCALARS.get(type(value))
    if f is not None:
        return hashlib.sha256(f(value)).digest()[:16]
    e = Encoder()
    try:
        e.enc(value)
    except RecursionError:
        raise e.error("is nested too deeply", value) from None
    return e.digest()


def item_key(value: Any) -> bytes:
    """An item's ``KEY`` bytes: an int within int64 is its own key, anything else its digest's start."""
    if type(value) is int and _INT64[0] <= value < _INT64[1]:
        return value.to_bytes(KEY, "little", signed=True)
    return digest(value)[:KEY]


def keys(items: Any, indices: Any = None, purpose: str = "a checkpoint") -> bytes:
    """``KEY`` bytes per item, in order. ``indices`` (the items' positions in the map) name
    an item that cannot be identified: "cannot identify item N for ``purpose`` (type X): ..."."""
    if type(items) is range and (not items or _INT64[0] <= min(items[0], items[-1]) and max(items[0], items[-1]) < _INT64[1]):
        return array("q", items).tobytes()
    if type(items) is not list:
        items = list(items)
    types = set(map(type, items))
    if types == {int}:
        try:
            return array("q", items).tobytes()
        except OverflowError:
            pass
    out = bytearray()
    k = 0
    sha, scalars, (lo, hi) = hashlib.sha256, SCALARS, _INT64
    try:
        for k, x in enumerate(items):  # item_key, inlined: this loop is the cost of a chunk of scalars
            t = type(x)
            if t is int and lo <= x < hi:
                out += x.to_bytes(KEY, "little", signed=True)
            else:
                f = scalars.get(t)
                out += sha(f(x)).digest()[:KEY] if f is not None else digest(x)[:KEY]
    except IdentityError as exc:
        i = indices[k] if indices is not None else k
        raise exc.for_item(i, items[k], purpose) from None
    return bytes(out)


def differing(a: bytes, b: bytes) -> list[int]:
    """Positions whose keys differ between two ``keys`` results of equal length."""
    if a == b:
        return []
    return [k for k in range(min(len(a), len(b)) // KEY) if a[k * KEY:(k + 1) * KEY] != b[k * KEY:(k + 1) * KEY]]
