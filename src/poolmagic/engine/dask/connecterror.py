"""Why a dask cluster cannot be reached, in words; what a failed connection left behind, closed.

The dask backend fails its maps with this error when its LocalCluster does
not start or its remote scheduler cannot be reached (or reached again after
the connection was lost): the error names where it tried, and how to set up
TLS where that is what failed.
"""
from __future__ import annotations

import contextlib

from distributed import Client

from ...errors import PoolmapError, safe_str


def connect_error(exc: BaseException, address: str | None, again: bool = False) -> PoolmapError:
    """Why the cluster at ``address`` (None: our own LocalCluster) cannot be reached.

    ``again``: the connection was lost in use and could not be made anew.
    """
    where = "start a dask LocalCluster" if address is None else f"connect to the dask scheduler at {address}"
    if again:
        where = f"connect again to the dask scheduler at {address} after losing the connection"
    # A Client(...) that fails after starting its event loop (a tls:// address
    # without dask's TLS configuration) leaves a half-made client in a cycle:
    # closed only at interpreter exit, where that took 20 s. Close it now.
    _close_clients_in(exc)
    _drop_frames(exc)
    if isinstance(exc, PoolmapError) and again:  # (address.py's checks: said once, with "again")
        reason = str(exc).removeprefix(f"could not connect to the dask scheduler at {address}: ")
        return PoolmapError(f"could not {where}: {reason}")
    if isinstance(exc, PoolmapError):
        return exc
    hint = ""
    if (address or "").startswith("tls://") and "ssl" in safe_str(exc).lower():
        hint = (" (a tls:// scheduler needs dask's TLS configuration: distributed.comm.tls.ca-file, "
                ".client.cert and .client.key, e.g. in ~/.config/dask/distributed.yaml)")
    err = PoolmapError(f"could not {where}: {type(exc).__name__}: {safe_str(exc)}{hint}")
    err.__cause__ = exc
    return err


def _close_clients_in(exc: BaseException) -> None:
    """Close the dask clients whose methods ``exc`` came through (``self`` of its frames)."""
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, Client) and obj.status != "closed":
            with contextlib.suppress(Exception):
                obj.close(2)
        tb = tb.tb_next


def _drop_frames(exc: BaseException | None) -> None:
    """Forget the tracebacks of ``exc`` and the exceptions it chains to (the messages stay)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
