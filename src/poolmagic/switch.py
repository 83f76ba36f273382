"""``%poolsize --backend dask [--address ADDR]``, ``--backend threads``, ``--backend local``: swap the shared pool.

The new pool is started, and for dask waited for (cluster up or connected),
before it replaces the old one; if it cannot start, the old pool stays and
the error says why. The old pool is then shut down (a LocalCluster it
started goes with it; a cluster at an address is only disconnected from).
"""
from __future__ import annotations

import warnings

from .api import Pool, get_pool, set_pool
from .errors import BadInputError

READY_TIMEOUT_S = 60.0


def switch_backend(name: str | None, address: str | None, timeout: float = READY_TIMEOUT_S,
                   size: int | None = None, dashboard: bool = False) -> Pool:
    """Make a pool on backend ``name`` ("local", "dask") the shared one; returns it.

    ``size``: its workers (``%poolsize 4 --backend dask`` starts 4, not 2 then 2 more).
    """
    name = backend_name(name, address)
    if name != "dask" and address:
        raise BadInputError(f"--address goes with --backend dask (the {name} backend has no address)")
    old = get_pool()
    if _same(old, name, address) and dashboard == old.backend.dashboard:
        return old
    # A LocalCluster or a local pool is sized like the pool it replaces; leaving a
    # remote cluster, the local pool takes the cores (not the cluster's size).
    if size is None:
        size = None if old.backend.address else old.size
    with warnings.catch_warnings():  # %poolsize prints its note on the size itself: not twice
        warnings.filterwarnings("ignore", message=r"\d+ workers on \d+ cores?:", category=UserWarning)
        new = Pool(size, backend=name, address=address, dashboard=dashboard)
    new.threads = old.threads
    try:
        new.start()
        new.backend.wait_ready(timeout)
    except BaseException:
        new.shutdown()
        raise
    return set_pool(new)


def backend_name(name: str | None, address: str | None) -> str:
    """The backend ``--backend NAME --address ADDR`` means: dask when only an address is given."""
    return name or ("dask" if address else "local")


def is_current(pool: Pool, name: str | None, address: str | None) -> bool:
    """Whether ``pool`` already is the backend asked for (switching is then nothing to do)."""
    return _same(pool, backend_name(name, address), address)


def _same(pool: Pool, name: str, address: str | None) -> bool:
    backend = pool.backend
    if backend.name != name or backend.closed:
        return False
    return backend.address == address
