"""What a map does unlike the plain loop, said as notes on its report before it runs.

Workers are other processes: they get copies of the items and of what the
function reads, and hash str with seeds of their own. Where the function's
code shows it relies on what a copy cannot give (a global it assigns or
changes in place, an argument it changes and does not return, a generator or
iterator of the notebook it draws from, ``hash()``), or on what ``--seed``
cannot reach (a generator made without a seed), the map says so: the results
then differ from the loop's, and nothing else would tell. Each check reads the
function's code and the values it captures, not the items: no cost per item.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any, Callable

from .engine.mapoptions import MapOptions
from .captures import assigned_globals, called_function, global_names, shared_generators, unseeded_calls
from .globalstreams import global_draws
from .inplace import changed_globals, changed_parameter, changed_receiver, kept_state
from .serialize import _UNSET, _fingerprint


def loop_notes(func: Callable, name: str, o: MapOptions, copies: bool, fp: Any = _UNSET) -> list[str]:
    """The notes for mapping ``func`` (the user's, before --kw and --repeat wrap it) with ``o``;
    ``copies``: the backend runs it in other processes (not the threads backend).

    A function whose captured values are all immutable (numbers, strings, tuples of them,
    modules: serialize's fingerprint, which dump_function takes anyway) has notes that follow
    from its code alone: they are kept by that fingerprint, and only the --kw values are
    looked at again (a walk of the globals cost ~10 µs of a warm 4-item cell). ``fp``: that
    fingerprint, made already."""
    if fp is _UNSET:
        fp = _fingerprint(func)
    if fp is None:
        return _notes(func, name, o, copies)
    key = (fp, name, copies, o.seed is not None, o.star, o.repeat is None)
    notes = _BY_CODE.get(key)
    if notes is None:
        notes = _BY_CODE[key] = tuple(_notes(func, name, o.with_(kwargs=None), copies))
        if len(_BY_CODE) > 256:
            del _BY_CODE[next(iter(_BY_CODE))]
    if copies and o.kwargs:
        generators = shared_generators(None, o.kwargs)
        if generators:
            return [*notes, _generators_note(name, generators)]
    return list(notes)


_BY_CODE: dict = {}


def _notes(func: Callable, name: str, o: MapOptions, copies: bool) -> list[str]:
    notes = []
    if copies:
        written = assigned_globals(func)
        if written:
            notes.append(_globals_note(name, written))
        changed = changed_globals(func)
        if changed:
            notes.append(_globals_note(name, changed, "changes", " in place"))
        generators = shared_generators(func, o.kwargs)
        if generators:
            notes.append(_generators_note(name, generators))
        receiver = changed_receiver(func)
        if receiver is not None:
            notes.append(f"{name}() changes its {receiver} in place: each worker changes its own copy, so the "
                         f"notebook's {receiver} stays as it was (a plain loop would change it); map a function "
                         f"that returns what to keep, and collect the results")
        state = kept_state(func)
        if state:
            notes.append(f"{name}() keeps state from one call to the next in {' and '.join(state)}: each worker "
                         f"keeps its own copy, so a call sees only the calls its worker ran before it, not every "
                         f"earlier item as in a plain loop, and the notebook's copy does not change; compute what "
                         f"each item needs from the item itself and combine the results afterwards")
    if o.seed is None:
        draws = global_draws(func)
        if draws:
            how = ("each worker process has a random stream of its own, which random.seed() or np.random.seed() "
                   "in the notebook does not reach, so the numbers differ from a plain loop's" if copies else
                   "the threads draw from the notebook's stream in the order they run, so which item gets "
                   "which number differs from a plain loop's")
            notes.append(f"{name}() draws from {', '.join(f'{d}()' for d in draws)} without --seed: {how}, and "
                         f"from run to run; add --seed S for the same numbers in every run")
    if o.seed is not None:
        unseeded = unseeded_calls(func)
        if unseeded:
            calls = ", ".join(f"{n}()" for n in unseeded)
            notes.append(f"{name}() calls {calls} without a seed: --seed does not reach "
                         f"{'it' if len(unseeded) == 1 else 'them'}, so the numbers drawn that way differ in every "
                         f"run; use poolmagic.item_rng(), or pass poolmagic.item_seed() as the seed")
    if copies and _calls_hash(func):
        notes.append(f"{name}() calls hash(): a str or bytes hashes to another number in each worker process "
                     f"than here (Python randomises it per process), so a result that depends on it, or on "
                     f"the order of a set of str, differs from a plain loop's; start Jupyter with "
                     f"PYTHONHASHSEED=0 for the same numbers everywhere, or use hashlib")
    if copies and o.repeat is None:
        param = changed_parameter(func, o.star)
        if param is not None:
            notes.append(f"{name}() returns nothing and changes its argument {param!r} in place: the workers "
                         f"change their copies of the items, yours stay as they were (a plain loop would "
                         f"change them); return the changed item and use the results")
    return notes


def _globals_note(name: str, written: tuple[str, ...], verb: str = "assigns", how: str = "") -> str:
    """What a map of a function that assigns globals (or changes them in place: ``out.append(x)``)
    changes: each worker's copy, not the notebook's."""
    names = ", ".join(repr(n) for n in written)
    one = len(written) == 1
    return (f"{name}() {verb} the global{'' if one else 's'} {names}{how} in the workers: the notebook's "
            f"{'does' if one else 'do'} not change (in a plain loop {'it' if one else 'they'} would)")


def _generators_note(name: str, generators: list[str]) -> str:
    """What a map of a function that draws from a generator (or an iterator) of the notebook gets: copies."""
    one = len(generators) == 1
    return (f"{name}() draws from {'; and '.join(generators)}: each worker draws from a copy of "
            f"{'it' if one else 'each'} as it was when the map started, so workers repeat each other's draws "
            f"and the notebook's {'does' if one else 'do'} not move on (a plain loop draws on from one "
            f"stream); draw random numbers from np.random, random or poolmagic.item_rng() instead (per item, "
            f"and reproducible with --seed), and number items by their position (enumerate) rather than next()")


def _calls_hash(func: Callable) -> bool:
    """``func`` (or a notebook helper it calls) uses the builtin ``hash`` while str hashes are
    randomised per process (the kernel started without a fixed PYTHONHASHSEED: the workers get
    other numbers; one set in a cell does not reach this process's own)."""
    seen: set[int] = set()
    todo = [func]
    while todo and len(seen) < 50:
        f = called_function(todo.pop())
        if not isinstance(f, types.FunctionType) or id(f) in seen:
            continue
        seen.add(id(f))
        g = f.__globals__
        for n in global_names(f):
            if n == "hash" and n not in g:
                return _random_hash_seed()
            value = g.get(n)
            if isinstance(value, types.FunctionType) and value.__globals__ is g:
                todo.append(value)
    return False


def _random_hash_seed() -> bool:
    """This process hashes str with a random seed: PYTHONHASHSEED was not fixed when it started."""
    if not sys.flags.hash_randomization:
        return False
    try:
        with open("/proc/self/environ", "rb") as f:  # the environment it started with (Linux)
            start = dict(e.partition(b"=")[::2] for e in f.read().split(b"\0") if b"=" in e)
        seed = start.get(b"PYTHONHASHSEED", b"random").decode("ascii", "replace")
    except OSError:
        seed = os.environ.get("PYTHONHASHSEED", "random")
    return seed == "random"
