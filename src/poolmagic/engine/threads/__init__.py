"""The threads backend: a map's items run on threads of the kernel's own process.

For maps that wait (HTTP requests, files, subprocesses, sleeps) it skips what
processes cost: no pickling of items or results, no process start. On a
free-threaded Python (3.13t/3.14t, the GIL off) CPU-bound items run in
parallel too; with the GIL they take turns, and ``%poolsize`` says which.

It drives the same Job as the other backends: each thread takes a chunk with
``job.next_items`` (sized by the Job from measured item times), runs it with
``core.runchunk.run_chunk`` (the per-chunk loop of every worker: print() capture,
seeds, timing, errors packed with their frames) and answers with
``job.chunk_done``. So results, errors, retries, keep-going, resume,
checkpoint, progress and the summary are the Job's, as everywhere.

What a thread cannot do is declared in ``LACKS``: a running thread cannot be
killed, so no ``--timeout``, an interrupt or ``.cancel()`` ends the map but
lets each running item finish in the background, an item that crashes the
process (``os._exit``, a segfault) ends the kernel, and memory is the
kernel's own. Maps asking for those are refused before they start.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any

from ...errors import BadInputError, NestedPoolError, PoolmapError, rebuild_exception
from ..base import Backend
from ..core.events import ChunkRecord, MapFinished
from ..core.job import Job
from ..core.schedule import RoundRobin, timed, workers_for
from ..core.transport import (CAPABILITIES, CRASH_ISOLATION, KILL_ON_INTERRUPT, KILL_ON_TIMEOUT, MEMORY_LIMIT,
                              NATIVE_THREAD_LIMIT, OWN_PROCESS, WORKER_SETUP)
from ..core.runchunk import run_chunk
from .. import seeds
from . import streams

IDLE_WAIT_S = 0.5  # an idle thread looks again at least this often (a wake-up is never needed for correctness)

# what threads cannot do (core/transport.py CAPABILITIES), and why: %poolsize shows it, a map
# asking for it is refused (Backend.check_options), the conformance suite skips on it
LACKS: dict[str, str] = {
    KILL_ON_TIMEOUT: "a thread cannot be stopped while it runs an item",
    MEMORY_LIMIT: "items share the kernel's memory: no worker of their own to stop and replace",
    CRASH_ISOLATION: "an item that ends its process (os._exit, a segfault) ends the kernel",
    KILL_ON_INTERRUPT: "an interrupt or .cancel() ends the map at once; items already running "
                       "finish in the background",
    NATIVE_THREAD_LIMIT: "BLAS and OpenMP thread pools are the kernel's own: a limit would be the "
                         "notebook's too, and OpenBLAS lets only the main thread raise it again",
    WORKER_SETUP: "there is no worker process to set up or retire: call the setup once in the "
                  "notebook, the threads share it",
    OWN_PROCESS: "items run in the kernel's process: what an item changes there (os.chdir, "
                 "os.environ, globals) stays changed",
}
# a seeded item seeds the process's `random` and `np.random`: one seeded item at a time
_SEED_LOCK = threading.Lock()
_here = threading.local()  # .backend: the ThreadsBackend whose worker this thread is


def gil_enabled() -> bool:
    """Whether this interpreter runs Python code one thread at a time (the GIL is on)."""
    check = getattr(sys, "_is_gil_enabled", None)  # 3.13+: False on a free-threaded build running without it
    return True if check is None else bool(check())


class ThreadsBackend(Backend):
    """Worker threads in the kernel's process, taking chunks from the running Jobs."""

    name = "threads"
    lacks = LACKS  # type: ignore[assignment]  (a mapping: each capability with its reason)

    def __init__(self, size: int):
        self._size = max(1, int(size))
        self._jobs: list[Job] = []
        self._threads: dict[int, threading.Thread] = {}
        self._running: dict[int, Job] = {}  # slot -> the job whose chunk its thread runs
        self._cv = threading.Condition()
        # Every call into a job from this backend (a chunk started, progress, its answer, a stop)
        # holds this: the Job expects them from one backend thread, and its observers (the
        # checkpoint writer, the live counts) rely on that order: a map's end after its chunks.
        self._answer = threading.RLock()
        self._gen = 0  # bumped by every wake-up: a thread that found no work waits only if nothing changed
        self._turn = RoundRobin()
        self._closed = False
        self.free_threaded = not gil_enabled()
        self.description = "threads in this process (" + ("free-threaded)" if self.free_threaded else "GIL)")

    @classmethod
    def make(cls, size: int, address: str | None = None, dashboard: bool = False) -> "ThreadsBackend":
        """``Pool(backend="threads")``: refuses what only the dask backend takes."""
        if address is not None or dashboard:
            raise BadInputError(f"{'address=' if address is not None else 'dashboard='} goes with "
                                f"backend=\"dask\"; the threads backend runs in this process")
        return cls(size)

    @property
    def size(self) -> int:
        return self._size

    @property
    def state(self) -> str:
        return "warm" if self._threads else "cold"

    def status_detail(self) -> str:
        """%poolsize's lines under the status: what runs in parallel here, what threads cannot do."""
        if self.free_threaded:
            how = "free-threaded Python (GIL off): CPU-bound items run in parallel too"
        else:
            how = ("the GIL is on: items that wait (I/O, sleep, subprocesses) overlap, CPU-bound Python "
                   "items take turns (a free-threaded Python, 3.13t+, runs them in parallel)")
        lines = [f"  threads: {how}", "  threads cannot:"]
        lines += [f"    {CAPABILITIES[cap].split(':')[0]}: {why}" for cap, why in self.lacks.items()]
        return "\n".join(lines)

    def start(self) -> None:
        with self._cv:
            if self._closed:
                raise PoolmapError("this pool has been shut down")
            self._grow_locked()

    def submit(self, job: Job) -> None:
        if getattr(_here, "backend", None) is self:  # it would wait for a thread it holds itself
            raise NestedPoolError(
                "an item running on the threads backend mapped over the same pool: the map would wait "
                "for threads its own items hold. Call the function directly (or in a plain loop) here, "
                "or map the inner work and not the outer one.")
        job.abort = lambda exc: self.cancel(job, exc, wait=0)
        job.source.on_items = self._wake
        job.source.set_want(2 * workers_for(job, self._size))
        job.observers.append(lambda event: self._finished(job) if type(event) is MapFinished else None)
        with self._cv:
            if self._closed:
                raise PoolmapError("this pool has been shut down")
            self._jobs.append(job)
            self._grow_locked()
        with self._answer:
            job.maybe_finish()  # an empty ITERABLE is done at once
        self._wake()

    def cancel(self, job: Job, error: BaseException | None = None, wait: float = 1.0) -> None:
        """End ``job`` now. Its running items cannot be stopped: they finish in the background (their
        results are kept, late) while fresh threads take their slots, so the next map does not wait."""
        with self._answer:
            job.stop(error)  # _finished (an observer of the job) frees the slots
        self._wake()

    def resize(self, n: int) -> None:
        with self._cv:
            self._size = max(1, int(n))
            if self._threads:
                self._grow_locked()
        self._wake()

    def worker_pids(self) -> list[int]:
        return []  # no process of its own: nothing can outlive the pool

    def shutdown(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            jobs, self._jobs = list(self._jobs), []
            threads = list(self._threads.values())
        for job in jobs:
            with self._answer:
                job.fail(PoolmapError("the pool was shut down while this map was running"))
        self._wake()
        for t in threads:  # idle threads leave at once; one running an item cannot be stopped
            t.join(0.1)

    # ------------------------------------------------------------ the worker threads
    def _target(self) -> int:
        return max([self._size, *(j.options.workers or 0 for j in self._jobs)])

    def _grow_locked(self) -> None:
        for slot in range(self._target()):
            if slot not in self._threads:
                t = threading.Thread(target=self._serve, args=(slot,), name=f"poolmagic-thread-{slot}", daemon=True)
                self._threads[slot] = t
                t.start()

    def _wake(self) -> None:
        with self._cv:
            self._gen += 1
            self._cv.notify_all()

    def _serve(self, slot: int) -> None:
        me = threading.current_thread()
        _here.backend = self
        while True:
            with self._cv:
                gen = self._gen
                if self._threads.get(slot) is not me:  # replaced (its map was cancelled meanwhile)
                    return
                if self._closed or slot >= self._target():
                    del self._threads[slot]
                    return
            got = self._take(slot)
            if got is not None:
                self._run(slot, *got)
                with self._cv:
                    if self._threads.get(slot) is me:
                        self._running.pop(slot, None)
                self._wake()  # the chunk may have queued retries or ended a map: idle threads look again
                continue
            with self._cv:
                if gen == self._gen and not self._closed:
                    self._cv.wait(IDLE_WAIT_S)

    def _take(self, slot: int) -> tuple[Job, int, Any] | None:
        """A chunk for thread ``slot``: maps take turns (core.schedule), a ``-n N`` map uses threads 0..N-1."""
        with self._cv:
            self._jobs = [j for j in self._jobs if j.active]
            jobs = list(self._jobs)
        for _ in jobs:
            with self._cv:
                job = self._turn.pick(jobs, slot)
                if job is None:
                    return None
                self._running[slot] = job  # before taking: a cancel from now on frees this slot (_finished)
            size = job.chunk_size(workers_for(job, self._size))
            if job.source.is_stream:
                job.source.set_want(size * max(2, workers_for(job, self._size)))
            got = job.next_items(size)
            if got is not None:
                return job, got[0], got[1]
            with self._cv:
                if self._running.get(slot) is job:
                    del self._running[slot]
        return None

    def _run(self, slot: int, job: Job, start: int, items: Any) -> None:
        """Run one chunk on this thread and hand its outcome to the job (always exactly one answer)."""
        answered = False
        try:
            o = job.options
            tid = threading.get_native_id()
            with self._answer:
                job.started(slot, tid, start, len(items))
            t_sent = time.perf_counter()
            if o.seed is not None:
                _SEED_LOCK.acquire()
                saved = seeds.save_streams()  # the kernel's own streams: put back after the chunk
            try:
                r = run_chunk(job.func, items, o, start=start, timed=timed(job),
                              progress=lambda done: self._progress(job, start, done),
                              indices=job.seed_indices(start, len(items)), redirect=streams.redirect,
                              clock=time.thread_time)
            finally:
                if o.seed is not None:
                    seeds.restore_streams(saved)
                    _SEED_LOCK.release()
            errors = [(i, rebuild_exception(pe, job.filename_of)) for i, pe in r.errors]
            rec = ChunkRecord(slot, start, len(r.out), r.t0, r.t1, r.times, tid, t_sent=t_sent,
                              t_recv=time.perf_counter(), cpu_s=r.cpu_s, waited_s=r.waited_s or 0.0)
            with self._answer:
                answered = True
                job.chunk_done(rec, r.out, r.records, errors, items)
        except BaseException as exc:  # poolmagic's own failure: the map fails, never hangs
            if answered:  # the job has its answer: a second one would count the chunk twice
                import traceback

                traceback.print_exc(file=sys.__stderr__)  # a bug of poolmagic's: said, the thread goes on
                return
            with self._answer:
                job.items_failed(list(range(start, start + len(items))), exc, items, start)

    def _progress(self, job: Job, start: int, done: int) -> None:
        with self._answer:
            job.progress(start, done)

    # ------------------------------------------------------------ a map ended
    def _finished(self, job: Job) -> None:
        """A map ended (done, failed, cancelled): threads still running its items are left to finish
        them alone, and fresh threads take their slots."""
        me = threading.current_thread()
        with self._cv:
            for slot in [s for s, j in self._running.items() if j is job and self._threads.get(s) is not me]:
                del self._running[slot], self._threads[slot]  # its thread leaves after its chunk
            # fresh threads for the maps still running too: one waiting while the ended map held
            # every thread was left with none (a blocking map behind a cancelled --async one hung)
            if not self._closed and (self._threads or any(j.active for j in self._jobs)):
                self._grow_locked()


__all__ = ["ThreadsBackend", "gil_enabled", "LACKS"]
