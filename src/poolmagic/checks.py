"""Checks of a map's input, made before any work starts, each one sentence naming the culprit.

Wrappers that make functions mappable (a zero-argument function for
``repeat``) live here too: they are what the checks look through.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import os
import re
import types
from typing import Any, Callable, Iterable

from .errors import BadArgumentsError, BadInputError, short_repr
from .serialize import describe

MANY_PER_CORE = 4


class NoArgs:
    """Calls a zero-argument function once per item, ignoring the item."""

    def __init__(self, func: Callable[[], Any]):
        self.func = func

    def __call__(self, _item: Any) -> Any:
        return self.func()


def check_positive(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInputError(f"{name} must be a positive whole number, not {value!r}")


def too_many_workers(n: int, cores: int) -> str | None:
    """A warning when ``n`` workers is far above the cores, else None."""
    if n <= MANY_PER_CORE * cores:
        return None
    return (
        f"{n} workers on {cores} core{'s' if cores != 1 else ''}: more processes than cores only "
        f"help when items wait (I/O, sleep, network); CPU-bound work runs no faster and every "
        f"worker costs memory. Workers start as maps need them."
    )


def _unwrap(func: Any) -> Any:
    while True:
        if isinstance(func, functools.partial):
            func = func.func
        elif isinstance(func, NoArgs):
            func = func.func
        else:
            return func


def check_plain_function(func: Callable, name: str) -> None:
    """Reject what a worker can run but cannot send back the result of."""
    f = _unwrap(func)
    if inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f):
        raise BadInputError(
            f"{name}() is an async function: a worker would only return an un-awaited coroutine. "
            f"Map a plain def that runs it, e.g. def run(x): return asyncio.run({name}(x))"
        )
    if inspect.isgeneratorfunction(f):
        raise BadInputError(
            f"{name}() is a generator function (it uses yield): its results would be generators, "
            f"which cannot be sent back. Return a list instead, e.g. def run(x): return list({name}(x))"
        )


def _first_not_sequence(items: Iterable) -> tuple[int, Any] | None:
    """The first item ``f(*item)`` cannot unpack: what ``iter()`` refuses. A numpy record
    (``np.void``) has no ``__iter__`` but iterates by index, as the loop's ``f(*row)`` does."""
    for i, x in enumerate(items):
        if not hasattr(x, "__iter__"):
            try:
                iter(x)
            except TypeError:
                return i, x
    return None



def check_star(iterable: Iterable, func: Callable | None = None, name: str = "",
               kwargs: dict | None = None) -> Iterable:
    """Each item must be a sequence of arguments; with ``func``, the first must fit its parameters."""
    if isinstance(iterable, (list, tuple)):
        bad = _first_not_sequence(iterable)
        first = iterable[0] if iterable else None
    else:  # a stream: check the first item, then put it back
        it = iter(iterable)
        try:
            first = next(it)
        except StopIteration:
            return ()
        bad = _first_not_sequence([first])
        iterable = itertools.chain([first], it)
    if bad is not None:  # a TypeError, as f(*x) in the loop (and multiprocessing's starmap) raises
        i, x = bad
        raise BadArgumentsError(
            f"--star needs each item to be a sequence of arguments, but item {i} is "
            f"{describe(x)} ({x!r:.60})"
        )
    if func is not None and isinstance(first, (tuple, list)):
        sig = signature(func)
        if sig is not None and not _binds(sig, tuple(first), kwargs):
            raise BadArgumentsError(
                f"--star calls the function with each item's values as its arguments, but item 0 "
                f"{short_repr(first)} holds {len(first)} value{'s' if len(first) != 1 else ''} and "
                f"{_shown(name, sig)} does not take "
                f"{'them' if len(first) != 1 else 'it'}{_with(kwargs)}"
            )
    return iterable


def check_call(func: Callable, args: tuple, kwargs: dict | None) -> None:
    """``apply``/``submit``: refuse a call that does not fit ``func``'s parameters in the words
    of the call (a map's check speaks of --star and item 0, which such a caller never wrote)."""
    sig = signature(func)
    if sig is None:
        return
    try:
        sig.bind(*args, **(kwargs or {}))
    except TypeError as exc:
        name = getattr(func, "__qualname__", None) or type(func).__name__
        given = ", ".join([*map(short_repr, args), *(f"{k}={short_repr(v)}" for k, v in (kwargs or {}).items())])
        raise BadArgumentsError(f"{_shown(name, sig)} cannot be called as {name.rpartition('.')[2]}({given}): "
                                f"{exc}") from None


def signature(func: Callable) -> inspect.Signature | None:
    """``func``'s own signature, or None when it has none to read (builtins such as ``str``).

    The wrapper's own, not ``__wrapped__``'s: a decorator may call the function
    it wraps with other arguments than it takes itself.
    """
    try:
        return inspect.signature(func, follow_wrapped=False)
    except (TypeError, ValueError):
        return None


def _binds(sig: inspect.Signature, args: tuple, kwargs: dict | None) -> bool:
    try:
        sig.bind(*args, **(kwargs or {}))
    except TypeError:
        return False
    return True


def _shown(name: str, sig: inspect.Signature) -> str:
    """``work(x, y)``, or ``lambda x, y`` for a lambda."""
    if name.endswith("<lambda>"):
        return f"`lambda {str(sig)[1:-1]}`".replace("lambda `", "lambda`")
    return f"`{name}{sig}`"


def _with(kwargs: dict | None) -> str:
    return f" (with --kw {', '.join(kwargs)})" if kwargs else ""


_ITEM = object()  # stands for an item: binding only counts arguments


def check_arity(func: Callable, name: str, *, repeat: bool = False, kwargs: dict | None = None) -> None:
    """Refuse a function that cannot take what the map will pass: one item, or nothing for ``repeat``.

    Only when its signature can be read: a builtin without one is let through.
    (``--star`` items are checked against it in ``check_star``.)
    """
    key = _arity_key(func, repeat, kwargs)
    if key is not None and key in _FITS:
        return
    sig = signature(func)
    if sig is None:
        return
    _check_arity(func, sig, name, repeat, kwargs)
    if key is not None:
        if len(_FITS) > 512:
            _FITS.clear()
        _FITS.add(key)


# Plain functions already found to fit, by what their signature is made of: a
# re-run cell makes a new function with an equal code object, and reading a
# signature costs ~10 µs of a ~0.5 ms cell.
_FITS: set = set()


def _arity_key(func: Callable, repeat: bool, kwargs: dict | None) -> tuple | None:
    if not isinstance(func, types.FunctionType) or "__signature__" in func.__dict__:
        return None
    key = (func.__code__, func.__defaults__, tuple(sorted((func.__kwdefaults__ or {}).items())),
           repeat, tuple(sorted(kwargs or ())))
    try:
        hash(key)
    except TypeError:  # an unhashable default
        return None
    return key


def _check_arity(func: Callable, sig: inspect.Signature, name: str, repeat: bool, kwargs: dict | None) -> None:
    if repeat:
        if not _binds(sig, (), kwargs):
            raise BadArgumentsError(
                f"--repeat N calls the function with no argument, but it is {_shown(name, sig)}{_with(kwargs)}: "
                f"give it no parameter to fill (def work(): ...), or map it over an ITERABLE instead"
            )
        return
    if _binds(sig, (_ITEM,), kwargs):
        return
    if _binds(sig, (), kwargs):
        raise BadArgumentsError(
            f"{_shown(name, sig)} takes no argument, but a map calls it with each item: give it a "
            f"parameter (def work(x): ...), or call it N times with --repeat N (repeat=N)"
        )
    if _binds(sig, (_ITEM, _ITEM), kwargs) or any(
        p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()
    ):
        raise BadArgumentsError(
            f"{_shown(name, sig)} needs more than one argument, but a map passes each item as one: if each item "
            f"is a tuple of its arguments, add --star (star=True); for constants, use --kw NAME=EXPR (kwargs={{...}})"
        )
    raise BadArgumentsError(f"{_shown(name, sig)} cannot be called with one item as its argument{_with(kwargs)}")


_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")  # data.csv, notes.txt, model.pkl


def _looks_like_path(value: str | bytes | bytearray) -> bool:
    if not isinstance(value, str):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError:
            return False
    if not value or len(value) > 4096 or "\n" in value:
        return False
    return "/" in value or os.sep in value or bool(_SUFFIX.search(value)) or os.path.exists(value)


def check_not_text(iterable: Any, expr: str | None = None) -> None:
    """Refuse a str, bytes or bytearray ITERABLE: a map over one is nearly always a mistake.

    ``for x in "data.csv"`` runs over characters (over ints for bytes); the
    message gives the fix for each thing that may have been meant. A
    memoryview is let through: it is made on purpose, and a loop over one
    gives its typed elements.
    """
    if not isinstance(iterable, (str, bytes, bytearray)):
        return
    s = expr if expr and len(expr) <= 60 else "s"
    units = "characters" if isinstance(iterable, str) else "bytes (as ints)"
    fixes = []
    if _looks_like_path(iterable):
        fixes.append(f"it looks like a file path: to map the file's lines, pass open({s})")
    fixes.append(f"to map its {units.split(' ')[0]}, pass list({s})")
    fixes.append(f"to map the one value, pass [{s}]")
    head = f"ITERABLE `{expr}`" if expr else "the ITERABLE"
    raise BadInputError(
        f"{head} is {describe(iterable)} ({short_repr(iterable)}): the map would call the function on "
        f"each of its {len(iterable):,} {units}; " + "; ".join(fixes)
    )
