"""print() inside items that run on threads: each thread's writes go to its own chunk's capture.

A worker process swaps ``sys.stdout`` for the length of a chunk; threads share
one ``sys.stdout``, so while any chunk runs on a thread a router stands in for
it: a write from a thread running a chunk is filed under that chunk's current
item (``chunk._Capture``), any other write (the caller printing earlier items'
output, the kernel, a thread the function started) goes where it went before.
The router is put in place by the first running chunk and taken away by the
last, so between maps ``sys.stdout`` is untouched.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable

_local = threading.local()  # .stdout / .stderr: the capture of the chunk this thread runs
_lock = threading.Lock()
_users = 0  # chunks running on threads now


class Router:
    """Stands in for sys.stdout or sys.stderr: this thread's capture if it has one, else ``target``."""

    def __init__(self, target: Any, name: str):
        self.target, self._name = target, name

    def write(self, s: str) -> int:
        cap = getattr(_local, self._name, None)
        return (cap if cap is not None else self.target).write(s)

    def flush(self) -> None:
        if getattr(_local, self._name, None) is None:
            self.target.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, ... of the real stream
        return getattr(self.target, name)


def redirect(out: Any, err: Any) -> Callable[[], None]:
    """Send this thread's writes to ``out``/``err`` (``chunk.run_chunk``'s ``redirect``); returns the undo."""
    global _users
    with _lock:
        if not isinstance(sys.stdout, Router):
            sys.stdout = Router(sys.stdout, "stdout")
        if not isinstance(sys.stderr, Router):
            sys.stderr = Router(sys.stderr, "stderr")
        _users += 1
    _local.stdout, _local.stderr = out, err

    def undo() -> None:
        global _users
        _local.stdout = _local.stderr = None
        with _lock:
            _users -= 1
            if _users == 0:
                for name in ("stdout", "stderr"):
                    stream = getattr(sys, name)
                    if isinstance(stream, Router):
                        setattr(sys, name, stream.target)

    return undo
