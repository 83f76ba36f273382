"""What a map was given, as keys to compare later: the function's code and each ``--kw`` value.

A checkpoint, ``--resume`` and ``%pooldebug`` compare these with a later map
(or the values now) to say what changed since: the function the user wrote, or
the value of a keyword constant. The function's key leaves out where the code
was compiled (a notebook cell's file name and line numbers change at every run
of the cell) so that running the same cell again is not "a changed function".
"""
from __future__ import annotations

import functools
import hashlib
import pickle
import types
from typing import Any, Callable

import cloudpickle

from .captures import global_names
from .serialize import buffer_digest, dumps, module_method_home


def code_key(func: Callable, stable: bool = True, _seen: set | None = None,
             digests: dict | None = None) -> str | None:
    """A key equal for two functions with the same code, defaults, closure and the same globals
    they read (a helper by its own code key, a value by its key as a --kw value's); None: not a
    plain function or a partial of one. Only checkpoint maps, and maps that end with items missing
    (for a later --resume), compute it: a global's value is pickled for it. ``stable``: the same in
    every kernel (a checkpoint file's), else only within this one, and cheaper (``value_key``);
    ``digests``: big buffers hashed already (the map's payload's), not hashed again."""
    if isinstance(func, functools.partial):  # a partial the user made: its function and its arguments
        inner = code_key(func.func, stable, _seen, digests)
        try:
            return None if inner is None else f"{inner}:{value_key((func.args, func.keywords), stable, None, digests)}"
        except Exception:
            return None
    code = getattr(func, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    h = hashlib.blake2b(digest_size=12)
    _feed(h, code)
    seen = {id(func)} if _seen is None else _seen
    try:  # each as a global is: a method's __class__ cell by the class's content, not by a pickle of it
        # (a class sent whole pickles with an id drawn in each kernel: a checkpoint's key would change)
        parts = [*(func.__defaults__ or ()), *sorted((func.__kwdefaults__ or {}).items()),
                 *(c.cell_contents for c in func.__closure__ or ())]
    except ValueError:  # an empty cell: the map's own pickling says so
        return None
    for part in parts:
        h.update(f"\0{_global_key(part, stable, seen, digests)}".encode())
    g = getattr(func, "__globals__", {})
    for name in global_names(func):
        if name in g:
            h.update(f"\0{name}={_global_key(g[name], stable, seen, digests)}".encode())
    return h.hexdigest()


def _global_key(value: Any, stable: bool, seen: set, digests: dict | None) -> str:
    """A global the function reads, as a key: helpers by code, modules and classes by name, values by content."""
    if isinstance(value, types.FunctionType):
        if id(value) in seen:  # (recursion, or a helper already keyed)
            return "f:seen"
        seen.add(id(value))
        return f"f:{code_key(value, stable, seen, digests)}"
    if isinstance(value, types.ModuleType):
        return f"m:{value.__name__}"
    if isinstance(value, types.MethodType) and module_method_home(value) is not None:
        return f"t:{value.__module__}.{value.__name__}"  # random.randint: by name, as the workers get it
    if isinstance(value, type) and _travels_by_value(value):
        if id(value) in seen:
            return "c:seen"
        seen.add(id(value))
        return f"c:{value.__qualname__}:{class_key(value, stable, seen, digests)}"
    if isinstance(value, type) or (callable(value) and not hasattr(value, "__dict__")):
        return f"t:{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    try:
        return "v:" + value_key(value, stable, None, digests)
    except Exception:  # it does not pickle: the map's own pickling says so
        return f"?:{type(value).__qualname__}"


def _travels_by_value(cls: type) -> bool:
    """cloudpickle sends ``cls`` whole (a notebook class), not by its name."""
    by_reference = getattr(getattr(cloudpickle, "cloudpickle", None), "_should_pickle_by_reference", None)
    try:
        return not by_reference(cls) if by_reference is not None else cls.__module__ == "__main__"
    except Exception:
        return cls.__module__ == "__main__"


# a class's attributes that say nothing of what it does, or that pickling and abc add later
_NOT_BEHAVIOUR = frozenset({"__dict__", "__weakref__", "__module__", "__doc__", "__annotations__", "__slotnames__",
                            "_abc_impl"})


def class_key(cls: type, stable: bool = True, _seen: set | None = None, digests: dict | None = None) -> str:
    """A key of what a class sent whole does: its methods' code and its class attributes, and its
    bases sent whole. Redefined with another method, a notebook class is another key, though its name
    is the same (keyed by name, a checkpoint or --resume kept the earlier version's results)."""
    seen = {id(cls)} if _seen is None else _seen
    h = hashlib.blake2b(digest_size=12)
    for name, attr in sorted(vars(cls).items()):
        if name in _NOT_BEHAVIOUR:
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if isinstance(attr, property):
            keys = [_global_key(f, stable, seen, digests) for f in (attr.fget, attr.fset, attr.fdel) if f]
            h.update(f"\0{name}=p:{keys}".encode())
            continue
        h.update(f"\0{name}={_global_key(attr, stable, seen, digests)}".encode())
    for base in cls.__bases__:
        if base is not object:
            h.update(f"\0base={_global_key(base, stable, seen, digests)}".encode())
    return h.hexdigest()


_TYPES_SAMPLED = 4096


def item_types(items: Any) -> set:
    """The classes of a sequence's items: of every item up to 4,096 items, else of 4,096 spread
    over it (a full scan cost ~3 ms per 100,000 items; notebook classes come in runs)."""
    n = len(items)
    if n <= _TYPES_SAMPLED:
        return set(map(type, items))
    try:
        return set(map(type, items[:: n // _TYPES_SAMPLED]))
    except TypeError:  # not sliceable
        import itertools

        return set(map(type, itertools.islice(items, _TYPES_SAMPLED)))


def item_class_keys(classes: Any, stable: bool = False) -> dict[str, str] | None:
    """``class_key`` of each of these classes that travels whole (the items' notebook classes), by name."""
    out = {}
    for cls in classes:
        if cls.__module__ != "builtins" and _travels_by_value(cls):
            try:
                out[cls.__qualname__] = class_key(cls, stable)
            except Exception:  # an attribute that cannot be keyed: not compared
                pass
    return out or None


def _feed(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_name, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                   code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed(h, const)
        else:
            h.update(repr((type(const).__name__, const)).encode())


KEPT_BYTES = 1 << 20  # a --kw value pickled to at most this is kept, for %pooldebug to re-run with it


def kw_keys(kwargs: dict | None, like: dict[str, str] | None = None) -> dict[str, str] | None:
    """Each ``--kw`` value's key, made as the keys ``like`` (recorded by ``kw_record``) were made."""
    stable = not like or not all(k.startswith(_HERE) for k in like.values())
    return kw_record(kwargs, stable)[0]


def kw_record(kwargs: dict | None, stable: bool = True, digests: dict | None = None,
              pickled: dict[str, tuple] | None = None) -> tuple[dict[str, str] | None, dict[str, tuple]]:
    """``(keys, kept)``: each ``--kw`` value's key (``value_key``), and the pickles of the values of
    at most KEPT_BYTES (``name: (data, buffers)``, copied), which ``kw_values`` unpickles.
    ``digests``: big buffers' digests, used and added to (the map's payload hashes them too);
    ``pickled``: the values' pickles made already (``kw_pickles``)."""
    if not kwargs:
        return None, {}
    pickled = kw_pickles(kwargs) if pickled is None else pickled
    out, kept = {}, {}
    for name, value in kwargs.items():
        if name not in pickled:  # it does not pickle: the map itself refuses it, naming it
            continue
        data, views = pickled[name][:2]
        out[name] = value_key(value, stable, (data, views), digests)
        if len(data) + sum(v.nbytes for v in views) <= KEPT_BYTES:
            kept[name] = (data, [bytes(v) for v in views])
    return out, kept


def kw_pickles(kwargs: dict) -> dict[str, tuple[bytes, list[memoryview], list[pickle.PickleBuffer]]]:
    """Each ``--kw`` value pickled: ``(data, views, buffers)``, its big buffers left where they are
    (their PickleBuffers, and a view of each); a value that does not pickle is left out. The map's
    payload puts these in as they are (serialize.py's ``prepickled``)."""
    out = {}
    for name, value in kwargs.items():
        try:
            out[name] = _pickled(value, keep_buffers=True)
        except Exception:
            continue
    return out


def _pickled(value: Any, keep_buffers: bool = False) -> tuple:
    """``value``'s pickle, as the payload pickles it, and its big buffers, left where they are
    (raises if it does not pickle): ``(data, views)``, and the PickleBuffers with ``keep_buffers``."""
    buffers: list[pickle.PickleBuffer] = []
    data = dumps(value, buffers.append)
    views, kept = [], []
    for b in buffers:
        try:
            views.append(b.raw())
            kept.append(b)
        except BufferError:  # not contiguous
            views.append(memoryview(bytes(memoryview(b))))
            kept.append(pickle.PickleBuffer(views[-1].obj))
    return (data, views, kept) if keep_buffers else (data, views)


_HERE = "k"  # the prefix of keys that hold only within this kernel (value_key(stable=False))


def value_key(value: Any, stable: bool = True, pickled: tuple[bytes, list] | None = None,
              digests: dict | None = None) -> str:
    """A key equal for equal values. ``stable``: the same in every kernel, as the checkpoint's items
    are keyed (identity.py, where a set of str pickles in another order; else a hash of its pickle).
    Otherwise a hash of its pickle, which holds within this kernel: what --resume and %pooldebug
    compare, at pickle speed (identity.py encodes a 300,000-key dict in ~1.6 s, its pickle
    is hashed in ~0.09 s), with big buffers the map's payload already hashed not hashed again."""
    if stable:
        from . import identity

        try:
            return "i" + identity.keys([value], [0], "--kw").hex()
        except Exception:
            data, views = pickled if pickled is not None else _pickled(value)
            h = hashlib.blake2b(data, digest_size=12)
            for v in views:
                h.update(v)
            return h.hexdigest()
    data, views = pickled if pickled is not None else _pickled(value)
    h = hashlib.sha256(data)
    for v in views:
        h.update(buffer_digest(v, digests))
    return _HERE + h.hexdigest()[:24]


def kw_values(kept: dict[str, tuple], names: list[str]) -> dict[str, Any]:
    """The values ``kw_record`` kept for ``names``, unpickled (a fresh copy each call)."""
    return {n: pickle.loads(kept[n][0], buffers=[bytearray(b) for b in kept[n][1]]) for n in names}


def changed_kw(was: dict[str, str] | None, now: dict[str, str] | None) -> list[str]:
    """The ``--kw`` names whose value differs (or that one side lacks), in order."""
    was, now = was or {}, now or {}
    return [k for k in dict.fromkeys([*was, *now]) if was.get(k) != now.get(k)]


def kw_words(names: list[str]) -> str:
    """``--kw y`` or ``--kw y, z``."""
    return "--kw " + ", ".join(names)
