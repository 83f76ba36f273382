"""The worker processes of our LocalCluster, forked from a server that has imported dask.

A dask nanny starts its worker with multiprocessing's "spawn": a fresh Python
that imports distributed, ~0.5 s of CPU, which is also what a killed worker's
replacement costs after an interrupt, a timeout or a crash, while the next
map waits. Forked from a server that imported distributed (and the kernel's
numpy and pandas) once, two replacements are up in 0.09 s instead of 0.26 s
(docs/design.md, "Workers forked from a server that has imported dask").

multiprocessing keeps one forkserver per process, and the local backend's
preloads poolmagic's own worker. This module runs a second one, a
``ForkServer`` instance of its own, and gives dask a context whose processes
it forks. Only poolmagic's nannies use it: ``PoolNanny`` sets ``OURS`` while
it starts a worker, and dask's ``get_mp_context`` answers with ``CONTEXT``
then; any other dask cluster in the kernel gets dask's own context.

What a forked worker does differently from a spawned one is in
``preload.dask_setup``: it lets go of the server's "alive" pipe, dies
with the server, and the server, once the kernel is gone, kills the process
group of each worker it forked (``serverhooks``), with whatever the mapped
function started. The server's environment is the kernel's when it started:
dask's ``pre-spawn-environ`` does not reach forked workers (BLAS threads are
limited per map by the context, as in local workers).
"""
from __future__ import annotations

import contextvars
import multiprocessing as mp
import os
import signal
import time
import types
from multiprocessing import context as _context
from multiprocessing import forkserver as _forkserver
from typing import Any

from ..processes import (
    SERVER_HOOKS,
    block_sigint,
    default_start_method,
    start_resource_tracker,
)
from ..warm import warm_modules

# set by PoolNanny while it starts a worker process: dask then gets CONTEXT
OURS: contextvars.ContextVar[bool] = contextvars.ContextVar("poolmagic_dask_worker", default=False)
STOP_WAIT_S = 1.0

# What the server imports once: its exit hook first, then what a worker needs.
BASE_PRELOAD = (
    SERVER_HOOKS,
    "distributed",
    "poolmagic.engine.dask.task",
    "poolmagic.engine.dask.preload",
    "threadpoolctl",
)


def usable() -> bool:
    """Whether this platform has forkserver and poolmagic was not told to spawn."""
    return default_start_method() == "forkserver" and "forkserver" in mp.get_all_start_methods()


class _ServerModule:
    """What the stdlib's forkserver launch code sees as the ``forkserver`` module: our server."""

    def __init__(self, server: _forkserver.ForkServer):
        self._server = server

    def __getattr__(self, name: str) -> Any:
        if name == "connect_to_new_process":
            return self._server.connect_to_new_process
        return getattr(_forkserver, name)


def _rebound(fn: types.FunctionType, **names: Any) -> types.FunctionType:
    """``fn`` itself, the stdlib's code unchanged, with some of its module's names replaced."""
    scope = dict(fn.__globals__)
    scope.update(names)
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


SERVER = _forkserver.ForkServer()
_USERS = 0  # LocalClusters of ours that may still fork from SERVER

if usable():
    from multiprocessing import popen_forkserver as _popen_forkserver

    class _Popen(_popen_forkserver.Popen):
        """Launches through SERVER instead of multiprocessing's own forkserver."""

        _launch = _rebound(_popen_forkserver.Popen._launch, forkserver=_ServerModule(SERVER))

    class _Process(_context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            return _Popen(process_obj)

    class _Context(_context.ForkServerContext):
        Process = _Process  # type: ignore[assignment]

    CONTEXT: Any = _Context()
else:
    CONTEXT = None


def start() -> None:
    """Boot the server now, for one more cluster (it imports in the background; returns at once).

    Called on the dask manager thread, with SIGINT blocked there: the server
    and the workers it forks inherit the mask, so an interrupt cannot reach
    a worker before ``preload`` has set its handler (which unblocks it).
    """
    global _USERS
    if CONTEXT is None:
        return
    start_resource_tracker()
    block_sigint()  # after the tracker: starting it unblocks SIGINT
    with SERVER._lock:
        _USERS += 1
        SERVER.set_forkserver_preload([*BASE_PRELOAD, *warm_modules()])
    SERVER.ensure_running()


def release() -> None:
    """One cluster fewer; the last one stops the server (it kills any child it left)
    and gives dask its own process context back."""
    global _USERS
    with SERVER._lock:
        if _USERS == 0:
            return
        _USERS -= 1
        if _USERS:
            return
    _stop()
    uninstall()


def _stop() -> None:
    with SERVER._lock:
        fd, pid = SERVER._forkserver_alive_fd, SERVER._forkserver_pid
        address = SERVER._forkserver_address
        SERVER._forkserver_alive_fd = SERVER._forkserver_pid = None
        SERVER._forkserver_address = None
    if address and isinstance(address, str) and not address.startswith("\0"):
        try:
            os.unlink(address)  # its socket file (the stdlib's own stop does this too)
        except OSError:
            pass
    if fd is not None:
        try:
            os.close(fd)  # the server exits when its last "alive" writer is gone
        except OSError:
            pass
    if pid is None:
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            return
        time.sleep(0.005)


def server_pid() -> int | None:
    return SERVER._forkserver_pid


_ORIGINALS: dict[Any, Any] = {}  # module -> dask's own get_mp_context, while ours is installed


def install() -> None:
    """Make dask's ``get_mp_context`` answer CONTEXT for poolmagic's nannies (OURS)."""
    if CONTEXT is None:
        return
    import distributed.nanny
    import distributed.process

    for module in (distributed.process, distributed.nanny):
        original = getattr(module, "get_mp_context", None)
        if original is None or getattr(original, "_poolmagic", False):
            continue

        def get_mp_context(original: Any = original) -> Any:
            return CONTEXT if OURS.get() else original()

        get_mp_context._poolmagic = True  # type: ignore[attr-defined]
        _ORIGINALS[module] = original
        module.get_mp_context = get_mp_context


def uninstall() -> None:
    """Give dask its own ``get_mp_context`` back (the last cluster of ours has closed)."""
    for module, original in list(_ORIGINALS.items()):
        if getattr(getattr(module, "get_mp_context", None), "_poolmagic", False):
            module.get_mp_context = original
        del _ORIGINALS[module]
