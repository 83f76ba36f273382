"""poolmagic: one-line process parallelism for Jupyter and IPython.

``%load_ext poolmagic`` registers ``%%poolmap`` and ``%poolsize``. The same
engine is available without IPython as ``poolmagic.Pool`` and ``pmap``.

Public names are imported on first use (PEP 562), so that worker processes,
which import ``poolmagic.engine.worker``, do not pay for the parent's API.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Pool": "api",
    "MapHandle": "maphandle",
    "AsyncResult": "mpcompat",
    "Executor": "executor",
    "pmap": "api",
    "get_pool": "api",
    "shutdown_pool": "api",
    "set_pool": "api",
    "MapOptions": "engine.mapoptions",
    "trust_checkpoint": "checkpointtrust",
    "RunReport": "report",
    "NOT_DONE": "sentinel",
    "PoolmapError": "errors",
    "BadInputError": "errors",
    "SerializationError": "errors",
    "WorkerCrashedError": "errors",
    "ItemTimeoutError": "errors",
    "ItemPicklingError": "errors",
    "MapFailedError": "errors",
    "item_seed": "engine.seeds",
    "item_rng": "engine.seeds",
    "load_ipython_extension": "extension",
    "unload_ipython_extension": "extension",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # noqa: ANN201
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'poolmagic' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
