"""Checks of a map's input, made before any work starts, each one sentence naming the culprit.

Wrappers that make functions mappable (a zero-argument function for
``repeat``) live here too: they are what the checks look through.
"""
from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any, Callable, Iterable

from .errors import BadInputError
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
    for i, x in enumerate(items):
        if not hasattr(x, "__iter__"):
            return i, x
    return None



def check_star(iterable: Iterable) -> Iterable:
    if isinstance(iterable, (list, tuple)):
        bad = _first_not_sequence(iterable)
    else:  # a stream: check the first item, then put it back
        it = iter(iterable)
        try:
            first = next(it)
        except StopIteration:
            return ()
        bad = _first_not_sequence([first])
        iterable = itertools.chain([first], it)
    if bad is not None:
        i, x = bad
        raise BadInputError(
            f"--star needs each item to be a sequence of arguments, but item {i} is "
            f"{describe(x)} ({x!r:.60})"
        )
    return iterable

