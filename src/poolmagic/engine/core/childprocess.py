"""What every worker process does to itself at start, whichever backend started it.

A local worker (engine/worker.py) and a dask worker of our LocalCluster
(engine/dask/preload.py), both forked by a forkserver of ours, let go of the
server's "alive" pipe and ask the kernel to kill them when their parent dies,
and get the ``display()`` a loop in the notebook finds among IPython's builtins.
"""
from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, GIL or not."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(0)


def release_forkserver_pipe() -> bool:
    """Close the forkserver's "alive" pipe, which multiprocessing hands every child;
    True if this process is such a child (False: it was spawned, or is a server).

    The forkserver exits when every writer of that pipe is gone; it is meant to
    be the kernel alone. A worker holding it kept the forkserver alive after
    the kernel died while the worker was inside a long C call (its own pipe-EOF
    exit cannot run then), and so kept itself alive: PR_SET_PDEATHSIG waits for
    the forkserver. A nested forkserver in a worker starts its own.
    """
    fs = sys.modules.get("multiprocessing.forkserver")
    server = getattr(fs, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None or getattr(server, "_forkserver_pid", None) is not None:
        return False  # not a forkserver child (or this process runs its own forkserver)
    try:
        os.close(fd)
    except OSError:
        pass
    server._forkserver_alive_fd = None
    return True


def notebook_builtins() -> None:
    """``display()``, a builtin in the notebook (IPython's): a loop's display() works, an item's raised
    NameError. IPython's own display, which without a shell prints each object's text."""
    import builtins

    if not hasattr(builtins, "display"):
        builtins.display = _display


def _display(*objs: object, **kwargs: object) -> None:
    try:
        from IPython.display import display
    except ImportError:
        print(*objs)
        return None
    return display(*objs, **kwargs)
