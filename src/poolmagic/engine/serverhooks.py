"""Imported by the forkserver alone (its preload list), never by the kernel.

When the kernel dies, even by SIGKILL, the forkserver sees its "alive" pipe
close and exits normally; on the way out it kills the process group of every
worker it forked, so that processes the mapped function started die too.
(Each worker also dies with the forkserver, by PR_SET_PDEATHSIG, even inside
a long C call.)
"""
from __future__ import annotations

import atexit
import os
import signal


def kill_worker_groups() -> None:
    """SIGKILL the process group of each child that leads its own group.

    The forkserver's SIGCHLD handler writes to a pipe that is closed by now:
    it would raise inside this loop after the first kill, so it goes first.
    """
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    me = os.getpid()
    groups = []
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
        if ppid == me and pgrp == int(name):
            groups.append(pgrp)
    for pgrp in groups:
        try:
            os.killpg(pgrp, signal.SIGKILL)
        except OSError:
            pass


if os.path.isdir("/proc"):
    atexit.register(kill_worker_groups)
