"""Keep a dask worker's own threads off the ``random`` stream a seeded item draws from.

A dask worker process runs its event loop in its main thread and (de)serializes
big messages in "Dask-Offload" threads, while our chunk runs in an executor
thread. dask draws from the module-level ``random`` there: compression samples a
payload of 10 kB or more with ``random.randint`` before it sends it (a result
the kernel fetches while the next item runs), ``sizeof`` samples big
collections, a connection's backoff is random. Each draw moved the stream of
the item running meanwhile: ``--seed S`` gave item i other numbers than the
local backend, in 5 runs of 5 of a 40-item map whose items returned 200 kB
(issue 22).

``isolate()`` gives dask's threads a ``random.Random`` of their own: the
module-level functions (``random.random``, ``random.seed``, …) answer from the
private instance in those threads and from the global one everywhere else
(our chunk's thread and any thread its items start), and the functions dask
imported by name (``from random import randint``) are rebound to the private
instance. numpy's global generator is untouched: dask draws from it only to
size pandas object columns, which our tasks never hold (results travel
pickled).
"""
from __future__ import annotations

import random
import sys
import threading
from typing import Any, Callable

PRIVATE = random.Random()  # dask's own draws
_GLOBAL = random._inst  # type: ignore[attr-defined]  # what the module-level functions use
# the module-level functions that are methods of the global instance (random, seed, getrandbits, ...)
NAMES = tuple(n for n in random.__all__ if getattr(getattr(random, n, None), "__self__", None) is _GLOBAL)
DASK_MODULES = ("distributed", "dask", "tornado")
_installed = False


def is_dask_thread(thread: threading.Thread | None = None) -> bool:
    """A thread of the dask worker itself: its event loop (the main thread) or an offload thread."""
    t = thread or threading.current_thread()
    return t is threading.main_thread() or t.name.startswith("Dask-Offload")


def _dispatch(name: str) -> Callable[..., Any]:
    mine, theirs = getattr(_GLOBAL, name), getattr(PRIVATE, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        return (theirs if is_dask_thread() else mine)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = mine.__doc__
    return call


def isolate() -> None:
    """Install the split in this process (a dask worker's); once, idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in NAMES:
        setattr(random, name, _dispatch(name))
    for modname, mod in list(sys.modules.items()):
        if mod is None or modname.split(".")[0] not in DASK_MODULES:
            continue
        for attr, value in list(vars(mod).items()):
            if getattr(value, "__self__", None) is _GLOBAL and attr != "_inst":
                setattr(mod, attr, getattr(PRIVATE, value.__name__))
