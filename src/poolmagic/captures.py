"""What a function takes to the workers besides its code, and what of it will not behave as in a loop.

A notebook function goes by value with the globals it reads (serialize.py
pickles it). Before a map, this module answers from its code and what it
captures (globals, closure, defaults): which global names it reads and which
it assigns, which are not defined, which value cannot be pickled, which
random generators of the notebook would go as copies, which calls draw
numbers that --seed does not reach; and, for tracebacks and remote clusters,
its code's file names and the functions it reaches.
"""
from __future__ import annotations

import builtins
import dis
import functools
import sys
import types
from typing import Any, Callable, Iterable, Iterator

import cloudpickle

from .serialize import _code_objects, _found_by_name, callable_name, describe, module_method_home


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


def called_function(func: Any) -> Any:
    """The function a partial, a bound method or poolmagic's wrappers call, unwrapped."""
    while True:
        if isinstance(func, functools.partial):
            func = func.func
        elif hasattr(func, "__func__"):
            func = func.__func__
        else:
            return func


def assigned_globals(func: Any) -> tuple[str, ...]:
    """Notebook globals the function's code assigns (``global x; x = ...``), in order of first store.

    Only a function of the notebook (``__main__``): a library's own module globals are not the notebook's.
    """
    func = called_function(func)
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
    func = called_function(func)
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
            if what == "global 'get_ipython'":  # the notebook's shell (a bound method holding locks)
                return (f"{who}() calls get_ipython(), the notebook's shell, which a worker does not have (items "
                        f"run in a process of their own): call it in the notebook and pass what the items need "
                        f"(--kw NAME=EXPR), or use the threads backend (%poolsize --backend threads), whose "
                        f"items run in the kernel")
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
