"""Backends with processes to stop when the interpreter exits or a bare ``os.fork()`` copies it.

Each backend kind keeps its own list (an ``ExitList``) made when its module
is imported: atexit runs handlers last-in first-out, so a list made after
multiprocessing's (or dask's) own exit handler was registered runs before it
and stops our workers first.
"""
from __future__ import annotations

import atexit
import os
import weakref
from typing import Any


class ExitList:
    """Started backends: shut down at exit; with ``disown_at_fork``, disowned in a forked child."""

    def __init__(self, disown_at_fork: bool = False) -> None:
        self._started: weakref.WeakSet[Any] = weakref.WeakSet()
        atexit.register(self.shutdown_all)
        if disown_at_fork and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.disown_all)

    def add(self, backend: Any) -> None:
        self._started.add(backend)

    def discard(self, backend: Any) -> None:
        self._started.discard(backend)

    def others(self, backend: Any) -> list[Any]:
        """The started backends other than ``backend``."""
        return [b for b in list(self._started) if b is not backend]

    def shutdown_all(self) -> None:
        """Shut every started backend down; one that fails does not keep the others up."""
        for backend in list(self._started):
            try:
                backend.shutdown()
            except Exception:
                pass

    def disown_all(self) -> None:
        for backend in list(self._started):
            backend.disown()
