"""Process plumbing for the local backend: start methods, signals, shared memory.

Everything here talks to the operating system or to multiprocessing's own
helper processes; the supervisor in ``local.py`` only decides *when*.
"""
from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing import util
from typing import Any, Iterator

from .core.exits import ExitList
from .warm import warm_modules


WORKER_NAME = "poolmagic-worker"
# The process that imported this module. A child the user os.fork()s inherits
# multiprocessing's helper pids and the atexit handlers: it must not stop them.
OWNER_PID = os.getpid()
WORKER_MODULE = "poolmagic.engine.worker"  # preloaded by the forkserver
SERVER_HOOKS = "poolmagic.engine.serverhooks"  # the forkserver's own exit hook

def forkserver_preload() -> list[str]:
    """What the forkserver imports once, so that no worker pays for it.

    threadpoolctl only with numpy or pandas: without them a worker has no
    native thread pool to limit (worker.py), and its import (~2.5 ms) would
    lengthen the server's boot, which a cold start's first map waits for.
    """
    warm = warm_modules()
    return [WORKER_MODULE, SERVER_HOOKS, *(["threadpoolctl", *warm] if warm else [])]


# Made here, after multiprocessing.util registered its exit handler: ours runs first.
_STARTED = ExitList(disown_at_fork=True)  # backends with processes to stop


def stop_at_exit(backend: Any) -> None:
    """Shut ``backend`` down at interpreter exit, and disown it in a forked child.

    multiprocessing's exit handler terminates the daemon children it sees, then
    joins every child: a worker the manager thread started in between was never
    terminated and the join hung for ever (or raised, when the manager reaped a
    worker first). atexit runs handlers in reverse order, and multiprocessing
    registered its own when this module imported ``multiprocessing.util``, so
    ours runs first.
    """
    _STARTED.add(backend)


def others_have_workers(backend: Any) -> bool:
    """Whether a started backend other than ``backend`` has live workers (they share the forkserver)."""
    return any(b.worker_pids() for b in _STARTED.others(backend))


def default_start_method() -> str:
    """``$POOLMAGIC_START_METHOD``, else forkserver where it exists, else spawn; never fork.

    An unknown or unavailable value is an error naming it: falling back
    silently would run the maps some other way than the user asked for.
    """
    allowed = [m for m in ("forkserver", "spawn") if m in mp.get_all_start_methods()]
    env = os.environ.get("POOLMAGIC_START_METHOD", "")
    if env in allowed:
        return env
    if env:
        from ..errors import BadInputError

        why = (" ('fork' would fork a multi-threaded kernel)" if env == "fork"
               else " (not on this platform)" if env == "forkserver" else "")
        raise BadInputError(
            f"POOLMAGIC_START_METHOD is {env!r}{why}; poolmagic's start methods here are "
            f"{' and '.join(repr(m) for m in allowed)}: set one of them, or unset it for {allowed[0]!r}"
        )
    return allowed[0]


_GUARDED: set[str] = set()  # process-name prefixes whose children skip the parent's __main__


@contextlib.contextmanager
def default_method_left_unset() -> Iterator[None]:
    """Leave multiprocessing's default start method unset if it was.

    ``spawn.get_preparation_data`` (every forkserver boot, every spawned
    process) calls ``get_start_method()``, which fixes the default: the
    notebook's own ``multiprocessing.set_start_method()`` then raised "context
    has already been set", though poolmagic, which names its context, never
    chose one.
    """
    default = mp.context._default_context
    unset = getattr(default, "_actual_context", False) is None
    try:
        yield
    finally:
        if unset:
            default._actual_context = None


def install_main_guard(prefix: str = WORKER_NAME) -> None:
    """Keep workers from re-running the parent's ``__main__``.

    multiprocessing makes every spawn/forkserver child import the parent's main
    script (``ipython demo.ipynb`` would be executed as Python, a script without
    an ``if __name__ == "__main__"`` guard would run again). poolmagic ships
    functions by value, so its workers never need ``__main__``: for processes
    named ``poolmagic-worker-*`` only, the main-module entries are dropped from
    the preparation data (and for other prefixes a backend registers, e.g. dask's
    nanny-started workers). Other processes are untouched.
    """
    _GUARDED.add(prefix)
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    if getattr(original, "_poolmagic", False):
        return

    def get_preparation_data(name: str) -> dict:
        with default_method_left_unset():
            data = original(name)
        if name.startswith(tuple(_GUARDED)):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data._poolmagic = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


PRESTART_SWITCH_S = 0.0002  # the GIL's switch interval while prestart's thread launches the forkserver


def prestart(start_method: str | None = None) -> None:
    """Boot the forkserver in the background, now (returns at once).

    A fresh forkserver takes ~60 ms to start Python and preload the worker
    module; started before ``%load_ext`` imports the rest of poolmagic (~40 ms),
    the two overlap. The manager thread later finds it running. Its boot is
    the longest step of a cold start, so its launch must not wait: the
    caller's imports hold the GIL, and the launching thread (SIGINT blocked
    there, see block_sigint) got it back only every 5 ms (the switch
    interval), launching the server ~10 ms late. Until it has launched it,
    the interval is PRESTART_SWITCH_S; then it is put back.
    """
    if (start_method or default_start_method()) != "forkserver":
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, PRESTART_SWITCH_S))
    ours = sys.getswitchinterval()  # (kept in µs: not always the float given)

    def boot() -> None:
        try:
            start_resource_tracker()
            block_sigint()  # after the tracker: starting it unblocks SIGINT (see below)
            from multiprocessing import forkserver

            mp.get_context("forkserver").set_forkserver_preload(forkserver_preload())
            with default_method_left_unset():  # (the main guard may not be installed yet)
                forkserver.ensure_running()
        except Exception:  # the manager will try again and report it
            pass
        finally:
            if sys.getswitchinterval() == ours:  # (unless someone else set it meanwhile)
                sys.setswitchinterval(before)

    try:
        threading.Thread(target=boot, name="poolmagic-prestart", daemon=True).start()
    except BaseException:  # no thread could start: the interval is put back here
        sys.setswitchinterval(before)
        raise


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
    private_runtime_dir()
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    except Exception:  # Windows, or no tracker
        pass


def private_runtime_dir() -> None:
    """Before any forkserver starts: multiprocessing's sockets go in our private,
    pid-named runtime directory (runtimedir.py), which the next kernel removes
    if this one is SIGKILLed; multiprocessing's own ``pymp-*`` would stay.

    And a file it is, never a name in Linux's abstract namespace: Python 3.10.0-3.10.8
    preferred those (CVE-2022-42919, fixed in 3.10.9), which have no permissions, so any
    local user could connect to the forkserver and have it unpickle what they sent.
    """
    util.abstract_sockets_supported = False  # (later Pythons no longer read it)
    try:  # (an import can fail too: the manager thread starts this with no file descriptor to spare)
        from .runtimedir import adopt_for_multiprocessing

        adopt_for_multiprocessing()
    except OSError:  # no usable temporary directory, or no descriptor: multiprocessing's own then
        pass


def shared_buffers(buffers: list) -> int | None:
    """A memfd holding ``buffers`` back to back (Linux), or None where there is none.

    Workers map it copy-on-write: N workers share one copy of a 50 MB array
    instead of receiving N copies through pipes. Anonymous, so nothing can be
    left behind in /dev/shm; the caller closes it when the job ends.
    """
    if not hasattr(os, "memfd_create"):
        return None
    total = sum(b.nbytes for b in buffers)
    fd = os.memfd_create("poolmagic-payload", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)  # (reached through /proc/PID/fd/N: this user's processes only anyway)
        os.ftruncate(fd, total)
        with mmap.mmap(fd, total) as m:
            offset = 0
            for b in buffers:
                m[offset : offset + b.nbytes] = b
                offset += b.nbytes
    except OSError:
        os.close(fd)
        return None
    return fd


def stop_helper_processes(tracker: bool = False) -> None:
    """Stop multiprocessing's forkserver, and with ``tracker`` its resource tracker.

    The forkserver ignores SIGINT and the tracker ignores SIGTERM too, so
    ipykernel's shutdown would wait seconds for them. The tracker is only
    stopped when the kernel exits: other code in the kernel may rely on it.
    """
    if os.getpid() != OWNER_PID:  # a forked child: these belong to its parent
        return
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
