"""The local backend: supervised worker processes on a safe start method.

How data flows::

    caller thread (kernel)        manager thread (one per pool)            worker process (N)
    ──────────────────────        ─────────────────────────────            ──────────────────
    Pool.run(f, items)
      submit(Job) ──► commands ──► wait(wake pipe, every worker's
                                        pipe and process sentinel)
                                   (one epoll set, kept up to date)
                                   schedule: job.next_items(size)
                                   LoadFunction (once per worker and   ──► reader thread ──► inbox
                                     function version, out-of-band        (envelopes only: no
                                     buffers as raw frames)                user code, no imports)
                                   SetContext (cwd, env, sys.path,            │
                                     threads; once per map context)           ▼
                                   RunChunk (≤ 2 in flight/worker)     ──► main thread decodes items,
                                                                            applies the context, runs
                                   ChunkDone: results (buffers out     ◄──  items, captures print(),
                                     of band), errors, output, times        times them, packs errors
                                   job.chunk_done ─► report.results[i:j]
      job.wait() ◄── notify ──────┘
      reads a stream's items (never the manager: user code
      must not stall the pool), prints output in item order
    KeyboardInterrupt
      cancel(job) ──► commands ──► kill the workers running its items,
                                   start replacements (a fork of the
                                   warm forkserver: milliseconds)
                                   sentinel fires (crash) / deadline
                                   passes (timeout) ─► the running
                                   items fail, queued ones are re-queued,
                                   the worker's process group is killed
                                   and the worker replaced

Every wait is on pipes and process sentinels together, so a death is seen the
moment it happens, never after a poll interval. Nothing listens on TCP.

Why not multiprocessing.Pool or ProcessPoolExecutor: neither can kill and
replace one worker, Pool hangs on a dead worker, and neither caches a function
per worker. Processes, pipes and start methods still come from the stdlib
(see docs/design.md).
"""
from __future__ import annotations

import itertools
import os
import multiprocessing as mp
import sys
import threading
import time
from collections import deque
from typing import Any, Callable


from ..cores import available_cores
from ..errors import (
    NestedPoolError,
    PoolmapError,
)
from .runchunk import TIMED_ABOVE_S, in_worker
from .base import Backend
from .handle import SHARED_MIN_BYTES, Chunk, WorkerHandle
from .job import ItemTimes, Job
from .outcomes import Outcomes
from .processes import (
    Waiter,
    default_start_method,
    forkserver_preload,
    install_main_guard,
    shared_buffers,
    start_resource_tracker,
    stop_at_exit,
)
from .workerset import PIPE, WorkerSet

WINDOW = 2  # chunks in flight per worker: one running, one ready behind it


class LocalBackend(WorkerSet, Outcomes, Backend):
    """Worker processes on this machine, supervised by a manager thread.

    The class is assembled from three parts, each a module of its own: this
    one (the public face, the manager loop and scheduling), WorkerSet
    (starting, stopping and recycling processes: workerset.py) and Outcomes
    (what each reply, death or deadline does to a job: outcomes.py). All of
    their methods but the public ones run on the manager thread. The many
    methods of this part are the public interface plus the loop's steps.
    """

    def __init__(self, size: int, start_method: str | None = None):
        if start_method is not None:
            _check_start_method(start_method)
        self.start_method = start_method or default_start_method()
        self.ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            self.ctx.set_forkserver_preload(forkserver_preload())
        self.description = f"local processes ({self.start_method})"
        install_main_guard()
        self._size = max(1, int(size))
        self._idle_size = available_cores()  # workers kept warm before a map asks for more
        self._procs: dict[int, WorkerHandle] = {}
        self._jobs: list[Job] = []
        self._rr = 0
        self._seq = itertools.count()
        self._cmds: deque[Callable[[], None]] = deque()
        self._waiter = Waiter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._spawn_error: BaseException | None = None
        self._item_times = ItemTimes()
        self._shared: dict[str, int] = {}  # payload key -> memfd of its big buffers
        self._next_guard = 0.0  # when the memory guard looks next
        self._start_failures = 0  # workers in a row that died before they were ready
        self._read_elsewhere: set[WorkerHandle] = set()  # pipes read this turn outside _read_one

    @property
    def size(self) -> int:
        return self._size

    def start(self) -> None:
        if in_worker():
            raise NestedPoolError(
                "poolmagic cannot start a pool inside one of its own workers: the outer map "
                "already uses the cores. Call the function directly (or in a plain loop) here, "
                "or map the inner work and not the outer one."
            )
        with self._lock:
            if self._closed:
                raise PoolmapError("this pool has been shut down")
            if self._thread is None:
                stop_at_exit(self)
                self._thread = threading.Thread(target=self._main, name="poolmagic-manager", daemon=True)
                self._thread.start()

    def submit(self, job: Job) -> None:
        self.start()
        job.abort = lambda exc: self.cancel(job, exc, wait=0)
        job.source.on_items = self._waiter.wake
        job.source.set_want(self._workers_for(job) * WINDOW)

        def cmd() -> None:
            self._spawn_error = None  # a new map tries again to start what failed
            self._item_times.recall(job)
            self._jobs.append(job)
            job.maybe_finish()  # an empty ITERABLE is done at once
            self._refresh_stale()

        self._command(cmd)

    def cancel(self, job: Job, error: BaseException | None = None, wait: float = 1.0) -> None:
        done = threading.Event()

        def cmd() -> None:
            job.stop(error)
            self._abandon(job)
            done.set()

        self._command(cmd)
        if wait:
            done.wait(wait)

    def resize(self, n: int) -> None:
        self._size = max(1, int(n))
        if self._thread is not None:
            self._command(lambda: None)

    @property
    def state(self) -> str:
        if self.worker_pids():
            return "warm"
        return "starting" if self._thread is not None and not self._closed else "cold"

    def disown(self) -> None:
        """In a child made by a bare ``os.fork()``: the workers are the parent's.

        Such a child inherits multiprocessing's list of children, and its exit
        handler would terminate every daemon on it, ours included (a
        ``multiprocessing`` child resets that list itself). Closed, the pool
        refuses maps there and its shutdown touches nothing.
        """
        from multiprocessing import process

        self._closed = True
        for p in self._procs.values():
            process._children.discard(p.proc)  # type: ignore[attr-defined]

    def worker_pids(self) -> list[int]:
        return [p.pid for p in list(self._procs.values())]

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._command(lambda: None)
            thread.join(5)
        self._kill_all()
        for job in list(self._jobs):
            job.fail(PoolmapError("the pool was shut down while this map was running"))
        self._jobs.clear()
        self._waiter.close()

    def _command(self, fn: Callable[[], None]) -> None:
        self._cmds.append(fn)
        self._waiter.wake()

    def _main(self) -> None:
        try:
            start_resource_tracker()
        except Exception as exc:  # the manager thread must live on, or every map would hang
            self._recover(exc)
        try:
            self._ensure_workers()
            while not self._closed:
                try:
                    self._step()
                except Exception as exc:
                    self._recover(exc)
        finally:
            self._kill_all()

    def _step(self) -> None:
        """One turn: wait for anything, then handle commands, results, deaths, deadlines.

        A ready pipe gives one message per turn: the wait is level-triggered, so
        a second message makes the next wait return at once. That costs less
        than asking the pipe whether more is waiting.
        """
        ready = self._waiter.wait(self._next_deadline())
        self._read_elsewhere.clear()
        while self._cmds:
            self._cmds.popleft()()
        if self._closed:
            return
        deaths = []
        for what, p in ready:
            if self._procs.get(p.slot) is not p:
                continue  # killed by a command this turn
            if what is PIPE:
                # A command (a cancel) or another worker's message (a failed map's drain) may
                # have read what made this pipe ready: a blocking read of an empty pipe would
                # stop the manager for good, so such a pipe is asked first.
                if p not in self._read_elsewhere or p.pending():
                    self._read_one(p)
            else:
                deaths.append(p)
        for p in deaths:
            self._on_death(p)
        if any(j.options.timeout is not None for j in self._jobs):
            self._check_timeouts()
        if self._jobs and time.perf_counter() >= self._next_guard:
            self._guard_memory()
        self._ensure_workers()
        self._schedule()

    def _recover(self, exc: BaseException) -> None:
        """An internal error: fail the running maps, start over with fresh workers.

        The pool stays usable; a bug in poolmagic must never hang the next map.
        """
        import traceback

        traceback.print_exc(file=sys.__stderr__)
        for job in list(self._jobs):
            job.fail(PoolmapError(f"poolmagic's engine hit an internal error and restarted its workers: {exc!r}"))
        self._jobs.clear()
        self._kill_all()

    def _read_one(self, p: WorkerHandle) -> None:
        try:
            msg, frames = p.read()
        except (EOFError, OSError):
            self._on_death(p)
            return
        self._handle(p, msg, frames)

    def _schedule(self) -> None:
        jobs = [j for j in self._jobs if j.has_work()]
        while jobs:
            sent = False
            for p in sorted(self._procs.values(), key=lambda p: len(p.inflight)):
                if p.stale or p.retiring or len(p.inflight) >= WINDOW:
                    continue
                job = self._pick(jobs, p)
                if job is None:
                    continue
                size = job.chunk_size(self._workers_for(job))
                got = job.next_items(size)
                if job.source.is_stream:  # buffered ahead: about half a round of chunks
                    job.source.set_want(size * max(1, self._workers_for(job) // 2))
                if got is None:
                    jobs = [j for j in jobs if j.has_work()]
                    continue
                self._send_chunk(p, job, *got)
                sent = True
            jobs = [j for j in jobs if j.has_work()]
            if not sent:
                break
        self._forget_finished_jobs()

    def _workers_for(self, job: Job) -> int:
        return job.options.workers or self._size

    def _forget_finished_jobs(self) -> None:
        self._jobs = self._item_times.keep_active(self._jobs)
        live = {j.payload.key for j in self._jobs}
        for key in [k for k in self._shared if k not in live]:
            os.close(self._shared.pop(key))

    def _shared_fd(self, payload: Any) -> int | None:
        """The function's big buffers in shared memory, made once per version and map."""
        if sum(b.nbytes for b in payload.buffers) < SHARED_MIN_BYTES:  # handle.py's threshold
            return None
        fd = self._shared.get(payload.key)
        if fd is None:
            fd = shared_buffers(payload.buffers)
            if fd is not None:
                self._shared[payload.key] = fd
        return fd

    def _pick(self, jobs: list[Job], p: WorkerHandle) -> Job | None:
        n = len(jobs)
        for k in range(n):
            job = jobs[(self._rr + k) % n]
            w = job.options.workers
            if job.has_work() and (w is None or p.slot < w):
                self._rr = (self._rr + k + 1) % max(n, 1)
                return job
        return None

    def _send_chunk(self, p: WorkerHandle, job: Job, start: int, items: Any) -> None:
        t = job.per_item_s()
        timed = t is None or t >= TIMED_ABOVE_S
        seq = next(self._seq)
        try:
            data, frames = p.encode_chunk(seq, job, start, items, timed)
        except Exception:
            self._unpicklable_items(job, start, items)
            return
        job.started(p.slot, p.pid, start, len(items))
        try:
            p.send_chunk(Chunk(seq, job, start, items), data, frames, self._shared_fd)
        except OSError:
            pass  # the worker is dying; its sentinel will report it and re-queue

def _errors_safe(exc: BaseException) -> str:
    from ..errors import safe_str

    return safe_str(exc)


def _check_start_method(method: str) -> None:
    """Refuse a start method poolmagic does not use here, as POOLMAGIC_START_METHOD is refused."""
    allowed = [m for m in ("forkserver", "spawn") if m in mp.get_all_start_methods()]
    if method in allowed:
        return
    from ..errors import BadInputError

    why = (" ('fork' would fork this multi-threaded process: a lock held by another thread "
           "stays locked in the child forever)" if method == "fork"
           else " (not on this platform)" if method == "forkserver" else "")
    raise BadInputError(f"start_method={method!r} is not allowed{why}; poolmagic's start methods here are "
                        f"{' and '.join(repr(m) for m in allowed)}")
