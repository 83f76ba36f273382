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
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

import cloudpickle

from ..cores import available_cores
from ..errors import (
    ItemPicklingError,
    ItemTimeoutError,
    NestedPoolError,
    PoolmapError,
    WorkerCrashedError,
    add_note,
    exit_description,
    rebuild_exception,
)
from ..serialize import describe
from . import protocol as P
from . import worker as _worker
from .base import Backend
from .events import ChunkRecord, WorkerReplaced
from .handle import Chunk, WorkerHandle, kill_group
from .job import ItemTimes, Job
from .processes import (
    WORKER_NAME,
    Waiter,
    block_sigint,
    default_start_method,
    forkserver_preload,
    install_main_guard,
    start_resource_tracker,
    stop_at_exit,
    warm_modules,
)

START_GRACE_S = 30.0  # a timed chunk's clock starts when it begins, or after this
WINDOW = 2  # chunks in flight per worker: one running, one ready behind it
TIMED_ABOVE_S = 10e-6  # per-item timing costs ~0.1 µs: only for items longer than this
SPAWN_PER_TURN = 16  # workers started per manager turn: it keeps serving meanwhile

_PIPE, _DEATH = "pipe", "death"  # what the waiter reports about a worker


class LocalBackend(Backend):
    """Worker processes on this machine, supervised by a manager thread.

    Many methods, one job: they are the steps of the supervisor loop (receive,
    react to deaths and deadlines, schedule), all on the manager thread.
    """

    def __init__(self, size: int, start_method: str | None = None):
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

    # ------------------------------------------------------------ public (any thread)
    @property
    def size(self) -> int:
        return self._size

    def start(self) -> None:
        if _worker.IN_WORKER:
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
            if error is None:
                job.fail(KeyboardInterrupt(), status="cancelled")
            else:
                job.fail(error)
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

    # ------------------------------------------------------------ manager thread
    def _command(self, fn: Callable[[], None]) -> None:
        self._cmds.append(fn)
        self._waiter.wake()

    def _main(self) -> None:
        start_resource_tracker()
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
        while self._cmds:
            self._cmds.popleft()()
        if self._closed:
            return
        deaths = []
        for what, p in ready:
            if self._procs.get(p.slot) is not p:
                continue  # killed by a command this turn
            if what is _PIPE:
                self._read_one(p)
            else:
                deaths.append(p)
        for p in deaths:
            self._on_death(p)
        if any(j.options.timeout is not None for j in self._jobs):
            self._check_timeouts()
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

    def _handle(self, p: WorkerHandle, msg: Any, frames: list | None) -> None:
        kind = type(msg)
        if kind is P.ChunkDone:
            self._on_done(p, msg, frames)
        elif kind is P.Began:
            p.began(msg.seq)
        elif kind is P.ChunkFailed:
            self._on_chunk_failed(p, msg)
        elif kind is P.WorkerFailed:
            p.retiring = "failed"
            p.failure = rebuild_exception(msg.error)

    def _on_done(self, p: WorkerHandle, msg: P.ChunkDone, frames: list | None) -> None:
        if msg.modules:
            p.modules.update(msg.modules)
        if msg.recycle:
            p.retiring = msg.recycle  # it exits now; what it still holds never ran
        chunk = p.pop_head()
        assert chunk.seq == msg.seq, "worker answered out of order"
        job = chunk.job
        if chunk.cancelled or not job.active:
            job.drop_chunk()
            return
        try:
            out, records, errs = p.results(msg, frames)
        except Exception as exc:
            err = ItemPicklingError(f"the results of {chunk.describe()} could not be unpickled in the kernel: {exc}")
            job.items_failed(chunk.indices, err, chunk.items, chunk.start)
        else:
            errors = [(i, rebuild_exception(pe, job.filename_of)) for i, pe in errs]
            rec = ChunkRecord(p.slot, chunk.start, len(out), msg.t0, msg.t1, msg.times, p.pid)
            job.chunk_done(rec, out, records, errors, chunk.items)
        if not job.active:
            self._abandon(job)

    def _on_chunk_failed(self, p: WorkerHandle, msg: P.ChunkFailed) -> None:
        chunk = p.pop_head()
        job = chunk.job
        if chunk.cancelled or not job.active:
            job.drop_chunk()
            return
        exc = rebuild_exception(msg.error, job.filename_of)
        if msg.stage == "decode":
            if len(chunk.items) > 1:  # find the item that does not unpickle
                job.retry_singly(chunk.start, chunk.items)
                return
            err = ItemPicklingError(
                f"{chunk.describe()} could not be unpickled in the worker: "
                f"{type(exc).__name__}: {_errors_safe(exc)}"
            )
            err.__cause__ = exc
            job.items_failed(chunk.indices, err, chunk.items, chunk.start)
        else:
            where = ("the kernel's working directory or environment could not be applied"
                     if msg.stage == "context" else "the function could not be loaded")
            add_note(exc, f"poolmagic: {where} in a worker process.")
            job.drop_chunk()
            job.fail(exc)
        if not job.active:
            self._abandon(job)

    def _on_death(self, p: WorkerHandle) -> None:
        if self._procs.get(p.slot) is not p:
            return
        try:  # results it sent before dying are still valid
            while p.pending():
                self._handle(p, *p.read())
        except (EOFError, OSError):
            pass
        kill_group(p.pid)  # before reaping: what it started dies with it
        p.proc.join(1)
        code = p.proc.exitcode
        self._forget(p)
        if not p.inflight:
            return
        if p.retiring and p.retiring != "failed":  # it left on purpose: nothing it holds ran
            for c in p.inflight:
                self._give_back(c)
            return
        head, *rest = p.inflight
        for c in rest:
            self._give_back(c)
        job = head.job
        if head.cancelled or not job.active:
            job.drop_chunk()
            return
        failure = p.failure
        if failure is None and job.options.keep_going and len(head.items) > 1:
            job.retry_singly(head.start, head.items)  # isolate the item that kills workers
            return
        if failure is not None:
            what = f"could not read a message from the kernel ({type(failure).__name__}: {_errors_safe(failure)})"
        else:
            what = f"died with {exit_description(code)}"
        exc = WorkerCrashedError(
            f"worker {p.slot} (pid {p.pid}) {what} while running {head.describe()}. "
            f"The worker was replaced; items that finished are kept.",
            head.indices,
            code,
        )
        exc.__cause__ = failure
        job.items_failed(head.indices, exc, head.items, head.start)
        job.publish(WorkerReplaced(p.slot, p.pid, what))
        if not job.active:
            self._abandon(job)

    def _check_timeouts(self) -> None:
        now = time.perf_counter()
        for p in list(self._procs.values()):
            if not p.inflight:
                continue
            head = p.inflight[0]
            t = head.job.options.timeout
            if t is None or head.cancelled or now < self._deadline(p):
                continue
            self._kill(p)
            for c in list(p.inflight)[1:]:
                self._give_back(c)
            job = head.job
            exc = ItemTimeoutError(
                f"{head.describe()} ran longer than the {t:g} s timeout; "
                f"its worker was killed and replaced.",
                head.start,
                t,
            )
            job.items_failed(head.indices, exc, head.items, head.start)
            if not job.active:
                self._abandon(job)

    def _next_deadline(self) -> float | None:
        now = time.perf_counter()
        best = None
        for p in self._procs.values():
            if p.inflight and p.inflight[0].job.options.timeout is not None:
                left = self._deadline(p) - now
                best = left if best is None else min(best, left)
        return None if best is None else max(best, 0.0)

    @staticmethod
    def _deadline(p: WorkerHandle) -> float:
        """When the head chunk's timeout expires. Until the worker says it began
        (start-up, imports, loading a big function), a grace period applies."""
        head = p.inflight[0]
        limit = head.job.options.timeout * len(head.items)
        return p.head_started + limit + (0.0 if p.head_begun else START_GRACE_S)

    def _give_back(self, c: Chunk) -> None:
        """A chunk that never started: back to its job (or dropped if cancelled)."""
        if c.cancelled or not c.job.active:
            c.job.drop_chunk()
        else:
            c.job.requeue(c.start, c.items)

    def _abandon(self, job: Job) -> None:
        """Stop all work of a finished, failed or cancelled job at once."""
        for p in list(self._procs.values()):
            if not any(c.job is job for c in p.inflight):
                continue
            if p.inflight[0].job is job:  # running it now: kill, re-queue the others
                self._kill(p)
                for c in p.inflight:
                    self._give_back(c)
            else:
                for c in p.inflight:
                    if c.job is job:
                        c.cancelled = True
        self._forget_finished_jobs()

    # ------------------------------------------------------------ workers
    def _desired(self) -> int:
        """Workers wanted now: the pool's size while maps run, fewer while idle.

        An idle pool keeps at most one worker per core warm; a pool sized far
        above the cores (for waiting-bound work) grows when a map needs it.
        """
        busy = [j for j in self._jobs if j.active]
        if not busy:
            return min(self._size, self._idle_size)
        extra = [j.options.workers for j in busy if j.options.workers]
        return max([self._size, *extra])

    def _ensure_workers(self) -> None:
        want = self._desired()
        limit = max([self._size, *[j.options.workers or 0 for j in self._jobs]])
        for p in list(self._procs.values()):
            if (p.slot >= limit or p.stale) and not p.inflight:
                self._kill(p)
        if self._spawn_error is not None:
            return
        started = 0
        for slot in range(want):
            if slot in self._procs:
                continue
            if started == SPAWN_PER_TURN:
                self._waiter.wake()  # more next turn; results and commands first
                return
            try:
                self._spawn(slot)
            except Exception as exc:
                self._spawn_failed(exc)
                return
            started += 1

    def _spawn_failed(self, exc: BaseException) -> None:
        """Starting a worker failed: with no worker left, the waiting maps fail now.

        The next map tries again (the cause, e.g. too many open files, may be gone).
        """
        self._spawn_error = exc
        if self._procs:
            return
        err = PoolmapError(f"could not start a worker process: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        for job in list(self._jobs):
            job.fail(err)
        self._forget_finished_jobs()

    def _spawn(self, slot: int) -> None:
        block_sigint()
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        try:
            # under forkserver a worker inherits what the server preloaded
            warm = [] if self.start_method == "forkserver" else warm_modules()
            proc = self.ctx.Process(
                target=_worker.main, args=(child_conn, slot, warm), name=f"{WORKER_NAME}-{slot}", daemon=True
            )
            proc.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        p = WorkerHandle(slot, proc, parent_conn)
        self._procs[slot] = p
        self._waiter.add(parent_conn, (_PIPE, p))
        self._waiter.add(p.sentinel, (_DEATH, p))

    def _kill(self, p: WorkerHandle) -> None:
        p.kill()
        self._forget(p)

    def _forget(self, p: WorkerHandle) -> None:
        if self._procs.get(p.slot) is p:
            del self._procs[p.slot]
        self._waiter.remove(p.conn)
        self._waiter.remove(p.sentinel)
        p.close()

    def _kill_all(self) -> None:
        procs = list(self._procs.values())
        for p in procs:
            kill_group(p.pid)
            try:
                p.proc.kill()
            except Exception:
                pass
        for p in procs:
            try:
                p.proc.join(2)  # reap: no zombies
            except Exception:
                pass
            self._forget(p)

    def _refresh_stale(self) -> None:
        """Recycle workers whose imported user modules changed on disk."""
        cache: dict[str, int | None] = {}
        for p in self._procs.values():
            for path, mtime in p.modules.values():
                if path not in cache:
                    try:
                        cache[path] = os.stat(path).st_mtime_ns
                    except OSError:
                        cache[path] = None
                if cache[path] != mtime:
                    p.stale = True
                    break
        self._ensure_workers()

    # ------------------------------------------------------------ scheduling
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
        keep = []
        for j in self._jobs:
            if j.active:
                keep.append(j)
            else:
                j.payload.release()
                self._item_times.remember(j)
        self._jobs = keep

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
            p.send_chunk(Chunk(seq, job, start, items), data, frames)
        except OSError:
            pass  # the worker is dying; its sentinel will report it and re-queue

    def _unpicklable_items(self, job: Job, start: int, items: Any) -> None:
        bad: dict[int, BaseException] = {}
        for k, x in enumerate(items):
            try:
                cloudpickle.dumps(x, protocol=5)
            except Exception as exc:
                bad[k] = ItemPicklingError(
                    f"item {start + k} is {describe(x)}, which cannot be pickled to send it "
                    f"to a worker: {_errors_safe(exc)}"
                )
        if not bad:  # the items pickle one by one; report the whole chunk
            bad = {0: ItemPicklingError(f"items {start}–{start + len(items) - 1} cannot be pickled")}
        job.split_failed(start, items, bad)
        if not job.active:
            self._abandon(job)


def _errors_safe(exc: BaseException) -> str:
    from ..errors import safe_str

    return safe_str(exc)
