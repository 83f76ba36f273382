"""Which of the process's global random streams a function draws from: ``random.random()``,
``np.random.normal()``, ``from random import choice``.

A loop in the kernel draws them from the kernel's stream, which ``random.seed(0)`` or
``np.random.seed(0)`` in the notebook fixes; a worker process draws from a stream of its
own, which that seed does not reach. Without ``--seed``, a map's numbers then differ from
the loop's and from run to run, and nothing said so (loopnotes.py says so now).

Read from the code and the globals it loads, as captures.py reads them: ``np.random.X``
and ``random.X`` with X a method of the global generator (``seed`` and the state
functions are not draws), where ``np``/``random`` are modules the function reads as
globals or imports itself, and globals bound to the global generators' methods.
"""
from __future__ import annotations

import dis
import functools
import sys
import types
from typing import Any

from .captures import called_function, global_names
from .serialize import _code_objects

_NOT_DRAWS = frozenset({"seed", "getstate", "setstate", "get_state", "set_state", "VERSION", "gauss_next",
                        "Random", "SystemRandom", "RandomState", "Generator", "SeedSequence", "BitGenerator",
                        "default_rng", "PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64", "get_bit_generator",
                        "set_bit_generator"})
_MODULES = {"random": "random", "numpy.random": "np.random", "numpy": "np"}


@functools.lru_cache(maxsize=None)
def _draws(kind: str) -> frozenset:
    """The names of ``kind``'s (random / np.random) functions that draw from its global generator."""
    if kind == "random":
        import random

        names = {n for n in dir(random.Random) if not n.startswith("_")}
    else:
        try:
            import numpy.random as npr  # (the function uses it: numpy is there)
        except ImportError:
            return frozenset()
        names = {n for n in dir(npr.RandomState) if not n.startswith("_")}
    return frozenset(names - _NOT_DRAWS)


def global_draws(func: Any, _seen: set | None = None) -> tuple[str, ...]:
    """``random.X`` / ``np.random.X`` draws of ``func`` and the notebook helpers it calls."""
    seen = _seen if _seen is not None else set()
    func = called_function(func)
    if not isinstance(func, types.FunctionType) or id(func) in seen:
        return ()
    seen.add(id(func))
    g = func.__globals__
    kinds = {}
    found: dict[str, None] = {}
    for name in global_names(func):
        value = g.get(name)
        if isinstance(value, types.ModuleType) and value.__name__ in _MODULES:
            kinds[name] = _MODULES[value.__name__]
        elif isinstance(value, types.FunctionType) and value.__globals__ is g:
            found.update(dict.fromkeys(global_draws(value, seen)))
        else:
            drawn = _bound_draw(value)
            if drawn:
                found.setdefault(drawn, None)
    found.update(dict.fromkeys(_code_draws(func.__code__, tuple(sorted(kinds.items())))))
    return tuple(found)


def _bound_draw(value: Any) -> str | None:
    """"random.choice" when ``value`` is a method of a global generator (``from random import choice``)."""
    owner = getattr(value, "__self__", None)
    if owner is None or isinstance(owner, types.ModuleType):
        return None
    random = sys.modules.get("random")
    if random is not None and owner is getattr(random, "_inst", None):
        return f"random.{value.__name__}"
    mtrand = sys.modules.get("numpy.random.mtrand")
    if mtrand is not None and owner is getattr(mtrand, "_rand", None):
        return f"np.random.{value.__name__}"
    return None


@functools.lru_cache(maxsize=512)
def _code_draws(code: types.CodeType, global_kinds: tuple) -> tuple[str, ...]:
    found: dict[str, None] = {}
    seeded: set[str] = set()
    for co in _code_objects(code):
        kinds = dict(global_kinds)
        base = pending = None  # an import's module, and the name it is about to store
        last = None  # the kind (random, np, np.random) of the value just loaded
        for ins in dis.get_instructions(co):
            op, arg = ins.opname, ins.argval
            if op in ("CACHE", "PRECALL", "PUSH_NULL", "EXTENDED_ARG", "RESUME", "NOP"):
                continue
            if op == "IMPORT_NAME":
                base = pending = arg
                continue
            if op == "IMPORT_FROM" and base is not None:  # (import a.b as c: IMPORT_NAME a.b, IMPORT_FROM b)
                pending = base if base.endswith("." + arg) else f"{base}.{arg}"
                continue
            if op.startswith("STORE_") and pending is not None:
                if pending in _MODULES:
                    kinds[arg] = _MODULES[pending]
                else:
                    parent, _, leaf = pending.rpartition(".")
                    if parent in ("random", "numpy.random") and leaf in _draws(_MODULES[parent]):
                        found.setdefault(f"{_MODULES[parent]}.{leaf}", None)  # from random import choice
                pending, last = None, None
                continue
            base = pending = None
            if op.startswith(("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FAST", "LOAD_DEREF")):
                last = kinds.get(arg)
            elif op.startswith(("LOAD_ATTR", "LOAD_METHOD")) and last is not None:
                if last == "np":
                    last = "np.random" if arg == "random" else None
                elif arg == "seed":  # np.random.seed(x) in the item: its numbers are the loop's
                    seeded.add(last)
                    last = None
                elif arg in _draws(last):
                    found.setdefault(f"{last}.{arg}", None)
                    last = None
                else:
                    last = None
            else:
                last = None
    return tuple(f for f in found if f.rpartition(".")[0] not in seeded)
