"""Turn a callable into bytes that a worker can load, once per version.

A notebook function is pickled *by value* with cloudpickle, together with every
global it reads. Large buffers (numpy arrays and anything else that supports
pickle protocol 5) travel out of band, so a 50 MB global is neither copied into
the pickle stream nor re-sent with each chunk: the payload is keyed by a content
hash and each worker caches it.

Before any work starts this module also answers the user's two questions when
something is wrong: which captured variable cannot be pickled, and which global
name the function reads that is not defined.
"""
from __future__ import annotations

import functools
import hashlib
import io
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import cloudpickle

from .errors import SerializationError


@dataclass
class Payload:
    """A pickled callable ready to ship: ``data`` plus out-of-band ``buffers``."""

    key: str
    data: bytes
    buffers: list[memoryview] = field(default_factory=list)
    #: each buffer's sha256 by (id of the object that holds it, size): see ``buffer_digest``
    digests: dict = field(default_factory=dict, repr=False)


_UNSET: Any = object()


def dump_function(func: Callable, prepickled: dict | None = None, digests: dict | None = None,
                  fp: Any = _UNSET) -> Payload:
    """Pickle ``func`` with cloudpickle; raise SerializationError naming the culprit.

    A function whose pickle is a pure function of values that cannot change in
    place (its code, its name, defaults, closure and the globals it reads all
    numbers, strings, bytes, None, tuples of them, modules pickled by reference
    or builtins) is pickled once: the same fingerprint gives the payload kept
    from before (a re-run cell, a map in a loop; ~17 µs of cloudpickle and hash
    each). Anything else (a list, an array, a helper function, a class among
    its globals) is pickled at every map, as its contents may have changed.

    ``prepickled``: values it holds (``--kw``) already pickled, by id: ``id:
    (value, data, views, PickleBuffers)``, put in its pickle as they are instead of pickled
    again; ``digests``: buffers' digests made already (``buffer_digest``); ``fp``: ``func``'s
    fingerprint when the map started, made already (loop_notes needs it too: ~5–12 µs each).
    """
    given = fp is not _UNSET
    if not given:
        fp = _fingerprint(func)
    if fp is None:
        return _dump(func, prepickled, digests)
    payload = _PAYLOADS.get(fp)
    if payload is None:
        payload = _dump(func)
        now = _fingerprint(func) if given else fp  # kept under what it pickled (code run since may have changed it)
        if now is not None:
            _PAYLOADS[now] = payload
            if len(_PAYLOADS) > _PAYLOADS_KEPT:
                del _PAYLOADS[next(iter(_PAYLOADS))]
    return payload


_PAYLOADS: dict[tuple, Payload] = {}  # fingerprint -> payload, oldest first
_PAYLOADS_KEPT = 16


class _Changeable(Exception):
    """A value whose contents may change in place: its function's pickle is not cached."""


_ATOMS = frozenset({int, str, bytes, bool, type(None)})


def _atom(value: Any) -> Any:
    """A key equal for two values exactly when they pickle the same (raises _Changeable)."""
    t = type(value)
    if t in _ATOMS:
        return (t, value)
    if t is float:
        return (t, value.hex())  # 0.0 == -0.0 and nan != nan: compare their bits
    if t is tuple or t is frozenset:
        return (t, tuple(_atom(v) for v in value))
    if t is types.BuiltinFunctionType:
        return (t, value)  # pickled by reference
    if t is types.ModuleType and _by_reference(value):
        return (t, value)
    raise _Changeable


def _by_reference(module: types.ModuleType) -> bool:
    """cloudpickle pickles ``module`` by its name (not registered to go by value, importable)."""
    name = getattr(module, "__name__", None)
    if not isinstance(name, str) or sys.modules.get(name) is not module:
        return False
    by_value = cloudpickle.list_registry_pickle_by_value()
    parts = name.split(".")
    return not any(".".join(parts[:i]) in by_value for i in range(1, len(parts) + 1))


@functools.lru_cache(maxsize=512)
def _code_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name the code (and code nested in it) may look up: what cloudpickle ships of its globals."""
    names: dict[str, None] = {}
    for co in _code_objects(code):
        names.update(dict.fromkeys(co.co_names))
    return tuple(names)


_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")  # cloudpickle ships these too


def _fingerprint(func: Any) -> tuple | None:
    """What ``func``'s pickle depends on, if all of it is values that cannot change in place."""
    if type(func) is not types.FunctionType or func.__dict__ or func.__annotations__:
        return None
    code = func.__code__
    g = func.__globals__
    try:
        return (code, getattr(code, "co_qualname", None), func.__name__, func.__qualname__, func.__module__, _atom(func.__doc__),
                _atom(func.__defaults__), _atom(tuple(sorted((func.__kwdefaults__ or {}).items()))),
                tuple(_atom(c.cell_contents) for c in func.__closure__ or ()),
                tuple(_atom(g[n]) if n in g else None for n in _code_names(code)),
                tuple(_atom(g[n]) if n in g else None for n in _BASE_GLOBALS))
    except (_Changeable, ValueError, TypeError):  # ValueError: an empty closure cell
        return None


_LRU = getattr(functools, "_lru_cache_wrapper", None)


def _found_by_name(obj: Any) -> bool:
    """``obj`` is what its module gives under its qualified name (pickle can take it by name)."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None or module.__name__ == "__main__" or not _by_reference(module):
        return False
    found: Any = module
    for part in getattr(obj, "__qualname__", "<>").split("."):
        found = getattr(found, part, None)
    return found is obj


def _reduce_lru(obj: Any) -> Any:
    """An lru_cache wrapper: by its name when that finds it, else rebuilt around its function."""
    if _found_by_name(obj):
        return obj.__reduce__()
    p = obj.cache_parameters()
    return _LRU, (obj.__wrapped__, p["maxsize"], p["typed"], functools._CacheInfo), dict(obj.__dict__)


_CLOUD_OVERRIDE = cloudpickle.Pickler.reducer_override


def module_method_home(obj: Any) -> types.ModuleType | None:
    """The module that holds bound method ``obj`` under its ``__name__`` (pickled by reference), if one does.

    Looked for in the method's module and in its object's class's module (a method in C has no
    ``__module__``: ``random.random`` is found in ``random``)."""
    name = getattr(obj, "__name__", None)
    owner = getattr(obj, "__self__", None)
    if not isinstance(name, str) or owner is None or isinstance(owner, types.ModuleType):
        return None
    for module_name in (getattr(obj, "__module__", None), type(owner).__module__):
        module = sys.modules.get(module_name or "")
        if (module is not None and module.__name__ != "__main__" and getattr(module, name, None) is obj
                and _by_reference(module)):
            return module
    return None


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, ``@functools.lru_cache``/``@cache`` functions of a notebook by value, and
    values pickled already put in as they are.

    pickle takes an lru_cache wrapper by its name, ``__main__.f``, which no worker
    has; such a wrapper is rebuilt around its function (pickled by value), with an
    empty cache of the same size. A bound method a module holds by name
    (``random.randint``, ``numpy.random.normal``: methods of the module's hidden
    generator) goes by that name, so the worker calls its own: by value,
    ``from random import randint`` shipped a copy of the kernel's generator, every
    worker drew the same numbers, and ``--seed`` (which seeds the worker's) did not
    reach them (``module_method_home``). All are checked in the one hook cloudpickle has
    the pickler call for every object (a ChainMap dispatch table over cloudpickle's
    own made pickling 200,000 dataclass instances 1.36× slower; this, 1.1×).
    """

    def __init__(self, file: Any, *args: Any, prepickled: dict | None = None, **kwargs: Any):
        super().__init__(file, *args, **kwargs)
        self._prepickled = prepickled

    def reducer_override(self, obj: Any) -> Any:
        if self._prepickled is not None:
            pre = self._prepickled.get(id(obj))
            if pre is not None and pre[0] is obj:  # a --kw value pickled already: its pickle, out of band
                # (its PickleBuffers as they are: a buffer of a view of a buffer, freed by the cycle
                # collector, can be cleared before the one that exports from it, and crash)
                return functools.partial(pickle.loads, buffers=pre[3]), (pickle.PickleBuffer(pre[1]),)
        t = type(obj)
        if t is _LRU:
            return _reduce_lru(obj)
        if t is types.MethodType or t is types.BuiltinMethodType:
            module = module_method_home(obj)
            if module is not None:
                return getattr, (module, obj.__name__)
        return _CLOUD_OVERRIDE(self, obj)


def dumps(obj: Any, buffer_callback: Callable | None = None, prepickled: dict | None = None) -> bytes:
    """``obj`` pickled as a function's payload is (cloudpickle, lru_cache functions by value)."""
    with io.BytesIO() as file:
        pickler = _Pickler(file, protocol=5, buffer_callback=buffer_callback, prepickled=prepickled)
        try:
            pickler.dump(obj)
        finally:
            # its memo holds what reducer_override made (buffers exported from buffers): freed now, in
            # order, not by the cycle collector, which clears a memoryview another still exports from
            pickler.clear_memo()
        return file.getvalue()


def _dump(func: Callable, prepickled: dict | None = None, digests: dict | None = None) -> Payload:
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = dumps(func, buffers.append, prepickled)
    except Exception as exc:  # cloudpickle raises TypeError, PicklingError, ...
        from .captures import explain_unpicklable

        raise SerializationError(explain_unpicklable(func, exc)) from None
    raw: list[memoryview] = []
    h = hashlib.sha256(data)
    digests = {} if digests is None else digests
    for buf in buffers:
        try:
            view = buf.raw()
        except BufferError:  # non-contiguous: let pickle copy it in-band instead
            return _dump_in_band(func)
        h.update(buffer_digest(view, digests))
        raw.append(view)
    return Payload(h.hexdigest()[:24], data, raw, digests)


def buffer_digest(view: memoryview, digests: dict | None = None) -> bytes:
    """A pickle buffer's sha256, kept in ``digests`` by the object that holds the memory: the
    payload and a --kw value's key hash each big buffer once between them."""
    holder = view.obj
    while isinstance(holder, memoryview):
        holder = holder.obj
    key = (id(holder), view.nbytes)
    known = digests.get(key) if digests is not None else None
    if known is not None and known[1] is holder:
        return known[0]
    digest = hashlib.sha256(view).digest()
    if digests is not None:
        digests[key] = (digest, holder)  # (holding it: its id cannot name another object while kept)
    return digest


def _dump_in_band(func: Callable) -> Payload:
    data = dumps(func)
    return Payload(hashlib.sha256(data).hexdigest()[:24], data, [])


def describe(obj: Any) -> str:
    """``a _thread.lock`` — the type as a user would recognise it."""
    t = type(obj)
    mod = t.__module__
    name = t.__qualname__ if mod in ("builtins", None) else f"{mod}.{t.__qualname__}"
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def callable_name(func: Any) -> str:
    if isinstance(func, functools.partial):
        return f"partial({callable_name(func.func)}, ...)"
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)
