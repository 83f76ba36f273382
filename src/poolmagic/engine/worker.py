"""The worker process: load a function once, run chunks of items, report back.

Preloaded into the forkserver, so a new worker is a fork of a process that has
already imported this module and cloudpickle.

Two threads:

* the **reader** thread only receives messages (a chunk, a function payload,
  stop) and queues them. Because the worker always drains its input, the
  parent can never block on a full pipe while the worker blocks sending a big
  result the other way. When the parent dies the pipe reaches EOF and the
  reader ends the process: a worker never outlives its kernel.
* the **main** thread runs chunks: ``out.extend(map(f, items))`` on the fast
  path (items too short to time), an explicit loop with per-item timing and
  seeding otherwise. print() is captured per item, exceptions are packed with
  their frames, results go back pickled with cloudpickle.

SIGINT is ignored: Jupyter interrupts the kernel's whole process group, and it
is the parent that decides what to stop.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import mmap
import os
import pickle
import queue
import random
import signal
import sys
import threading
import time
from collections import OrderedDict
from multiprocessing import reduction

import cloudpickle

from .. import errors as _errors
from ..sentinel import NOT_DONE

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FN_CACHE_SIZE = 4  # functions kept per worker; the parent mirrors this LRU

# message kinds (parent -> worker)
FN, RUN, STOP = "fn", "run", "stop"
# message kinds (worker -> parent)
DONE, BEGIN = "done", "begin"


class _Capture(io.TextIOBase):
    """A stdout/stderr stand-in that files each write under the current item."""

    def __init__(self, name: str, records: list, locate):
        self.name = name
        self._records = records
        self._locate = locate

    def write(self, s: str) -> int:
        if s:
            idx = self._locate()
            rec = self._records
            if rec and rec[-1][0] == idx and rec[-1][1] == self.name:
                rec[-1] = (idx, self.name, rec[-1][2] + s)
            else:
                rec.append((idx, self.name, s))
        return len(s)

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    def isatty(self) -> bool:
        return False


def _seed_item(seed: int, index: int) -> None:
    """Independent, reproducible streams per item (SeedSequence spawn-key style)."""
    np = sys.modules.get("numpy")
    if np is None:
        try:  # the function may import numpy itself: seed it before it runs
            import numpy as np
        except ImportError:
            np = None
    if np is not None:
        ss = np.random.SeedSequence(seed, spawn_key=(index,))
        state = ss.generate_state(4)
        np.random.seed(state)
        random.seed(int.from_bytes(state.tobytes(), "little"))
    else:
        digest = hashlib.sha256(f"poolmagic:{seed}:{index}".encode()).digest()
        random.seed(int.from_bytes(digest, "little"))


def run_chunk(
    fn, items, start: int, *, star: bool = False, timed: bool = False, keep_going: bool = False, seed: int | None = None
) -> tuple[list, float, float, list | None, list, list]:
    """Run ``fn`` over one chunk: (results, t0, t1, item times, output records, packed errors).

    Independent of how the chunk arrived, so any backend's worker (a dask
    task, say) runs chunks exactly as the local workers do.
    """
    n = len(items)
    out: list = []
    errors: list = []
    records: list = []
    times: list | None = [] if timed else None
    state = {"it": None, "i": start}
    if timed or seed is not None:
        locate = lambda: state["i"]  # noqa: E731
    else:
        locate = lambda: start + n - state["it"].__length_hint__() - 1  # noqa: E731
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Capture("stdout", records, locate), _Capture("stderr", records, locate)
    t0 = time.perf_counter()
    try:
        if timed or seed is not None:
            _run_explicit(fn, items, start, star, seed, keep_going, out, errors, times, state)
        else:
            it = iter(items)
            state["it"] = it
            mapper = itertools.starmap if star else map
            while True:
                try:
                    out.extend(mapper(fn, it))  # keeps what finished if an item raises
                    break
                except BaseException as exc:
                    errors.append((start + len(out), _errors.pack_exception(exc, PKG_DIR)))
                    out.append(NOT_DONE)
                    if not keep_going:
                        break
    finally:
        t1 = time.perf_counter()
        sys.stdout, sys.stderr = old
    return out, t0, t1, times, records, errors


def _run_explicit(fn, items, start, star, seed, keep_going, out, errors, times, state) -> None:
    """The per-item loop: index known, per-item times and seeds possible."""
    clock = time.perf_counter
    for offset, x in enumerate(items):
        i = start + offset
        state["i"] = i
        if seed is not None:
            _seed_item(seed, i)
        t = clock()
        try:
            out.append(fn(*x) if star else fn(x))
        except BaseException as exc:
            out.append(NOT_DONE)
            errors.append((i, _errors.pack_exception(exc, PKG_DIR)))
            if times is not None:
                times.append(clock() - t)
            if not keep_going:
                return
            continue
        if times is not None:
            times.append(clock() - t)


class Worker:
    def __init__(self, conn, slot: int):
        self.conn = conn
        self.slot = slot
        self.fns: OrderedDict[str, object] = OrderedDict()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.n_modules = 0

    # ------------------------------------------------------------ receiving
    def _reader(self) -> None:
        conn = self.conn
        try:
            while True:
                raw = conn.recv_bytes()
                msg = pickle.loads(raw)
                if msg[0] == FN:
                    msg = (*msg[:6], self._receive_buffers(msg[3], msg[6]))
                self.inbox.put(msg)
                if msg[0] == STOP:
                    return
        except (EOFError, OSError):
            # The parent is gone (kernel shut down or killed): never linger.
            os._exit(0)

    def _receive_buffers(self, sizes: list[int], shared: bool) -> list:
        """A function's out-of-band buffers: mapped from shared memory or read from the pipe."""
        if shared:
            fd = reduction.recv_handle(self.conn)
            try:
                # copy-on-write: the function may modify its arrays privately
                m = mmap.mmap(fd, sum(sizes), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            view, bufs, offset = memoryview(m), [], 0
            for size in sizes:
                bufs.append(view[offset : offset + size])
                offset += size
            return bufs
        bufs = []
        for size in sizes:
            buf = bytearray(size)
            if size:
                self.conn.recv_bytes_into(buf)
            else:
                self.conn.recv_bytes()
            bufs.append(buf)
        return bufs

    # ------------------------------------------------------------ running
    def serve(self, warm: list[str] = ()) -> None:
        threading.Thread(target=self._reader, name="poolmagic-reader", daemon=True).start()
        for name in warm:  # messages queue up in the inbox meanwhile
            try:
                __import__(name)
            except Exception:
                pass
        while True:
            msg = self.inbox.get()
            kind = msg[0]
            if kind == STOP:
                return
            if kind == FN:
                _, key, data, _sizes, cwd, path, bufs = msg
                self._load_fn(key, data, cwd, path, bufs)
            elif kind == RUN:
                self._run(*msg[1:])

    def _load_fn(self, key, data, cwd, path, bufs) -> None:
        try:
            if cwd and os.getcwd() != cwd:
                os.chdir(cwd)
            for p in reversed(path):
                if p not in sys.path:
                    sys.path.insert(0, p)
            fn = pickle.loads(data, buffers=bufs)
        except BaseException as exc:  # reported with the first chunk that needs it
            fn = _LoadFailure(_errors.pack_exception(exc, PKG_DIR))
        self.fns[key] = fn
        self.fns.move_to_end(key)
        while len(self.fns) > FN_CACHE_SIZE:
            self.fns.popitem(last=False)

    def _run(self, seq, key, start, items, star, timed, keep_going, seed, ack) -> None:
        fn = self.fns.get(key)
        if ack:  # the chunk is timed: tell the parent its clock starts now
            self.conn.send_bytes(pickle.dumps((BEGIN, seq)))
        if isinstance(fn, _LoadFailure) or fn is None:
            fatal = fn.packed if fn is not None else _errors.pack_exception(RuntimeError("function missing"), PKG_DIR)
            self._send((DONE, seq, [], 0.0, 0.0, None, [], [], fatal, self._new_modules()))
            return
        ran = run_chunk(fn, items, start, star=star, timed=timed, keep_going=keep_going, seed=seed)
        self._send((DONE, seq, *ran, None, self._new_modules()), start)

    # ------------------------------------------------------------ sending
    def _send(self, msg: tuple, start: int = 0) -> None:
        try:
            data = cloudpickle.dumps(msg, protocol=5)
        except Exception:
            msg = self._strip_unpicklable(msg, start)
            data = cloudpickle.dumps(msg, protocol=5)
        self.conn.send_bytes(data)

    @staticmethod
    def _strip_unpicklable(msg: tuple, start: int) -> tuple:
        """Replace each result that cannot be pickled by an error naming it."""
        kind, seq, out, t0, t1, times, records, errors, fatal, mods = msg
        out = list(out)
        errors = list(errors)
        for k, value in enumerate(out):
            try:
                cloudpickle.dumps(value, protocol=5)
            except Exception as exc:
                out[k] = NOT_DONE
                err = _errors.ItemPicklingError(
                    f"the result of item {start + k} is {_describe(value)}, which cannot be "
                    f"pickled to send it back: {exc}"
                )
                errors.append((start + k, _errors.pack_exception(err, PKG_DIR)))
        errors.sort(key=lambda e: e[0])
        return (kind, seq, out, t0, t1, times, records, errors, fatal, mods)

    def _new_modules(self) -> dict | None:
        """Files of modules from the user's folders imported since the last report."""
        if len(sys.modules) == self.n_modules:
            return None
        self.n_modules = len(sys.modules)
        found = {}
        for name, mod in list(sys.modules.items()):
            path = getattr(mod, "__file__", None)
            if path and _is_user_file(path):
                try:
                    found[name] = (path, os.stat(path).st_mtime_ns)
                except OSError:
                    pass
        return found


class _LoadFailure:
    def __init__(self, packed: dict):
        self.packed = packed


def _describe(value) -> str:
    from ..serialize import describe

    return describe(value)


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
    """Process entry point. ``warm``: modules to import before the first chunk."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # started with SIGINT blocked (see local.py)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    random.seed()  # fresh OS entropy: no two workers share a random state
    Worker(conn, slot).serve(warm)
