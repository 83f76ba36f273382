"""The one place a worker reads a map's per-chunk options: ``run_chunk(fn, items, start, options)``.

A local worker process and a thread of the threads backend both call it
(a dask task still unpacks its options itself, in dasktask.py), so an
option used inside the chunk loop is read here once for them, not unpacked
again by each backend. What an option does before a chunk ever runs is
elsewhere: ``kwargs`` and ``repeat`` are bound into the function by the API,
``retries``/``retry_on`` are the Job's, ``threads`` is applied with the
map's context, ``timeout``/``max_memory`` are enforced by the backend.
"""
from __future__ import annotations

from typing import Any, Callable

from .core import chunk as _chunk
from .mapoptions import MapOptions


def run_chunk(fn: Callable, items: Any, start: int, options: MapOptions, *, timed: bool = False,
              progress: Callable[[int], None] | None = None, indices: tuple | None = None,
              redirect: Callable | None = None) -> tuple[list, float, float, list | None, list, list]:
    """Run one chunk under ``options``: (results, t0, t1, item times, output records, packed errors).

    ``redirect``: how print() output is captured (see ``chunk.run_chunk``);
    a process worker swaps sys.stdout, a thread routes its own writes.
    """
    return _chunk.run_chunk(fn, items, start, star=options.star, timed=timed, keep_going=options.keep_going,
                            seed=options.seed, progress=progress, indices=indices, redirect=redirect)
