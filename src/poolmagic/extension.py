"""Loading and unloading the IPython extension, and stopping cleanly.

``load_ipython_extension`` registers one PoolMagics instance, starts the pool
warming up in the background (so the first map does not wait for processes)
and hooks shutdown. ``unload_ipython_extension`` undoes every one of those.

Kernel shutdown: ipykernel terminates the children of the kernel with
SIGTERM in growing steps; multiprocessing's resource tracker ignores SIGTERM,
which would hold a shutdown for seconds. So poolmagic stops its workers, the
forkserver and the tracker itself as soon as the kernel is asked to shut down.
"""
from __future__ import annotations

import atexit
from typing import Any

from .lifecycle import prestart, stop_helpers


class _Extension:
    """The state one loaded extension holds, so unloading can undo it all."""

    def __init__(self, ip: Any):
        from .magics import PoolMagics

        self.ip = ip
        self.magics = PoolMagics(ip)
        self.kernel = getattr(ip, "kernel", None)
        self._orig_shutdown = None

    def load(self) -> None:
        self.ip.register_magics(self.magics)
        if self.kernel is not None and hasattr(self.kernel, "do_shutdown"):
            orig = self.kernel.do_shutdown
            self._orig_shutdown = orig

            def do_shutdown(restart: bool, _orig=orig) -> Any:
                stop_everything()
                return _orig(restart)

            self.kernel.do_shutdown = do_shutdown
        atexit.register(stop_everything)
        from .api import get_pool

        get_pool().start()

    def unload(self) -> None:
        mm = self.ip.magics_manager
        for kind, names in (("line", ("poolmap", "poolsize", "pooldebug")), ("cell", ("poolmap",))):
            for name in names:
                mm.magics[kind].pop(name, None)
        mm.registry.pop(type(self.magics).__name__, None)
        if self.kernel is not None and self._orig_shutdown is not None:
            try:
                del self.kernel.do_shutdown  # the instance attribute we set
            except AttributeError:
                pass
        atexit.unregister(stop_everything)
        from .api import shutdown_pool

        shutdown_pool()
        stop_helpers()


_loaded: _Extension | None = None


def stop_everything() -> None:
    """Stop the shared pool and multiprocessing's helper processes now."""
    from .api import shutdown_pool

    shutdown_pool()
    stop_helpers(tracker=True)


def load_ipython_extension(ip: Any) -> None:
    global _loaded
    if _loaded is not None:
        return
    prestart()  # first: the forkserver boots while the rest of poolmagic is imported
    from .engine.runtimedir import remove_stale

    remove_stale()  # what kernels of this user that were SIGKILLed left in /tmp
    _loaded = _Extension(ip)
    _loaded.load()


def unload_ipython_extension(ip: Any) -> None:
    global _loaded
    if _loaded is None:
        return
    _loaded.unload()
    _loaded = None
