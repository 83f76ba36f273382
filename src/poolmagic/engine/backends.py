"""Choosing a backend by name: ``Pool(backend="dask", address=...)``, ``%poolsize --backend NAME``.

A backend joins by being registered: ``register(name, factory, needs=..., extra=...)``
(see the end of this module for the built-in ones); nothing else names it.
The factory gets the pool's size and the options of ``Pool()``, refuses those
it does not take, and imports its module only when called, so that a backend
whose package is missing costs nothing until it is asked for.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple

from ..errors import BadInputError
from .base import Backend


# factory(size, *, start_method, address, dashboard) -> Backend
Factory = Callable[..., Backend]


class Entry(NamedTuple):
    name: str
    factory: Factory
    needs: str | None = None  #: a module it imports ("distributed"): refused with a hint when missing
    extra: str | None = None  #: the pip extra that installs it (``pip install "poolmagic[dask]"``)
    what: str = ""  #: what ``needs`` is, for the refusal ("dask.distributed")


_REGISTRY: dict[str, Entry] = {}


def register(name: str, factory: Factory, *, needs: str | None = None, extra: str | None = None,
             what: str = "") -> None:
    """Make ``backend=name`` (and ``%poolsize --backend name``) build a backend with ``factory``."""
    _REGISTRY[name] = Entry(name, factory, needs, extra, what or (needs or ""))


def names() -> list[str]:
    """The registered backends' names, in the order they were registered."""
    return list(_REGISTRY)


def make_backend(backend: "Backend | str | None", size: int, start_method: str | None = None,
                 address: str | None = None, dashboard: bool = False) -> Backend:
    """A Backend instance, a backend's name, or None (the local backend; dask with an address)."""
    if isinstance(backend, Backend):
        if address is not None:
            raise BadInputError("address= goes with backend=\"dask\", not with a backend instance")
        return backend
    name = "dask" if backend is None and address is not None else (backend or "local")
    entry = _REGISTRY.get(name)
    if entry is None:
        raise BadInputError(f"unknown backend {name!r}; the backends are: {', '.join(names())}")
    if entry.needs is not None and importlib.util.find_spec(entry.needs) is None:
        raise BadInputError(f"the {name} backend needs {entry.what}, which is not installed: "
                            f"pip install \"poolmagic[{entry.extra or name}]\"")
    made = entry.factory(size, start_method=start_method, address=address, dashboard=dashboard)
    made.name = name  # the registry names what it makes
    return made


# ------------------------------------------------------------------ the built-in backends
def _local(size: int, *, start_method: str | None, address: str | None, dashboard: bool) -> Backend:
    if address is not None:
        raise BadInputError("the local backend takes no address; did you mean backend=\"dask\"?")
    if dashboard:
        raise BadInputError("the dashboard is dask's: it goes with backend=\"dask\"")
    from .local import LocalBackend

    return LocalBackend(size, start_method)


def _dask(size: int, *, start_method: str | None, address: str | None, dashboard: bool) -> Backend:
    if dashboard and address is not None:
        raise BadInputError("dashboard= starts the dashboard of a LocalCluster poolmagic starts; "
                            "a cluster at an address has its own (dask scheduler --dashboard-address)")
    from .dask.backend import DaskBackend

    return DaskBackend(size, address, dashboard)


register("local", _local)
register("dask", _dask, needs="distributed", extra="dask", what="dask.distributed")


def _threads(size: int, *, start_method: str | None, address: str | None, dashboard: bool) -> Backend:
    from .threads import ThreadsBackend

    return ThreadsBackend.make(size, address, dashboard)


register("threads", _threads)
