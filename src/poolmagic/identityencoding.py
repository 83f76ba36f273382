"""The canonical encoding of a value, fed to a SHA-256: the work behind identity.py.

Builtins by type tag and value; tuple/list/dict in order; set/frozenset by
their elements' digests, sorted; a ``range`` as the ints it yields;
namedtuples, dataclasses and plain objects by qualified class name and fields
(``__dict__``, ``__slots__``, ``__getstate__``); anything else by what
``__reduce_ex__`` says it is made of. How each type is encoded is decided once
per type (``_choose``); numpy and pandas values go to identitynumpy.py, which
is imported only when such a value is met.
"""
from __future__ import annotations

import hashlib
import struct
import sys
import types
from typing import Any, Iterable

from .errors import BadInputError

_BIG = 1 << 16  # buffers at least this big go to the hash as they are, not via the small buffer
LEN = struct.Struct("<Q")  #: the length prefix of every variable-length part
_F = struct.Struct("<d")
_C = struct.Struct("<dd")


class IdentityError(BadInputError):
    """A value has no stable identity (its message says which part and why)."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(f"{'its ' + where if where else 'it'} {reason}")
        self.reason, self.where = reason, where

    def for_item(self, index: int, item: Any, purpose: str) -> "IdentityError":
        """The same error, worded for item ``index`` of a map (``purpose``: "a checkpoint")."""
        exc = IdentityError(self.reason, self.where)
        exc.args = (f"cannot identify item {index} for {purpose} (type {qualified_name(type(item))}): {self}",)
        exc.index = index  # type: ignore[attr-defined]
        return exc


def qualified_name(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', getattr(cls, '__name__', '?'))}"


class Encoder:
    """Feeds one value's canonical encoding to a SHA-256, small parts batched in a buffer."""

    __slots__ = ("h", "buf", "stack", "path")

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.buf = bytearray()
        self.stack: set[int] = set()  # ids of the containers being encoded (a value that contains itself)
        self.path: list[str] = []

    def digest(self) -> bytes:
        if self.buf:
            self.h.update(self.buf)
        return self.h.digest()[:16]

    def big(self, data: Any) -> None:
        """Bytes (or a 1-D uint8 array), length first; a big one is hashed in place, not copied."""
        n = len(data)
        self.buf += LEN.pack(n)
        if n < _BIG:
            self.buf += memoryview(data)
        else:
            self.h.update(self.buf)
            self.buf.clear()
            self.h.update(data)

    def text(self, s: str) -> None:
        self.big(s.encode("utf-8", "surrogatepass"))

    def error(self, reason: str, value: Any) -> IdentityError:
        """``reason`` follows "it" or "its <path>": "is ..." or "cannot ..."."""
        return IdentityError(reason, "".join(self.path))

    # ---------------------------------------------------------------- the walk
    def enc(self, v: Any) -> None:
        t = type(v)
        f = _EXACT.get(t)
        if f is None:
            f = _handler(t)
        f(self, v)

    def child(self, label: str, v: Any) -> None:
        self.path.append(label)
        self.enc(v)
        self.path.pop()

    def enter(self, v: Any) -> None:
        if id(v) in self.stack:
            raise self.error("contains itself", v)
        if len(self.stack) > 200:
            raise self.error("is nested more than 200 levels deep", v)
        self.stack.add(id(v))

    def seq(self, tag: bytes, v: Any) -> None:
        self.enter(v)
        items = v if type(v) in (list, tuple) else list(v)
        self.buf += tag + LEN.pack(len(items))
        for k, x in enumerate(items):
            f = SCALARS.get(type(x))
            if f is not None:
                self.buf += f(x)  # a scalar: no path to keep
            else:
                self.child(f"[{k}]", x)
        self.stack.discard(id(v))

    def mapping(self, tag: bytes, pairs: Any, v: Any) -> None:
        self.enter(v)
        pairs = list(pairs)
        self.buf += tag + LEN.pack(len(pairs))
        for k, x in pairs:
            self.child("[key]", k)
            self.child(f"[{k!r}]" if type(k) in (str, int) else "[…]", x)
        self.stack.discard(id(v))

    def unordered(self, tag: bytes, v: Any) -> None:
        self.enter(v)
        subs = sorted(_sub_digest(x, self) for x in v)
        self.buf += tag + LEN.pack(len(subs)) + b"".join(subs)
        self.stack.discard(id(v))

    def name(self, tag: bytes, cls: Any) -> None:
        self.buf += tag
        name = _NAMES.get(cls) if isinstance(cls, type) else None
        if name is None:
            name = qualified_name(cls).encode("utf-8", "surrogatepass")
            name = LEN.pack(len(name)) + name
            if isinstance(cls, type) and len(_NAMES) < 4096:
                _NAMES[cls] = name
        self.buf += name

    def fields(self, v: Any, names: Iterable[str], getter: Any) -> None:
        names = list(names)
        self.buf += LEN.pack(len(names))
        for n in names:
            self.buf += _NAMES.get(n) or _name_bytes(n)
            x = getter(n)
            t = type(x)
            f = SCALARS.get(t)
            if f is not None:
                self.buf += f(x)
            else:
                self.child(f".{n}", x)


def _sub_digest(x: Any, parent: Encoder) -> bytes:
    e = Encoder()
    e.stack, e.path = parent.stack, parent.path
    e.enc(x)
    return e.digest()


# -------------------------------------------------------------------- builtins


def _int_bytes(v: int) -> bytes:
    data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"i" + LEN.pack(len(data)) + data


def _str_bytes(v: str) -> bytes:
    data = v.encode("utf-8", "surrogatepass")
    return b"s" + LEN.pack(len(data)) + data


# a scalar's whole encoding, as bytes (the same bytes the encoder would feed the hash)
SCALARS: dict[type, Any] = {
    type(None): lambda v: b"N",
    type(...): lambda v: b"E",
    bool: lambda v: b"T" if v else b"F",
    int: _int_bytes,
    float: lambda v: b"f" + _F.pack(v),
    complex: lambda v: b"c" + _C.pack(v.real, v.imag),
    str: _str_bytes,
    bytes: lambda v: b"b" + LEN.pack(len(v)) + v,
    bytearray: lambda v: b"y" + LEN.pack(len(v)) + v,
}


def _range(e: Encoder, v: range) -> None:  # as the list of ints it yields
    e.buf += b"[" + LEN.pack(len(v))
    for x in v:
        e.buf += _int_bytes(x)


def _scalar(to_bytes: Any) -> Any:
    return lambda e, v: e.buf.extend(to_bytes(v))


_EXACT: dict[type, Any] = {
    **{t: _scalar(f) for t, f in SCALARS.items()},
    tuple: lambda e, v: e.seq(b"(", v),
    list: lambda e, v: e.seq(b"[", v),
    range: _range,
    dict: lambda e, v: e.mapping(b"{", v.items(), v),
    set: lambda e, v: e.unordered(b"S", v),
    frozenset: lambda e, v: e.unordered(b"Z", v),
}
_NAMES: dict[Any, bytes] = {}  # a class's qualified name or a field's name, encoded


def _name_bytes(n: str) -> bytes:
    data = n.encode("utf-8", "surrogatepass")
    data = LEN.pack(len(data)) + data
    if len(_NAMES) < 4096:
        _NAMES[n] = data
    return data
_BASES = (int, float, complex, str, bytes, bytearray, tuple, list, dict, set, frozenset)
_HANDLERS: dict[type, Any] = {}  # type -> how to encode it, decided once per type
_HEAPTYPE = 1 << 9


def _handler(t: type) -> Any:
    f = _HANDLERS.get(t)
    if f is None:
        f = _choose(t)
        if len(_HANDLERS) > 4096:
            _HANDLERS.clear()
        _HANDLERS[t] = f
    return f


def _choose(t: type) -> Any:
    mod = t.__module__ or ""
    if mod.startswith("numpy") or mod.startswith("pandas"):
        from . import identitynumpy as arrays  # once per type: the choice is kept in _HANDLERS

        np = sys.modules.get("numpy")
        if np is not None and issubclass(t, np.generic):
            return arrays.np_scalar
        if np is not None and t is np.ndarray:
            return arrays.np_array
        ma = sys.modules.get("numpy.ma")
        if np is not None and issubclass(t, np.ndarray) and not (ma is not None and issubclass(t, ma.MaskedArray)):
            return arrays.np_subclass  # a memmap, a matrix: its class and its values, not a copy via pickling
        pd = sys.modules.get("pandas")
        if pd is not None and issubclass(t, (pd.DataFrame, pd.Series, pd.Index)):
            return arrays.pandas
    if issubclass(t, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)):
        return _named
    if issubclass(t, tuple) and hasattr(t, "_fields"):
        return _namedtuple
    if not t.__flags__ & _HEAPTYPE:
        return _reduced  # a type defined in C: only its own pickling support says what it holds
    if t.__reduce_ex__ is not object.__reduce_ex__ or t.__reduce__ is not object.__reduce__:
        return _reduced
    for base in t.__mro__:
        if base in _BASES:
            return _builtin_subclass(base)
    return _object


def _named(e: Encoder, v: Any) -> None:
    """A class, function or module by its qualified name (a lambda or a local function has none)."""
    if isinstance(v, types.ModuleType):
        e.buf += b"M"
        e.text(v.__name__)
        return
    if isinstance(v, type):
        e.name(b"G", v)
        return
    qual = getattr(v, "__qualname__", "")
    owner = getattr(v, "__self__", None)
    if isinstance(v, types.BuiltinFunctionType) and owner is not None and not isinstance(owner, types.ModuleType):
        if not isinstance(owner, type):
            _reduced(e, v)  # a builtin method of an object: the object and the name
            return
        e.buf += b"G"
        e.text(f"{qualified_name(owner)}.{v.__name__}")  # e.g. ZoneInfo._unpickle
        return
    if "<lambda>" in qual or "<locals>" in qual or not getattr(v, "__module__", None):
        raise e.error(f"is {qual or v!r}, a function without a name to identify it by", v)
    e.name(b"G", v)


def _namedtuple(e: Encoder, v: Any) -> None:
    e.name(b"n", type(v))
    e.enter(v)
    e.fields(v, v._fields, lambda n: getattr(v, n))
    e.stack.discard(id(v))


def _builtin_subclass(base: type) -> Any:
    encode = _EXACT[base]

    def subclass(e: Encoder, v: Any) -> None:
        e.name(b"X", type(v))
        encode(e, v)
        _state(e, v)
    return subclass


def _object(e: Encoder, v: Any) -> None:
    e.name(b"O", type(v))
    e.enter(v)
    _state(e, v)
    e.stack.discard(id(v))


def _state(e: Encoder, v: Any) -> None:
    """An instance's fields as pickling sees them (``__getstate__``, ``__dict__``, ``__slots__``),
    by name: the order attributes were set in does not matter. Refuses what cannot be pickled
    (a lock, a file: a C type that keeps its state out of sight)."""
    try:
        rv = object.__reduce_ex__(v, 4)
    except Exception as exc:
        raise e.error(f"is a {qualified_name(type(v))}, which has no value to identify it by ({exc})", v) from None
    args, state = rv[1][1:] if len(rv) > 1 and rv[1] else (), rv[2] if len(rv) > 2 else None
    if args:
        e.child(".__getnewargs__()", tuple(args))
    if isinstance(state, tuple) and len(state) == 2 and all(p is None or type(p) is dict for p in state):
        state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, slots)
    if state is None or type(state) is dict:
        fields = state or {}
        e.buf += b"d"
        e.fields(v, sorted(fields, key=str), fields.__getitem__)
    else:
        e.buf += b"g"
        e.child(".__getstate__()", state)


def _reduced(e: Encoder, v: Any) -> None:
    """What ``__reduce_ex__`` says the value is made of: a named callable, its arguments, its state."""
    try:
        rv = v.__reduce_ex__(4)
    except Exception as exc:
        raise e.error(f"is a {qualified_name(type(v))}, which has no value to identify it by ({exc})", v) from None
    if isinstance(rv, str):
        e.buf += b"G"
        e.text(f"{getattr(v, '__module__', None) or type(v).__module__}.{rv}")
        return
    e.enter(v)
    rv = tuple(rv) + (None,) * (5 - len(rv))
    func, args, state, listitems, dictitems = rv[:5]
    e.buf += b"R"
    if func is getattr(sys.modules.get("copyreg"), "__newobj__", None) and args:
        e.name(b"G", args[0])  # a plain ``cls.__new__(cls, *args)``
        e.child("", tuple(args[1:]))
    else:
        _named(e, func)
        e.child("", tuple(args))
    e.child("", state)
    e.child("", None if listitems is None else list(listitems))
    e.child("", None if dictitems is None else list(dictitems))
    e.stack.discard(id(v))
