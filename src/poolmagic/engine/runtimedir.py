"""One private directory per process for what poolmagic puts on disk while it runs.

Other users share ``/tmp``. Everything poolmagic (and the helper processes it
starts) creates there lives under ``<tmp>/poolmagic-<pid>-<random>``, made
``0700`` by ``mkdtemp`` and checked to be ours: multiprocessing's temporary
directory (the forkserver sockets of the local and the dask backend), a dask
LocalCluster's scratch space (scheduler, nanny and worker directories) and its
workers' marks. It goes when the process exits; one left by a process that was
SIGKILLed is removed by the next ``runtime_dir()`` or ``remove_stale()``
(``%load_ext``) of the same user, once that pid is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading

from ..filesafety import unsafe

PREFIX = "poolmagic-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[A-Za-z0-9_]+")

_lock = threading.Lock()
_dir: str | None = None
_dir_pid: int | None = None


def runtime_dir() -> str:
    """This process's private directory (made on first use, removed at exit)."""
    global _dir, _dir_pid
    with _lock:
        if _dir is not None and _dir_pid == os.getpid() and is_private(_dir):
            return _dir  # (checked again: a cleaner of /tmp may have removed it, and another user taken its name)
        remove_stale()
        path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")  # 0700, O_EXCL
        check_private(path)
        _dir, _dir_pid = path, os.getpid()
        _remove_at_exit(path)
        return path


def subdir(name: str) -> str:
    """A new private directory inside the runtime directory (``name`` + random)."""
    return tempfile.mkdtemp(prefix=f"{name}-", dir=runtime_dir())


def check_private(path: str) -> None:
    """Refuse a directory that is a symlink, not ours, or open to group/others."""
    if unsafe(os.lstat(path), stat.S_ISDIR, 0o077) is not None:
        raise PermissionError(f"poolmagic's runtime directory {path} is not a private directory of this user")


def is_private(path: str) -> bool:
    """Whether ``path`` is (still) a private directory of this user, not a symlink."""
    try:
        check_private(path)
    except OSError:
        return False
    return True


def remove_stale(tmp: str | None = None) -> list[str]:
    """Remove the runtime directories this user's dead processes left behind; returns them.

    Only directories named ``poolmagic-<pid>-…``, owned by this user (not
    followed if a symlink), whose pid is not alive.
    """
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    me = os.getuid()
    for name in names:
        m = _NAME.fullmatch(name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == me:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def adopt_for_multiprocessing() -> None:
    """Make multiprocessing put its sockets in our directory, unless it already has a private one.

    multiprocessing's own (``pymp-*``, 0700) carries no pid: a SIGKILLed
    kernel's would stay in /tmp for good. Checked before every forkserver
    starts: multiprocessing keeps using the path it has, and if a cleaner of
    /tmp removed it (an idle kernel's empty directory, after days) another
    user could make a directory of that name, take the new forkserver's
    socket name and be sent what the workers are started with.
    """
    from multiprocessing import process

    config = process.current_process()._config
    current = config.get("tempdir")
    if current is None or not is_private(current):
        config["tempdir"] = subdir("mp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's
    return True


def _remove_at_exit(path: str) -> None:
    """After everything else at exit, the forkservers included (multiprocessing's last finalizer)."""
    from multiprocessing import util

    util.Finalize(None, _remove, args=(path, os.getpid()), exitpriority=-101)


def _remove(path: str, pid: int) -> None:
    if os.getpid() == pid and is_private(path):  # not in a forked child, nor another user's since
        shutil.rmtree(path, ignore_errors=True)
