"""Is there a dask scheduler at ``--address``, and can we talk to it? Said in seconds.

Before a ``Client`` is made for a cluster given by address: dask's own client
waits its whole connect timeout (10 s) at a closed port, and at a port that is
not dask's (an HTTP server) it hung for a minute. Here, in order: dask's TLS
configuration for a ``tls://`` address (``Security()`` reads
``distributed.comm.tls.*``), a plain TCP connection to the host and port, then
dask's handshake and an ``identity`` call, each bounded, each failure a
sentence that names the address and what to check.
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from ...errors import PoolmapError, safe_str

PROBE_TIMEOUT_S = 5.0

TLS_SETTINGS = (
    ("tls_ca_file", "distributed.comm.tls.ca-file"),
    ("tls_client_cert", "distributed.comm.tls.client.cert"),
)
TLS_HOWTO = (
    "a tls:// scheduler needs dask's TLS configuration: distributed.comm.tls.ca-file, "
    "distributed.comm.tls.client.cert and distributed.comm.tls.client.key "
    "(e.g. in ~/.config/dask/distributed.yaml; see docs/security.md)"
)


def check_scheduler(address: str, timeout: float = PROBE_TIMEOUT_S) -> Any:
    """Raise a PoolmapError saying why ``address`` is not a dask scheduler we can use;
    return the ``Security`` to connect with."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.security import Security

    try:
        scheme, loc = parse_address(address)
    except ValueError as exc:
        raise PoolmapError(f"{address!r} is not a dask address: {safe_str(exc)}") from None
    security = Security()
    if scheme == "tls":
        _check_tls_configuration(address, security)
    if scheme not in ("tcp", "tls"):
        return security  # (ucx://, ws://...: dask's client tells)
    try:
        host, port = parse_host_port(loc, 8786)
    except ValueError as exc:
        raise PoolmapError(f"{address!r} is not a dask address: {safe_str(exc)}") from None
    _check_port(address, host, port, timeout)
    _check_dask(address, scheme, security, timeout)
    return security


def _check_tls_configuration(address: str, security: Any) -> None:
    missing = [name for attr, name in TLS_SETTINGS if not getattr(security, attr, None)]
    if missing:
        raise PoolmapError(f"could not connect to the dask scheduler at {address}: {TLS_HOWTO}; not set: {', '.join(missing)}")
    for attr, name in (*TLS_SETTINGS, ("tls_client_key", "distributed.comm.tls.client.key")):
        value = getattr(security, attr, None)
        if value and "\n" not in value and not os.access(value, os.R_OK):  # a path, not PEM text
            raise PoolmapError(f"could not connect to the dask scheduler at {address}: {name} is {value!r}, which cannot be read")


def _check_port(address: str, host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise PoolmapError(f"could not connect to the dask scheduler at {address}: unknown host {host!r} ({exc.strerror})") from None
    except ConnectionRefusedError:
        raise PoolmapError(
            f"could not connect to the dask scheduler at {address}: nothing listens there (connection refused). Is the scheduler "
            f"running? `dask scheduler` prints its address"
        ) from None
    except (socket.timeout, TimeoutError):
        raise PoolmapError(f"could not connect to the dask scheduler at {address}: no answer within {timeout:g} s (host down, or a firewall)") from None
    except OSError as exc:
        raise PoolmapError(f"could not connect to the dask scheduler at {address}: {exc.strerror or safe_str(exc)}") from None


def _check_dask(address: str, scheme: str, security: Any, timeout: float) -> None:
    """dask's handshake and an ``identity`` call: a scheduler answers with its type."""
    from distributed.comm import connect

    async def identity() -> Any:
        comm = await connect(address, timeout=timeout, **security.get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> Any:
        return await asyncio.wait_for(identity(), timeout)

    try:
        info = asyncio.run(bounded())
    except (asyncio.TimeoutError, TimeoutError, OSError, EOFError) as exc:
        if scheme == "tls" and "ssl" in f"{type(exc).__name__} {safe_str(exc)}".lower():
            raise PoolmapError(
                f"could not connect to the dask scheduler at {address}: the TLS handshake failed ({safe_str(exc)}): is it a tls:// "
                f"scheduler, and does distributed.comm.tls.ca-file hold the certificate authority that "
                f"signed its certificate (and its of yours)?"
            ) from None
        tls_hint = "; a tls:// scheduler? Then give tls:// and dask's TLS configuration" if scheme == "tcp" else ""
        raise PoolmapError(
            f"could not connect to the dask scheduler at {address}: something listens there, but it did not answer as a dask "
            f"scheduler within {timeout:g} s (an HTTP server or the dashboard's port? the scheduler's "
            f"address is the one `dask scheduler` prints, tcp://HOST:8786 by default{tls_hint})"
        ) from None
    except Exception as exc:
        raise PoolmapError(f"could not connect to the dask scheduler at {address}: {type(exc).__name__}: {safe_str(exc)}") from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind != "Scheduler":
        what = f"a dask {kind.lower()}" if isinstance(kind, str) else "not a dask scheduler"
        raise PoolmapError(
            f"could not connect to the dask scheduler at {address}: that is {what}, not a scheduler: give the scheduler's address "
            f"(workers are found through it)"
        )
