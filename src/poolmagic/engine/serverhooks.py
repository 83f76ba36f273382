"""Imported by the forkserver alone (its preload list), never by the kernel.

When the kernel dies, even by SIGKILL, the forkserver sees its "alive" pipe
close and exits normally; on the way out it kills the process group of every
worker it forked, so that processes the mapped function started die too.
(Each worker also dies with the forkserver, by PR_SET_PDEATHSIG, even inside
a long C call.)

A worker may die first: a dask worker exits the moment its nanny (the
kernel) is gone, and the server reaps it before its own exit. Its group's
other processes would then be orphans that no one kills, so the server is a
"child subreaper": orphans of its workers become its children, and their
groups are killed with the others.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import warnings


def kill_worker_groups() -> None:
    """SIGKILL the process group of each child: its workers (each leads a group),
    and orphans of dead workers that it adopted. A child still in the server's
    own group (the kernel's: a worker not yet set up) is killed alone.

    The forkserver's SIGCHLD handler writes to a pipe that is closed by now:
    it would raise inside this loop after the first kill, so it goes first.
    """
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    me, mine = os.getpid(), os.getpgrp()
    groups, loners = set(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            ppid, pgrp = int(fields[1]), int(fields[2])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            if pgrp != mine:
                groups.add(pgrp)
            else:
                loners.append(int(name))
    for pid in loners:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pgrp in groups:
        try:
            os.killpg(pgrp, signal.SIGKILL)
        except OSError:
            pass


def _adopt_orphans() -> None:
    """Become the parent of orphaned descendants (Linux), and reap them quietly:
    multiprocessing's forkserver warns about each child it did not fork."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        return
    warnings.filterwarnings("ignore", message="forkserver: waitpid returned unexpected pid")


if os.path.isdir("/proc"):
    _adopt_orphans()
    atexit.register(kill_worker_groups)
