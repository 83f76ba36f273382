"""Choosing a backend by name: ``Pool(backend="dask", address=...)``."""
from __future__ import annotations

import importlib.util

from ..errors import BadInputError
from .base import Backend
from .local import LocalBackend

NAMES = ("local", "dask")


def make_backend(backend: "Backend | str | None", size: int, start_method: str | None = None,
                 address: str | None = None, dashboard: bool = False) -> Backend:
    """A Backend instance, a backend's name, or None (the local backend)."""
    if isinstance(backend, Backend):
        if address is not None:
            raise BadInputError("address= goes with backend=\"dask\", not with a backend instance")
        return backend
    name = "dask" if backend is None and address is not None else (backend or "local")
    if name == "local":
        if address is not None:
            raise BadInputError("the local backend takes no address; did you mean backend=\"dask\"?")
        if dashboard:
            raise BadInputError("the dashboard is dask's: it goes with backend=\"dask\"")
        return LocalBackend(size, start_method)
    if name == "dask":
        if importlib.util.find_spec("distributed") is None:
            raise BadInputError(
                'the dask backend needs dask.distributed, which is not installed: pip install "poolmagic[dask]"'
            )
        from .dask.backend import DaskBackend

        if dashboard and address is not None:
            raise BadInputError("dashboard= starts the dashboard of a LocalCluster poolmagic starts; "
                                "a cluster at an address has its own (dask scheduler --dashboard-address)")
        return DaskBackend(size, address, dashboard)
    raise BadInputError(f"unknown backend {name!r}; the backends are: {', '.join(NAMES)}")
