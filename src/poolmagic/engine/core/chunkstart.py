"""The steps before ``run_chunk`` in a worker, the same on every backend that runs in processes.

A local worker process (engine/worker.py) and a dask task (engine/dask/task.py)
both, for each chunk: apply the map's context (cwd, environment, sys.path,
native thread limit), load the function through this process's cache of
function versions, and decode the items. Each step that fails fails the chunk
with its stage name ("context", "load", "decode") and the packed error, which
the backend sends back its own way (a ``ChunkFailed`` message, a ``("failed",
...)`` tuple).

Only the thread that runs chunks calls these: the user's bytes (function,
items) are unpickled there and nowhere else (design.md, "The worker loop").
"""
from __future__ import annotations

import mmap
import os
import pickle
from collections import OrderedDict
from typing import Any, Callable

from ...errors import pack_exception
from .chunk import PKG_DIR
from .runchunk import CACHE_SIZE


NOT_SENT = object()  # a context version this process never received (a bug: the parent mirrors its cache)


class StageFailed(Exception):
    """A step before the chunk's items ran failed: ``stage`` and the packed error."""

    def __init__(self, stage: str, packed: dict):
        super().__init__(stage)
        self.stage, self.packed = stage, packed


class Pickled:
    """A function version still as bytes (and out-of-band buffers): unpickled when first run."""

    __slots__ = ("data", "buffers")

    def __init__(self, data: bytes, buffers: list | None):
        self.data, self.buffers = data, buffers

    def load(self) -> Any:
        return pickle.loads(self.data, buffers=self.buffers)


class FunctionCache:
    """This process's function versions by key, the last ``size`` of them.

    An entry is the loaded function, or something with ``load()`` (a ``Pickled``
    a local worker received ahead of its first chunk) loaded on first use.
    ``by_use``: a version used moves to the end (dask: nothing mirrors this
    cache). A local worker's parent mirrors its cache in the order it *sent*
    the versions (handle.py), so there use must not reorder it: otherwise the
    two would evict different versions and the parent would send a chunk for
    one the worker dropped.
    """

    def __init__(self, size: int = CACHE_SIZE, by_use: bool = False):
        self.size, self.by_use = size, by_use
        self.entries: OrderedDict[str, Any] = OrderedDict()

    def put(self, key: str, entry: Any) -> None:
        entries = self.entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def get(self, key: str, source: Any = None) -> Callable:
        """The function of version ``key``; ``source`` (with ``load()``) when this process has none."""
        fn = self.entries.get(key)
        if fn is None:
            if source is None:
                raise RuntimeError("poolmagic: the function was not sent to this worker")
            fn = source.load()
            self.put(key, fn)
            return fn
        if type(fn) is Pickled:  # still bytes: loaded here, on the thread that runs chunks
            fn = self.entries[key] = fn.load()  # its place in the order stays
        if self.by_use:
            self.entries.move_to_end(key)
        return fn


def start_chunk(applier: Any, context: Any, functions: FunctionCache, key: str, items: Any,
                frames: list | None = None, source: Any = None) -> tuple[Callable, Any]:
    """Apply ``context`` (None: leave it), load function ``key``, decode ``items``; raises StageFailed.

    ``context``: NOT_SENT fails the chunk at the "context" stage.
    ``items``: a ``range`` (as is), pickled bytes (with ``frames``, their
    out-of-band buffers) or an object with ``load()`` (a dask ``Blob``).
    """
    if context is not None:
        try:
            if context is NOT_SENT:
                raise RuntimeError("poolmagic: the map's context was not sent to this worker")
            applier.apply(context)
        except BaseException as exc:
            raise StageFailed("context", pack_exception(exc, PKG_DIR)) from None
    try:
        fn = functions.get(key, source)
    except BaseException as exc:
        raise StageFailed("load", pack_exception(exc, PKG_DIR)) from None
    if type(items) is not range:
        try:
            items = pickle.loads(items, buffers=frames) if type(items) is bytes else items.load()
        except BaseException as exc:
            raise StageFailed("decode", pack_exception(exc, PKG_DIR)) from None
    return fn, items


def map_shared(fd: int, sizes: tuple) -> list:
    """Buffers of ``sizes`` mapped copy-on-write from ``fd`` (a memfd): the function may change its arrays privately.

    Closes ``fd``.
    """
    try:
        m = mmap.mmap(fd, sum(sizes), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    view, bufs, offset = memoryview(m), [], 0
    for size in sizes:
        bufs.append(view[offset : offset + size])
        offset += size
    return bufs
