"""The worker process: load a function once, run chunks of items, report back.

Preloaded into the forkserver, so a new worker is a fork of a process that has
already imported this module, the protocol and cloudpickle (through chunk.py).

Two threads, and only one of them ever runs user code:

* the **reader** thread receives messages (protocol.py) and queues them. It
  unpickles envelopes of builtins only; the user's bytes (items, function)
  stay bytes. Because it always drains the pipe, the parent can never block
  on a full pipe while the worker blocks sending a big result the other way.
  When the parent dies the pipe reaches EOF and the reader ends the process.
  If it fails for any other reason, the main thread reports the cause and
  the worker exits, so the parent fails the running items at once.
* the **main** thread decodes and runs chunks: ``out.extend(map(f, items))``
  on the fast path, an explicit loop with per-item timing and seeding
  otherwise. print() is captured per item, exceptions are packed with their
  frames, results go back with big buffers out of band.

Before each chunk the map's context (the kernel's cwd, environment, sys.path
and native thread limit) is applied, so a worker never runs with stale state
and whatever an item changed there is undone. What cannot be undone cheaply
(signal handlers, resource limits, timers, threads left running) makes the
worker report ``recycle`` and exit after the chunk; the parent replaces it.

The worker leads a process group of its own, so killing the group also kills
whatever its function started, and (Linux) it dies with its parent even while
a C call holds the GIL.
"""
from __future__ import annotations

import os
import queue
import random
import signal
import sys
import threading
from collections import OrderedDict
from multiprocessing import reduction

from .. import errors as _errors
from . import mapoptions as _mapoptions  # noqa: F401  (imported here, not by the reader thread)
from .core.chunk import PKG_DIR, pack_results
from .core.chunkstart import NOT_SENT, FunctionCache, Pickled, StageFailed, map_shared, start_chunk
from .core.childprocess import die_with_parent, release_forkserver_pipe
from .core.runchunk import CACHE_SIZE, mark_in_worker, run_chunk
from . import protocol as P
from .context import ContextApplier, ProcessState, watch_calls

RETIRE: str | None = None  # set by the mapped code (maxtasksperchild): exit after this chunk, and why


class _ReaderFailed(Exception):
    """Queued by the reader thread when it cannot go on."""

    def __init__(self, packed: dict):
        self.packed = packed


class Worker:
    def __init__(self, conn, slot: int):
        self.conn = conn
        self.slot = slot
        self.fns = FunctionCache()
        self.contexts: OrderedDict[str, P.SetContext] = OrderedDict()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.n_modules = 0
        self.seen_modules: set[str] = set()
        self.applier = ContextApplier()
        self.baseline: ProcessState | None = None

    # ------------------------------------------------------------ receiving (reader thread)
    def _reader(self) -> None:
        conn = self.conn
        try:
            while True:
                msg = P.decode(conn.recv_bytes())
                if type(msg) is P.LoadFunction:
                    self.inbox.put((msg, self._receive_buffers(msg.sizes, msg.shared)))
                elif type(msg) is P.RunChunk:
                    self.inbox.put((msg, P.recv_frames(conn, msg.sizes) if msg.sizes else None))
                else:
                    self.inbox.put((msg, None))
        except (EOFError, OSError):
            # The parent is gone (kernel shut down or killed): never linger.
            os._exit(0)
        except BaseException as exc:  # never die silently: the main thread reports it
            self.inbox.put((_ReaderFailed(_errors.pack_exception(exc, "")), None))

    def _receive_buffers(self, sizes: tuple, shared: bool) -> list:
        """A function's out-of-band buffers: mapped from shared memory, or read from the socket."""
        if not shared:
            return P.recv_frames(self.conn, sizes)
        return map_shared(reduction.recv_handle(self.conn), sizes)

    # ------------------------------------------------------------ running (main thread)
    def serve(self, warm: list[str] = ()) -> None:
        self._send(P.Ready())
        threading.Thread(target=self._reader, name="poolmagic-reader", daemon=True).start()
        for name in warm:  # messages queue up in the inbox meanwhile
            try:
                __import__(name)
            except Exception:
                pass
        self.baseline = ProcessState.read()
        watch_calls()
        while True:
            msg, extra = self.inbox.get()
            kind = type(msg)
            if kind is P.RunChunk:
                if self._run(msg, extra):
                    self._exit()
            elif kind is P.LoadFunction:
                self.fns.put(msg.key, Pickled(msg.data, extra))
            elif kind is P.SetContext:
                self._remember(self.contexts, msg.key, msg)
            elif kind is _ReaderFailed:
                self._send(P.WorkerFailed(msg.packed))
                self._exit()

    @staticmethod
    def _remember(cache: OrderedDict, key: str, value: object) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)

    def _run(self, msg: P.RunChunk, frames: list | None) -> str | None:
        """Run one chunk and answer; returns why the worker must be recycled, if it must."""
        try:
            fn, items = start_chunk(self.applier, self.contexts.get(msg.ctx, NOT_SENT), self.fns, msg.fn,
                                    msg.items, frames)
        except StageFailed as failed:
            self._send(P.ChunkFailed(msg.seq, failed.stage, failed.packed))
            return None
        o = msg.options
        if o.timeout is not None:  # tell the parent the chunk's clock starts now
            self._send(P.Began(msg.seq))
        self.applier.limit_threads_if_new_libraries()
        seq = msg.seq
        r = run_chunk(fn, items, o, start=msg.start, timed=msg.timed, indices=msg.indices,
                      progress=lambda done: self._send(P.Progress(seq, done)))
        recycle = self.baseline.changed() if self.baseline is not None else None
        recycle = recycle or RETIRE
        body, frames_out = pack_results(r.out, r.records, r.errors, msg.start, items, msg.indices)
        self._send(P.ChunkDone(msg.seq, r.t0, r.t1, r.times, body, tuple(f.nbytes for f in frames_out),
                               self._new_modules(), recycle, r.waited_s, r.cpu_s), frames_out)
        return recycle

    # ------------------------------------------------------------ sending
    def _send(self, msg: P.Message, frames: list = ()) -> None:
        self.conn.send_bytes(P.encode(msg))
        P.send_frames(self.conn, frames)

    def _exit(self) -> None:
        """Leave now: threads the function left running must not hold the exit."""
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)

    def _new_modules(self) -> dict | None:
        """Files of modules from the user's folders imported since the last report.

        Only modules not seen before are looked at (the first chunk may import
        hundreds; resolving every path again after each chunk cost ~20 ms).
        """
        if len(sys.modules) == self.n_modules:
            return None
        self.n_modules = len(sys.modules)
        seen = self.seen_modules
        found = {}
        for name, mod in list(sys.modules.items()):
            if name in seen:
                continue
            seen.add(name)
            path = getattr(mod, "__file__", None)
            if path and _is_user_file(path):
                try:
                    found[name] = (path, os.stat(path).st_mtime_ns)
                except OSError:
                    pass
        return found or None

_SYSTEM_PREFIXES: tuple[str, ...] | None = None


def _is_user_file(path: str) -> bool:
    """A module file the user may edit: not stdlib, not site-packages, not poolmagic."""
    global _SYSTEM_PREFIXES
    if _SYSTEM_PREFIXES is None:
        import site
        import sysconfig

        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, PKG_DIR}
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            prefixes.add(sysconfig.get_path(key))
        try:
            prefixes.update(site.getsitepackages())
            prefixes.add(site.getusersitepackages())
        except Exception:
            pass
        _SYSTEM_PREFIXES = tuple(os.path.realpath(p) for p in prefixes if p)
    if not path.endswith(".py"):
        return False
    return not os.path.realpath(path).startswith(_SYSTEM_PREFIXES)


def main(conn, slot: int, warm: list[str] = ()) -> None:
    """Process entry point. ``warm``: modules to import before the first chunk.

    Started with SIGINT blocked (see processes.block_sigint). In a process
    group of its own, the kernel's Ctrl-C (sent to the kernel's group) no
    longer reaches the worker, and any SIGINT that does is ignored: the parent
    decides what to stop. It is ignored by a handler that does nothing rather
    than by SIG_IGN, because a handler is reset on exec: processes the
    function starts get the default SIGINT, not an inherited "ignore".
    """
    mark_in_worker()
    if hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    die_with_parent()
    release_forkserver_pipe()
    signal.signal(signal.SIGINT, _ignore_sigint)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _allow_children()
    random.seed()  # fresh OS entropy: no two workers share a random state
    Worker(conn, slot).serve(warm)


def _ignore_sigint(signum: int, frame: object) -> None:
    pass


def _allow_children() -> None:
    """Let the function use multiprocessing itself (a nested ``multiprocessing.Pool``).

    Workers are started as daemons, and multiprocessing refuses children to a
    daemon; the flag only serves that check here, since the parent stops its
    workers itself and each worker's process group takes its children along.
    """
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
