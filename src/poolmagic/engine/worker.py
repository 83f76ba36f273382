"""The worker process: load a function once, run chunks of items, report back.

Preloaded into the forkserver, so a new worker is a fork of a process that has
already imported this module, the protocol and cloudpickle (through chunk.py).

Two threads, and only one of them ever runs user code:

* the **reader** thread receives messages (protocol.py) and queues them
  while a chunk runs and until it is answered. It unpickles envelopes of
  builtins only; the user's bytes (items, function) stay bytes. Because it
  drains the pipe whenever the main thread is busy, the parent can never
  block on a full pipe while the worker blocks sending a big result the
  other way. When the parent dies the pipe reaches EOF and the reader ends
  the process. If it fails for any other reason, the main thread reports the
  cause and the worker exits, so the parent fails the running items at once.
  While no chunk runs the main thread reads the pipe itself (``_next``): a
  chunk then starts without a thread hand-off; the reader is given the pipe
  when the chunk starts and woken out of its ``select`` to give it back
  after the answer is sent (``_give_pipe``/``_take_pipe``, one lock). A
  *quiet* chunk (``RunChunk.quiet``: the parent sends this worker nothing
  until it answers, so there is nothing to drain) runs without the reader:
  a small map's chunk costs no thread switch in the worker at all.
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

import builtins
import os
import queue
import select
import signal
import sys
import threading
from collections import OrderedDict
from multiprocessing import reduction

from .. import errors as _errors
from . import mapoptions as _mapoptions  # noqa: F401  (imported here, not by the reader thread)
from .core.chunk import pack_results
from .core.chunkstart import NOT_SENT, FunctionCache, Pickled, StageFailed, map_shared, start_chunk
from .core.childprocess import die_with_parent, notebook_builtins, release_forkserver_pipe
from .core.runchunk import CACHE_SIZE, mark_in_worker, run_chunk
from . import protocol as P
from . import seeds
from .context import ContextApplier, ProcessState, watch_calls
from .userfiles import is_user_file as _is_user_file
from .warm import WARM_MODULES

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
        self.options = P.OptionsWire()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.n_modules = 0  # len(sys.modules) when they were last looked at (_new_modules)
        self.seen_modules: set[str] = set()
        self.applier = ContextApplier()
        self.baseline: ProcessState | None = None
        # Who reads the pipe: the main thread while no chunk runs (no thread hand-off
        # before a chunk starts), the reader thread while one runs. Without select()
        # on a pipe (Windows) the reader thread reads it always.
        self.handover = os.name == "posix"
        # A quiet chunk (the parent sends nothing until it is answered) runs with no reader
        # at all: no thread wakes for it. Only where the kernel kills this process with its
        # parent (die_with_parent): elsewhere the reader's EOF is what ends an orphan.
        self.quiet_ok = self.handover and sys.platform.startswith("linux")
        self.pipe = threading.Lock()  # held by the thread that may read the pipe
        self.main_reads = False
        self.reader_may = threading.Event()
        self.reader_failed = False
        self.wake_r, self.wake_w = os.pipe() if self.handover else (-1, -1)
        if self.handover:  # a full wake-up pipe already holds a byte the reader will see
            os.set_blocking(self.wake_w, False)

    # ------------------------------------------------------------ receiving
    def _read(self) -> tuple:
        """One message from the parent and what follows it (frames, a shared mapping)."""
        conn = self.conn
        msg = P.decode(conn.recv_bytes())
        if type(msg) is P.LoadFunction:
            return msg, self._receive_buffers(msg.sizes, msg.shared)
        if type(msg) is P.RunChunk:
            return msg, P.recv_frames(conn, msg.sizes) if msg.sizes else None
        return msg, None

    def _reader(self) -> None:
        """The reader thread: drains the pipe into the inbox whenever the main thread does not read it."""
        try:
            if not self.handover:
                while True:
                    self.inbox.put(self._read())
            conn, wake, pipe, may = self.conn, self.wake_r, self.pipe, self.reader_may
            while True:
                may.wait()
                with pipe:  # the failure is queued before the main thread may read again
                    try:
                        while not self.main_reads:
                            ready = select.select((conn, wake), (), ())[0]
                            if wake in ready:
                                os.read(wake, 512)
                            elif not self.main_reads:
                                self.inbox.put(self._read())
                    except (EOFError, OSError):
                        os._exit(0)
                    except BaseException as exc:
                        self._reader_failed(exc)
                        return
        except (EOFError, OSError):
            # The parent is gone (kernel shut down or killed): never linger.
            os._exit(0)
        except BaseException as exc:  # never die silently: the main thread reports it
            self._reader_failed(exc)

    def _reader_failed(self, exc: BaseException) -> None:
        self.reader_failed = True
        self.inbox.put((_ReaderFailed(_errors.pack_exception(exc, "")), None))

    def _give_pipe(self) -> None:
        """A chunk begins: the reader thread reads the pipe until it is answered.

        So the parent never blocks writing to this worker (a second chunk, a
        new function) while the worker blocks writing a big result to it.
        """
        if self.handover and not self.reader_failed:
            self.main_reads = False
            self.reader_may.set()
            self.pipe.release()

    def _take_pipe(self) -> None:
        """The chunk is answered: take the pipe back, the reader woken out of its wait."""
        if self.handover and not self.reader_failed:
            self.main_reads = True
            self.reader_may.clear()
            try:
                os.write(self.wake_w, b"!")
            except BlockingIOError:
                pass
            self.pipe.acquire()

    def _next(self) -> tuple:
        """The next message: one the reader queued, else read here, on the main thread."""
        if not self.handover or self.reader_failed or not self.inbox.empty():
            return self.inbox.get()
        try:
            return self._read()
        except (EOFError, OSError):
            os._exit(0)
        except BaseException as exc:
            return _ReaderFailed(_errors.pack_exception(exc, "")), None

    def _receive_buffers(self, sizes: tuple, shared: bool) -> list:
        """A function's out-of-band buffers: mapped from shared memory, or read from the socket."""
        if not shared:
            return P.recv_frames(self.conn, sizes)
        return map_shared(reduction.recv_handle(self.conn), sizes)

    # ------------------------------------------------------------ running (main thread)
    def serve(self, warm: list[str] = ()) -> None:
        self._send(P.Ready())
        self.reader_may.set()  # the reader drains the pipe while the warm imports run
        threading.Thread(target=self._reader, name="poolmagic-reader", daemon=True).start()
        for name in warm:
            try:
                __import__(name)
            except Exception:
                pass
        self._started_with(sys.modules)
        self.baseline = ProcessState.read()
        watch_calls()
        self._take_pipe()
        while True:
            msg, extra = self._next()
            kind = type(msg)
            if kind is P.RunChunk:
                lend = not (msg.quiet and self.quiet_ok)
                if lend:
                    self._give_pipe()
                if self._run(msg, extra):
                    self._exit()
                if lend:
                    self._take_pipe()
            elif kind is P.LoadFunction:
                self.fns.put(msg.key, Pickled(msg.data, extra))
            elif kind is P.SetContext:
                self._remember(self.contexts, msg.key, msg)
            elif kind is _ReaderFailed:
                self._send(P.WorkerFailed(msg.packed))
                self._exit()

    def _started_with(self, modules: dict) -> None:
        """The modules this worker starts with are not the user's work, nor new libraries.

        They are the forkserver's preload (or, under spawn, the interpreter's
        start and the warm imports): stdlib, poolmagic, cloudpickle, and numpy or
        pandas when the kernel had them. The first chunk's reply looked at every
        one of their files (realpath, stat: ~6 ms, all of it on a cold start's
        first map); only modules imported after this are looked at now. Without
        numpy or pandas among them no native thread pool is loaded either, so
        threadpoolctl's walk of the shared libraries (~1.5 ms) waits for an import.
        """
        self.seen_modules = set(modules)
        self.n_modules = len(modules)
        if not any(name in modules for name in WARM_MODULES):
            self.applier.no_thread_pools_yet()

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
        o = self.options.load(msg.options)
        if o.timeout is not None:  # tell the parent the chunk's clock starts now
            self._send(P.Began(msg.seq))
        self.applier.limit_threads_if_new_libraries()
        seq = msg.seq
        r = run_chunk(fn, items, o, start=msg.start, timed=msg.timed, indices=msg.indices,
                      progress=lambda done: self._send(P.Progress(seq, done)), own_filters=True)
        recycle = self.baseline.changed() if self.baseline is not None else None
        recycle = recycle or RETIRE
        body, frames_out = pack_results(r.out, r.records, r.errors, msg.start, items, msg.indices)
        self._send(P.ChunkDone(msg.seq, r.t0, r.t1, r.times, body, tuple(f.nbytes for f in frames_out),
                               self._new_modules(), recycle, r.waited_s, r.cpu_s, r.faults), frames_out)
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
    builtins.input = _no_input
    notebook_builtins()
    seeds.fresh()  # fresh OS entropy: no two workers share a random or np.random state
    Worker(conn, slot).serve(warm)


NO_INPUT = ("input() cannot ask anyone in a worker: the item runs in a process of its own, with no "
            "notebook to answer it; ask in the notebook before the map and pass the answer in "
            "(%%poolmap --kw NAME=EXPR, or a global the function reads)")


def _no_input(prompt: object = "") -> str:
    """``input()`` in a worker: its stdin is /dev/null (multiprocessing's), where a loop in the
    notebook would have asked. Still the EOFError input() gives at the end of input, saying why."""
    raise EOFError(NO_INPUT)


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
