"""Process plumbing for the local backend: start methods, signals, shared memory.

Everything here talks to the operating system or to multiprocessing's own
helper processes; the supervisor in ``local.py`` only decides *when*.
"""
from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import signal
import sys
import time
from multiprocessing import util
from typing import Any

from ..serialize import Payload

WORKER_NAME = "poolmagic-worker"


def default_start_method() -> str:
    """forkserver where it exists (never fork a threaded kernel), else spawn."""
    env = os.environ.get("POOLMAGIC_START_METHOD")
    if env:
        return env
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def install_main_guard() -> None:
    """Keep workers from re-running the parent's ``__main__``.

    multiprocessing makes every spawn/forkserver child import the parent's main
    script (``ipython demo.ipynb`` would be executed as Python, a script without
    an ``if __name__ == "__main__"`` guard would run again). poolmagic ships
    functions by value, so its workers never need ``__main__``: for processes
    named ``poolmagic-worker-*`` only, the main-module entries are dropped from
    the preparation data. Other processes are untouched.
    """
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    if getattr(original, "_poolmagic", False):
        return

    def get_preparation_data(name: str) -> dict:
        data = original(name)
        if name.startswith(WORKER_NAME):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data._poolmagic = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


def block_sigint() -> None:
    """Block SIGINT in this (manager) thread: processes started from it inherit it.

    An interrupt then cannot kill a worker (or the forkserver's children)
    before it has set SIGINT to ignored; the worker unblocks it after that.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker first, if this platform has one.

    Starting it *unblocks* SIGINT in the calling thread when done; started
    later (inside the first Process.start) it would undo block_sigint before
    the forkserver is spawned.
    """
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    except Exception:  # Windows, or no tracker
        pass


def shared_buffers(payload: Payload) -> int | None:
    """A memfd holding the payload's buffers, made once per payload (Linux).

    Workers map it copy-on-write: N workers share one copy of a 50 MB array
    instead of receiving N copies through pipes. Anonymous, so nothing can be
    left behind in /dev/shm; it is closed when the job ends.
    """
    if payload.shared_fd is not None:
        return payload.shared_fd
    if not hasattr(os, "memfd_create"):
        return None
    total = sum(b.nbytes for b in payload.buffers)
    fd = os.memfd_create("poolmagic-payload", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        with mmap.mmap(fd, total) as m:
            offset = 0
            for b in payload.buffers:
                m[offset : offset + b.nbytes] = b
                offset += b.nbytes
    except OSError:
        os.close(fd)
        return None
    payload.shared_fd = fd
    return fd


def stop_helper_processes(tracker: bool = False) -> None:
    """Stop multiprocessing's forkserver, and with ``tracker`` its resource tracker.

    The forkserver ignores SIGINT and the tracker ignores SIGTERM too, so
    ipykernel's shutdown would wait seconds for them. The tracker is only
    stopped when the kernel exits: other code in the kernel may rely on it.
    """
    fs = sys.modules.get("multiprocessing.forkserver")
    if fs is not None:
        _stop_forkserver(fs._forkserver)
    rt = sys.modules.get("multiprocessing.resource_tracker")
    if tracker and rt is not None:
        t = rt._resource_tracker
        pid, fd = getattr(t, "_pid", None), getattr(t, "_fd", None)
        if pid is not None:  # killed, not asked: asking waits for every fd holder
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            try:
                os.close(fd)
            except (OSError, TypeError):
                pass
            t._pid = t._fd = None


def _stop_forkserver(server: Any) -> None:
    """Stop the forkserver without waiting on anyone else.

    The stdlib's ``_stop`` closes the "alive" pipe and waits for the server to
    see EOF, but every process *forked* from the kernel since (a user's
    ``Pool`` on fork) holds that pipe too, so the wait could last until they
    exit: a hang at interpreter exit. The server keeps no state worth saving,
    so after a short grace it is killed.
    """
    lock = getattr(server, "_lock", None)
    if lock is None or not lock.acquire(timeout=1.0):
        return
    try:
        pid, alive = getattr(server, "_forkserver_pid", None), getattr(server, "_forkserver_alive_fd", None)
        if pid is None:
            return
        if alive is not None:
            try:
                os.close(alive)
            except OSError:
                pass
        deadline = time.monotonic() + 0.1
        try:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.002)
        except OSError:  # already reaped
            pass
        address = getattr(server, "_forkserver_address", None)
        if address and not util.is_abstract_socket_namespace(address):
            try:
                os.unlink(address)
            except OSError:
                pass
        server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    finally:
        lock.release()
