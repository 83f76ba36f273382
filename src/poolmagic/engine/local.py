"""The local backend: supervised worker processes on a safe start method.

How data flows::

    caller thread (kernel)        manager thread (one per pool)            worker process (N)
    ──────────────────────        ─────────────────────────────            ──────────────────
    Pool.run(f, items)
      submit(Job) ──► commands ──► wait(wake pipe, every worker's
                                        pipe and process sentinel)
                                   (one epoll set, kept up to date)
                                   schedule: job.next_items(size)
                                   FN payload (once per worker and     ──► reader thread ──► inbox
                                     function version, out-of-band            │
                                     buffers as raw frames)                   ▼
                                   RUN chunk (≤ 2 in flight/worker)    ──► main thread runs items,
                                                                            captures print(), times
                                   DONE: results, errors, output,      ◄──  them, packs exceptions
                                     per-item times
                                   job.chunk_done ─► report.results[i:j]
      job.wait() ◄── notify ──────┘
      prints output in item order
    KeyboardInterrupt
      cancel(job) ──► commands ──► kill the workers running its items,
                                   start replacements (a fork of the
                                   warm forkserver: milliseconds)
                                   sentinel fires (crash) / deadline
                                   passes (timeout) ─► the running
                                   items fail, queued ones are re-queued,
                                   the worker is replaced

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
import pickle
import sys
import threading
import time
from collections import OrderedDict, deque
from multiprocessing import reduction
from typing import Any, Callable

import cloudpickle

from ..errors import (
    ItemPicklingError,
    ItemTimeoutError,
    PoolmapError,
    WorkerCrashedError,
    add_note,
    exit_description,
    rebuild_exception,
    short_repr,
)
from ..report import ChunkRecord
from ..serialize import Payload, describe
from . import worker as _worker
from .base import Backend, ItemTimes, Job
from .processes import (
    WORKER_NAME,
    Waiter,
    block_sigint,
    default_start_method,
    forkserver_preload,
    install_main_guard,
    shared_buffers,
    start_resource_tracker,
    stop_at_exit,
    warm_modules,
)

START_GRACE_S = 30.0  # a timed chunk's clock starts when it begins, or after this
WINDOW = 2  # chunks in flight per worker: one running, one ready behind it
TIMED_ABOVE_S = 10e-6  # per-item timing costs ~0.1 µs: only for items longer than this
SHARED_MIN_BYTES = 1 << 20  # out-of-band buffers above this go through shared memory


_PIPE, _DEATH = "pipe", "death"  # what the waiter reports about a worker

class _Chunk:
    __slots__ = ("seq", "job", "start", "items", "cancelled")

    def __init__(self, seq: int, job: Job, start: int, items: Any):
        self.seq, self.job, self.start, self.items = seq, job, start, items
        self.cancelled = False

    def describe(self) -> str:
        n = len(self.items)
        if n == 1:
            return f"item {self.start} ({short_repr(self.items[0])})"
        return f"items {self.start}–{self.start + n - 1}"


class _Proc:
    """The parent's handle on one worker process."""

    def __init__(self, slot: int, proc: Any, conn: Any):
        self.slot, self.proc, self.conn = slot, proc, conn
        self.pid: int = proc.pid
        self.sentinel: int = proc.sentinel
        self.inflight: deque[_Chunk] = deque()
        self.fns: OrderedDict[str, None] = OrderedDict()
        self.head_started = time.perf_counter()
        self.head_begun = False  # the worker said it started the head chunk
        self.modules: dict[str, tuple[str, int]] = {}
        self.stale = False


class LocalBackend(Backend):
    """Worker processes on this machine, supervised by a manager thread."""

    def __init__(self, size: int, start_method: str | None = None):
        self.start_method = start_method or default_start_method()
        self.ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            self.ctx.set_forkserver_preload(forkserver_preload())
        self.description = f"local processes ({self.start_method})"
        install_main_guard()
        self._size = max(1, int(size))
        self._procs: dict[int, _Proc] = {}
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
        with self._lock:
            if self._closed:
                raise PoolmapError("this pool has been shut down")
            if self._thread is None:
                stop_at_exit(self)
                self._thread = threading.Thread(target=self._main, name="poolmagic-manager", daemon=True)
                self._thread.start()

    def submit(self, job: Job) -> None:
        self.start()

        def cmd() -> None:
            self._item_times.recall(job)
            self._jobs.append(job)
            job.maybe_finish()  # an empty ITERABLE is done at once
            self._refresh_stale()

        self._command(cmd)

    def cancel(self, job: Job, wait: float = 1.0) -> None:
        done = threading.Event()

        def cmd() -> None:
            job.fail(KeyboardInterrupt(), status="cancelled")
            self._abandon(job)
            done.set()

        self._command(cmd)
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
        if any(j.timeout is not None for j in self._jobs):
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

    def _read_one(self, p: _Proc) -> None:
        try:
            data = p.conn.recv_bytes()
        except (EOFError, OSError):
            self._on_death(p)
            return
        self._handle(p, data)

    def _read_messages(self, p: _Proc) -> None:
        """Handle every message the worker has sent so far (when it died)."""
        while p.conn.poll():
            self._handle(p, p.conn.recv_bytes())

    def _handle(self, p: _Proc, data: bytes) -> None:
        try:
            msg = pickle.loads(data)
        except Exception as exc:
            self._unloadable_results(p, exc)
            return
        if msg[0] == _worker.BEGIN:
            self._on_begin(p, msg[1])
        else:
            self._on_done(p, msg)

    def _on_begin(self, p: _Proc, seq: int) -> None:
        """A timed chunk really started: its timeout counts from now."""
        if p.inflight and p.inflight[0].seq == seq:
            p.head_started = time.perf_counter()
            p.head_begun = True

    def _on_done(self, p: _Proc, msg: tuple) -> None:
        _, seq, out, t0, t1, times, records, errs, fatal, mods = msg
        if mods:
            p.modules.update(mods)
        chunk = p.inflight.popleft()
        assert chunk.seq == seq, "worker answered out of order"
        p.head_started = time.perf_counter()
        p.head_begun = False
        job = chunk.job
        if chunk.cancelled or not job.active:
            job.drop_chunk()
            return
        if fatal is not None:
            exc = rebuild_exception(fatal, job.filename_of)
            add_note(exc, "poolmagic: the function could not be loaded in a worker process.")
            job.drop_chunk()
            job.fail(exc)
            self._abandon(job)
            return
        errors = [(i, rebuild_exception(pe, job.filename_of)) for i, pe in errs]
        rec = ChunkRecord(p.slot, chunk.start, len(out), t0, t1, times)
        job.chunk_done(rec, out, records, errors, chunk.items)
        if not job.active:
            self._abandon(job)

    def _unloadable_results(self, p: _Proc, exc: BaseException) -> None:
        chunk = p.inflight.popleft()
        p.head_started = time.perf_counter()
        idx = list(range(chunk.start, chunk.start + len(chunk.items)))
        err = ItemPicklingError(
            f"the results of {chunk.describe()} could not be unpickled in the kernel: {exc}"
        )
        chunk.job.item_failed(idx, err, chunk.items, chunk.start)

    def _on_death(self, p: _Proc) -> None:
        if self._procs.get(p.slot) is not p:
            return
        try:  # results it sent before dying are still valid
            self._read_messages(p)
        except (EOFError, OSError):
            pass
        p.proc.join(1)
        code = p.proc.exitcode
        self._forget(p)
        if not p.inflight:
            return
        head, *rest = p.inflight
        for c in rest:
            self._give_back(c)
        job = head.job
        if head.cancelled or not job.active:
            job.drop_chunk()
            return
        if job.keep_going and len(head.items) > 1:
            job.retry_singly(head.start, head.items)  # isolate the item that kills workers
            return
        idx = list(range(head.start, head.start + len(head.items)))
        exc = WorkerCrashedError(
            f"worker {p.slot} (pid {p.pid}) died with {exit_description(code)} while running "
            f"{head.describe()}. The worker was replaced; items that finished are kept.",
            idx,
            code,
        )
        job.item_failed(idx, exc, head.items, head.start)
        if not job.active:
            self._abandon(job)

    def _check_timeouts(self) -> None:
        now = time.perf_counter()
        for p in list(self._procs.values()):
            if not p.inflight:
                continue
            head = p.inflight[0]
            t = head.job.timeout
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
            job.item_failed(list(range(head.start, head.start + len(head.items))), exc, head.items, head.start)
            if not job.active:
                self._abandon(job)

    def _next_deadline(self) -> float | None:
        now = time.perf_counter()
        best = None
        for p in self._procs.values():
            if p.inflight and p.inflight[0].job.timeout is not None:
                left = self._deadline(p) - now
                best = left if best is None else min(best, left)
        return None if best is None else max(best, 0.0)

    @staticmethod
    def _deadline(p: _Proc) -> float:
        """When the head chunk's timeout expires. Until the worker says it began
        (start-up, imports, loading a big function), a grace period applies."""
        head = p.inflight[0]
        limit = head.job.timeout * len(head.items)
        return p.head_started + limit + (0.0 if p.head_begun else START_GRACE_S)

    def _give_back(self, c: _Chunk) -> None:
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
        extra = [j.max_workers for j in self._jobs if j.active and j.max_workers]
        return max([self._size, *extra])

    def _ensure_workers(self) -> None:
        want = self._desired()
        for p in list(self._procs.values()):
            if (p.slot >= want or p.stale) and not p.inflight:
                self._kill(p)
        if self._spawn_error is not None:
            return
        for slot in range(want):
            if slot not in self._procs:
                try:
                    self._spawn(slot)
                except Exception as exc:
                    self._spawn_error = exc
                    for job in list(self._jobs):
                        job.fail(PoolmapError(f"could not start a worker process: {exc!r}"))
                    return

    def _spawn(self, slot: int) -> None:
        block_sigint()
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        # under forkserver a worker inherits what the server preloaded
        warm = [] if self.start_method == "forkserver" else warm_modules()
        proc = self.ctx.Process(
            target=_worker.main, args=(child_conn, slot, warm), name=f"{WORKER_NAME}-{slot}", daemon=True
        )
        proc.start()
        child_conn.close()
        p = _Proc(slot, proc, parent_conn)
        self._procs[slot] = p
        self._waiter.add(parent_conn, (_PIPE, p))
        self._waiter.add(p.sentinel, (_DEATH, p))

    def _kill(self, p: _Proc) -> None:
        try:
            p.proc.kill()
            p.proc.join(2)
        except Exception:
            pass
        self._forget(p)

    def _forget(self, p: _Proc) -> None:
        if self._procs.get(p.slot) is p:
            del self._procs[p.slot]
        self._waiter.remove(p.conn)
        self._waiter.remove(p.sentinel)
        try:
            p.conn.close()
        except OSError:
            pass
        try:
            p.proc.close()
        except (ValueError, AttributeError):
            pass

    def _kill_all(self) -> None:
        procs = list(self._procs.values())
        for p in procs:
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
                if p.stale or len(p.inflight) >= WINDOW:
                    continue
                job = self._pick(jobs, p)
                if job is None:
                    continue
                got = job.next_items(job.chunk_size(self._workers_for(job)))
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
        want = self._desired()
        return min(want, job.max_workers or want)

    def _forget_finished_jobs(self) -> None:
        keep = []
        for j in self._jobs:
            if j.active:
                keep.append(j)
            else:
                j.payload.release()
                self._item_times.remember(j)
        self._jobs = keep

    def _pick(self, jobs: list[Job], p: _Proc) -> Job | None:
        n = len(jobs)
        for k in range(n):
            job = jobs[(self._rr + k) % n]
            if job.has_work() and (job.max_workers is None or p.slot < job.max_workers):
                self._rr = (self._rr + k + 1) % max(n, 1)
                return job
        return None

    def _send_chunk(self, p: _Proc, job: Job, start: int, items: Any) -> None:
        key = job.payload.key
        t = job.per_item_s()
        timed = t is None or t >= TIMED_ABOVE_S
        ack = job.timeout is not None
        msg = (_worker.RUN, next(self._seq), key, start, items, job.star, timed, job.keep_going, job.seed, ack)
        try:
            # a range slice needs no cloudpickle (whose Pickler costs ~6 µs to set up);
            # anything else may hold notebook-defined classes, pickled by value
            data = pickle.dumps(msg, protocol=5) if type(items) is range else cloudpickle.dumps(msg, protocol=5)
        except Exception:
            self._unpicklable_items(job, start, items)
            return
        try:
            if key not in p.fns:
                self._send_fn(p, job.payload)
            if not p.inflight:
                p.head_started = time.perf_counter()
                p.head_begun = False
            p.inflight.append(_Chunk(msg[1], job, start, items))
            p.conn.send_bytes(data)
        except OSError:
            pass  # the worker is dying; its sentinel will report it and re-queue

    def _send_fn(self, p: _Proc, payload: Payload) -> None:
        sizes = [b.nbytes for b in payload.buffers]
        fd = shared_buffers(payload) if sum(sizes) >= SHARED_MIN_BYTES else None
        header = (_worker.FN, payload.key, payload.data, sizes, payload.cwd, payload.sys_path, fd is not None)
        p.conn.send_bytes(pickle.dumps(header, protocol=5))
        if fd is not None:  # one shared copy for all workers: pass the descriptor
            reduction.send_handle(p.conn, fd, p.pid)
        else:
            for b in payload.buffers:
                p.conn.send_bytes(b if b.nbytes else b"")
        p.fns[payload.key] = None
        while len(p.fns) > _worker.FN_CACHE_SIZE:
            p.fns.popitem(last=False)

    def _unpicklable_items(self, job: Job, start: int, items: Any) -> None:
        bad: dict[int, BaseException] = {}
        for k, x in enumerate(items):
            try:
                cloudpickle.dumps(x, protocol=5)
            except Exception as exc:
                bad[k] = ItemPicklingError(
                    f"item {start + k} is {describe(x)}, which cannot be pickled to send it "
                    f"to a worker: {exc}"
                )
        if not bad:  # the items pickle one by one; report the whole chunk
            bad = {0: ItemPicklingError(f"items {start}–{start + len(items) - 1} cannot be pickled")}
        job.split_failed(start, items, bad)
        if not job.active:
            self._abandon(job)
