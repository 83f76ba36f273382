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

import builtins
import collections
import dis
import functools
import hashlib
import io
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import cloudpickle

from .errors import SerializationError


@dataclass
class Payload:
    """A pickled callable ready to ship: ``data`` plus out-of-band ``buffers``."""

    key: str
    data: bytes
    buffers: list[memoryview] = field(default_factory=list)
    #: each buffer's sha256 by (id of the object that holds it, size): a --kw value's key reuses them
    digests: dict = field(default_factory=dict, repr=False)


def dump_function(func: Callable) -> Payload:
    """Pickle ``func`` with cloudpickle; raise SerializationError naming the culprit.

    A function whose pickle is a pure function of values that cannot change in
    place (its code, its name, defaults, closure and the globals it reads all
    numbers, strings, bytes, None, tuples of them, modules pickled by reference
    or builtins) is pickled once: the same fingerprint gives the payload kept
    from before (a re-run cell, a map in a loop; ~17 µs of cloudpickle and hash
    each). Anything else (a list, an array, a helper function, a class among
    its globals) is pickled at every map, as its contents may have changed.
    """
    fp = _fingerprint(func)
    if fp is None:
        return _dump(func)
    payload = _PAYLOADS.get(fp)
    if payload is None:
        payload = _PAYLOADS[fp] = _dump(func)
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


_METHOD = cloudpickle.Pickler.dispatch_table[types.MethodType]


def _reduce_method(obj: types.MethodType) -> Any:
    """A bound method a module holds by name (``random.randint``, ``numpy.random.normal``: methods
    of the module's hidden generator) by that name, so the worker calls its own; else by value.

    By value, ``from random import randint`` shipped a copy of the kernel's generator: every
    worker drew the same numbers, and ``--seed`` (which seeds the worker's) did not reach them.
    """
    module = module_method_home(obj)
    return _METHOD(obj) if module is None else (getattr, (module, obj.__name__))


def _reduce_builtin(obj: types.BuiltinMethodType) -> Any:
    """``from random import random``: a method in C of the module's generator, by its name, as
    ``_reduce_method`` does; any other builtin as pickle takes it (``len``: by its name)."""
    module = module_method_home(obj)
    return obj.__reduce_ex__(5) if module is None else (getattr, (module, obj.__name__))


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
    """cloudpickle, and ``@functools.lru_cache``/``@cache`` functions of a notebook by value.

    pickle takes an lru_cache wrapper by its name, ``__main__.f``, which no worker
    has; such a wrapper is rebuilt around its function (pickled by value), with an
    empty cache of the same size. A module's bound method goes by its name
    (``_reduce_method``). (Dispatch-table entries: no cost per other object.)
    """

    dispatch_table = collections.ChainMap({_LRU: _reduce_lru} if _LRU is not None else {},
                                          {types.MethodType: _reduce_method,
                                           types.BuiltinMethodType: _reduce_builtin},
                                          cloudpickle.Pickler.dispatch_table)


def _dumps(obj: Any, buffer_callback: Callable | None = None) -> bytes:
    with io.BytesIO() as file:
        _Pickler(file, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def _dump(func: Callable) -> Payload:
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = _dumps(func, buffer_callback=buffers.append)
    except Exception as exc:  # cloudpickle raises TypeError, PicklingError, ...
        raise SerializationError(explain_unpicklable(func, exc)) from None
    raw: list[memoryview] = []
    h = hashlib.sha256(data)
    digests = {}
    for buf in buffers:
        try:
            view = buf.raw()
        except BufferError:  # non-contiguous: let pickle copy it in-band instead
            return _dump_in_band(func)
        digest = hashlib.sha256(view).digest()
        digests[(id(view.obj), view.nbytes)] = digest
        h.update(digest)
        raw.append(view)
    return Payload(h.hexdigest()[:24], data, raw, digests)


def _dump_in_band(func: Callable) -> Payload:
    data = _dumps(func)
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


def global_names(func: Callable) -> list[str]:
    """Global names the function's code loads, in order of first use."""
    code = getattr(func, "__code__", None)
    return [] if code is None else list(_code_global_names(code))


@functools.lru_cache(maxsize=512)
def _code_global_names(code: types.CodeType) -> tuple[str, ...]:
    # A pure function of the code object: cached, since a cell re-run maps the same code.
    seen: dict[str, None] = {}
    stored: set[str] = set()
    for co in _code_objects(code):
        for ins in dis.get_instructions(co):
            if not isinstance(ins.argval, str):
                continue
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                seen.setdefault(ins.argval, None)
            elif ins.opname in ("STORE_GLOBAL", "STORE_NAME"):
                stored.add(ins.argval)
    return tuple(n for n in seen if n not in stored)


def assigned_globals(func: Any) -> tuple[str, ...]:
    """Notebook globals the function's code assigns (``global x; x = ...``), in order of first store.

    Only a function of the notebook (``__main__``): a library's own module globals are not the notebook's.
    """
    while True:  # the function a partial, a bound method or poolmagic's wrappers call
        if isinstance(func, functools.partial):
            func = func.func
        elif hasattr(func, "__func__"):
            func = func.__func__
        else:
            break
    code = getattr(func, "__code__", None)
    if code is None or getattr(func, "__globals__", {}).get("__name__") != "__main__":
        return ()
    return _code_stored_globals(code)


@functools.lru_cache(maxsize=512)
def _code_stored_globals(code: types.CodeType) -> tuple[str, ...]:
    stored: dict[str, None] = {}
    for co in _code_objects(code):
        for ins in dis.get_instructions(co):
            if ins.opname == "STORE_GLOBAL" and isinstance(ins.argval, str):
                stored.setdefault(ins.argval, None)
    return tuple(stored)


_UNSEEDED = frozenset({"default_rng", "RandomState", "Random", "PCG64", "PCG64DXSM", "MT19937", "Philox",
                       "SFC64", "SeedSequence", "seed"})
_BETWEEN = frozenset({"CACHE", "PRECALL", "PUSH_NULL", "EXTENDED_ARG"})
_CALLS = frozenset({"CALL", "CALL_FUNCTION", "CALL_METHOD"})


def unseeded_calls(func: Any, _seen: set | None = None) -> tuple[str, ...]:
    """Generators made (or streams reseeded) without a seed in ``func`` or the notebook helpers it
    calls: ``default_rng()``, ``random.Random()``, ``np.random.seed()``. Their numbers come from fresh
    entropy, which ``--seed`` does not reach: another run, other numbers."""
    seen = _seen if _seen is not None else set()
    while isinstance(func, functools.partial) or hasattr(func, "__func__"):
        func = func.func if isinstance(func, functools.partial) else func.__func__
    if not isinstance(func, types.FunctionType) or id(func) in seen:
        return ()
    seen.add(id(func))
    found = dict.fromkeys(_code_unseeded(func.__code__))
    g = func.__globals__
    for name in global_names(func):
        value = g.get(name)
        if isinstance(value, types.FunctionType) and value.__globals__ is g:
            found.update(dict.fromkeys(unseeded_calls(value, seen)))
    return tuple(found)


@functools.lru_cache(maxsize=512)
def _code_unseeded(code: types.CodeType) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for co in _code_objects(code):
        pending = None  # a generator's name just loaded: is it called with no argument?
        for ins in dis.get_instructions(co):
            if ins.opname in _BETWEEN:
                continue
            if pending is not None and ins.opname in _CALLS and ins.arg == 0:
                found.setdefault(pending, None)
            pending = None
            if ins.opname.startswith(("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF")) \
                    and ins.argval in _UNSEEDED:
                pending = ins.argval
    return tuple(found)


def _captured(func: Any) -> Iterator[tuple[str, Any]]:
    """(description, value) of everything cloudpickle must pickle along with ``func``."""
    if isinstance(func, functools.partial):
        yield "the partial's function", func.func
        for i, a in enumerate(func.args):
            yield f"positional argument {i} of the partial", a
        for k, v in func.keywords.items():
            yield f"keyword argument {k!r} of the partial", v
        return
    if isinstance(func, types.MethodType):
        yield "the bound instance", func.__self__
        func = func.__func__
    code = getattr(func, "__code__", None)
    if code is None:
        return
    for name, cell in zip(code.co_freevars, func.__closure__ or ()):
        try:
            yield f"closure variable {name!r}", cell.cell_contents
        except ValueError:
            continue
    g = getattr(func, "__globals__", {})
    for name in global_names(func):
        if name in g:
            yield f"global {name!r}", g[name]
    for i, d in enumerate(func.__defaults__ or ()):
        yield f"default argument {i}", d
    for k, d in (func.__kwdefaults__ or {}).items():
        yield f"default argument {k!r}", d


def shared_generators(func: Any, kwargs: dict | None = None, limit: int = 200) -> list[str]:
    """The random generators and iterators of the notebook that are pickled with ``func`` (read by it or by a
    helper it calls, a closure, a default, a partial's argument), as "the global 'rng', a
    numpy.random.Generator". Each worker gets a copy of such a generator as it is when the map
    starts: the workers draw the same numbers, where a loop draws on from the one stream. ``kwargs``:
    the map's --kw values, which go with it too. A method
    a module holds by name (``random.randint``) is not one: it goes by name (``_reduce_method``)."""
    found = [f"the --kw value {k!r}, {kind}" for k, v in (kwargs or {}).items()
             if (kind := _generator_kind(v)) is not None]
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("", func)]
    while todo and len(seen) < limit:
        who, f = todo.pop()
        if id(f) in seen or _found_by_name(f):  # a library's function goes by name, with nothing of ours
            continue
        seen.add(id(f))
        for where, value in _captured(f):
            kind = _generator_kind(value)
            if kind is not None:
                found.append(f"the {where}{who}, {kind}")
            elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
                inner = value.func if isinstance(value, functools.partial) else value
                todo.append((f" (of {callable_name(inner)}())" if where.startswith("global") else who, value))
    return found


def _generator_kind(value: Any) -> str | None:
    """"a numpy.random.Generator" when ``value`` is a random generator or an iterator
    (``itertools.count()``, ``iter(ids)``), or a bound method of one, whose copy would repeat
    what it gives; None otherwise (SystemRandom draws from the OS). Decided once per type."""
    t = type(value)
    if t is types.MethodType or t is types.BuiltinMethodType:
        if module_method_home(value) is not None:
            return None  # random.random: the worker's own generator
        value = value.__self__  # rng.normal, r.random: their generator
        t = type(value)
    kind = _KINDS.get(t, _UNKNOWN)
    if kind is _UNKNOWN:
        kind = _kind_of(t)
        if len(_KINDS) > 1024:
            _KINDS.clear()
        _KINDS[t] = kind
    return kind


_UNKNOWN = object()
_KINDS: dict[type, Any] = {}  # type -> what _kind_of says


def _kind_of(t: type) -> str | None:
    import random

    npr = sys.modules.get("numpy.random")
    if issubclass(t, random.Random):
        if issubclass(t, random.SystemRandom):
            return None
    elif issubclass(t, (type, types.ModuleType)) or not hasattr(t, "__next__"):
        if npr is None or not issubclass(t, (npr.Generator, npr.RandomState, npr.BitGenerator)):
            return None
    module = "numpy.random" if t.__module__.startswith("numpy.random") else t.__module__
    kind = t.__qualname__ if module == "builtins" else f"{module}.{t.__qualname__}"
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def explain_unpicklable(func: Callable, exc: BaseException, _depth: int = 0) -> str:
    """A sentence naming what in ``func`` cannot be pickled, and its type."""
    who = callable_name(func)
    for what, value in _captured(func):
        try:
            cloudpickle.dumps(value)
        except Exception as inner:
            is_local_fn = isinstance(value, (types.FunctionType, functools.partial))
            if is_local_fn and _depth < 3 and value is not func:
                return explain_unpicklable(value, inner, _depth + 1).replace(
                    "cannot be sent", f"(used by {who}()) cannot be sent", 1
                )
            return (
                f"{who}() cannot be sent to the workers: it captures {what}, "
                f"{describe(value)}, which cannot be pickled ({inner})."
            )
    return f"{who}() cannot be sent to the workers: {type(exc).__name__}: {exc}"


def undefined_globals(func: Callable, _seen: set | None = None) -> list[tuple[str, str]]:
    """(function, name) pairs for global names a function reads that are not defined.

    Follows helper functions that live in the same namespace, so a typo in a
    helper is caught too.
    """
    seen = _seen if _seen is not None else set()
    if isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, types.MethodType):
        func = func.__func__
    if not isinstance(func, types.FunctionType) or id(func) in seen:
        return []
    seen.add(id(func))
    g = func.__globals__
    b = g.get("__builtins__", builtins)
    b = b if isinstance(b, dict) else vars(b)
    missing: list[tuple[str, str]] = []
    for name in global_names(func):
        if name in g:
            value = g[name]
            if isinstance(value, types.FunctionType) and value.__globals__ is g:
                missing += undefined_globals(value, seen)
        elif name not in b:
            missing.append((func.__qualname__, name))
    return missing


def walk(roots: "list[Any]", children: Callable[[Any], "Iterable[Any] | None"], limit: int) -> Iterator[Any]:
    """Each object reachable from ``roots`` once, depth first, at most ``limit`` of them.

    ``children(obj)`` names what to visit from ``obj`` (None: nothing). The
    walks that follow what cloudpickle ships (code_filenames here, the local
    modules a function needs) differ only in what they follow.
    """
    seen: set[int] = set()
    todo = list(roots)
    while todo and len(seen) < limit:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        more = children(obj)
        if more:
            todo.extend(more)


def closure_values(func: types.FunctionType) -> list[Any]:
    """What ``func``'s closure cells hold (an empty cell is skipped)."""
    out = []
    for cell in func.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:
            pass
    return out


def code_filenames(func: Any, limit: int = 200) -> dict[tuple[str, int], str]:
    """(co_name, co_firstlineno) -> co_filename for code reachable from ``func``.

    Walks nested code, closures, defaults, globals the code reads (functions,
    classes and their methods), as cloudpickle does when it ships them.
    """
    found: dict[tuple[str, int], str] = {}

    def children(obj: Any) -> "list[Any] | None":
        if isinstance(obj, functools.partial):
            return [obj.func, *obj.args, *obj.keywords.values()]
        if isinstance(obj, types.MethodType):
            return [obj.__func__]
        if isinstance(obj, type):
            return [v for v in vars(obj).values() if callable(v) or isinstance(v, (staticmethod, classmethod, property))]
        if isinstance(obj, (staticmethod, classmethod)):
            return [obj.__func__]
        if isinstance(obj, property):
            return [f for f in (obj.fget, obj.fset, obj.fdel) if f is not None]
        if isinstance(obj, types.FunctionType):
            for co in _code_objects(obj.__code__):
                found[(co.co_name, co.co_firstlineno)] = co.co_filename
            g = obj.__globals__
            return closure_values(obj) + [g[n] for n in global_names(obj)
                                          if n in g and isinstance(g[n], (type, types.FunctionType))]
        if callable(obj) and hasattr(type(obj), "__call__"):
            return [type(obj), *(v for v in getattr(obj, "__dict__", {}).values() if callable(v))]
        return None

    for _ in walk([func], children, limit):
        pass
    return found
