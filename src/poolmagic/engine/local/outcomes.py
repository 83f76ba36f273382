"""What each local worker reply, death or deadline does to the job it concerns.

The local backend's side of the failure policy (core/failures.py decides
what a failed chunk or a lost worker means for a map; this reads the
workers' messages and sees their deaths and deadlines): a crash fails the
running item and hands queued chunks back, a timeout or memory stop kills
the worker, a finished, failed or cancelled job stops all its work at once.
Runs on the manager thread.
"""
from __future__ import annotations

import time
from typing import Any, Callable


from ...errors import (
    ItemTimeoutError,
    WorkerCrashedError,
    WorkerMemoryError,
    exit_description,
    rebuild_exception,
    safe_str,
)
from .. import memory
from .. import protocol as P
from ..core.events import ChunkRecord
from ..core.failures import FailurePolicy
from ..core.job import Job
from ..core.runchunk import thread_faults
from ..handle import WorkerHandle, kill_group
from .workers import WorkerSet

START_GRACE_S = 30.0  # a timed chunk's clock starts when it begins, or after this
START_ATTEMPTS = 3  # workers that die before they are ready, in a row, before the maps fail


class Outcomes:
    """Reactions to replies, deaths and deadlines; ``jobs`` is the manager's list of running maps."""

    def __init__(self, workers: WorkerSet, jobs: list[Job], forget_finished: Callable[[], None]):
        self.workers = workers
        self.jobs = jobs
        self.forget_finished = forget_finished
        self.policy = FailurePolicy(self.abandon)
        self.next_guard = 0.0  # when the memory guard looks next
        self.start_failures = 0  # workers in a row that died before they were ready

    def handle(self, p: WorkerHandle, msg: Any, frames: list | None) -> None:
        kind = type(msg)
        if kind is P.ChunkDone:
            self._on_done(p, msg, frames)
        elif kind is P.Ready:
            p.ready = True
            self.start_failures = 0
        elif kind is P.Began:
            p.began(msg.seq)
        elif kind is P.Progress:
            if p.inflight and p.inflight[0].seq == msg.seq:
                head = p.inflight[0]
                head.job.progress(head.start, msg.done)
                if head.job.options.timeout is not None:
                    p.began(msg.seq)  # the next item began: its timeout counts from now
        elif kind is P.ChunkFailed:
            self._on_chunk_failed(p, msg)
        elif kind is P.WorkerFailed:
            p.retiring = "failed"
            p.failure = rebuild_exception(msg.error)

    def _on_done(self, p: WorkerHandle, msg: P.ChunkDone, frames: list | None) -> None:
        job = self._place_done(p, msg, frames)
        if not job.active:
            self.abandon(job)

    def _place_done(self, p: WorkerHandle, msg: P.ChunkDone, frames: list | None) -> Job:
        if msg.modules:
            p.modules.update(msg.modules)
        if msg.recycle:
            p.retiring = msg.recycle  # it exits now; what it still holds never ran
        chunk = p.pop_head()
        assert chunk.seq == msg.seq, "worker answered out of order"
        job = chunk.job  # an ended job keeps what finished too (Job.chunk_done)
        if msg.modules:
            _note_behind(job, msg.modules)
        faults = thread_faults()
        try:
            out, records, errs = p.results(msg, frames)
        except Exception as exc:
            self.policy.results_undecodable(chunk, exc)
        else:
            errors = [(i, rebuild_exception(pe, job.filename_of)) for i, pe in errs]
            rec = ChunkRecord(p.slot, chunk.start, len(out), msg.t0, msg.t1, msg.times, p.pid,
                              t_sent=chunk.t_sent, t_recv=time.perf_counter(),
                              nbytes=len(msg.body) + sum(msg.sizes), waited_s=msg.waited or 0.0, cpu_s=msg.cpu,
                              faults=msg.faults)
            job.chunk_done(rec, out, records, errors, chunk.items, (msg.body, frames))
            if faults is not None:  # fresh memory the kernel touched to hold the results (diagnose.py)
                rec.kept_faults = thread_faults() - faults
        return job

    def _on_chunk_failed(self, p: WorkerHandle, msg: P.ChunkFailed) -> None:
        chunk = p.pop_head()
        self.policy.chunk_failed(chunk, msg.stage, rebuild_exception(msg.error, chunk.job.filename_of))

    def on_death(self, p: WorkerHandle) -> None:
        if self.workers.procs.get(p.slot) is not p:
            return
        self.workers.read_elsewhere.add(p)
        try:  # results it sent before dying are still valid
            while p.pending():
                self.handle(p, *p.read())
        except (EOFError, OSError):
            pass
        kill_group(p.pid)  # before reaping: what it started dies with it
        p.proc.join(1)
        code = p.proc.exitcode
        self.workers.forget(p)
        if not p.ready:  # it never started: nothing it holds ran; no item is to blame
            for c in p.inflight:
                self.policy.give_back(c)
            self.start_failures += 1
            if self.start_failures >= START_ATTEMPTS and not any(q.ready for q in self.workers.procs.values()):
                self.start_failures = 0
                self.workers.spawn_failed(RuntimeError(f"{START_ATTEMPTS} workers in a row exited with "
                                                f"{exit_description(code)} before they were ready"))
            return
        if not p.inflight:
            return
        if p.retiring and p.retiring != "failed":  # it left on purpose: nothing it holds ran
            for c in p.inflight:
                self.policy.give_back(c)
            return
        head, *rest = p.inflight
        for c in rest:
            self.policy.give_back(c)
        failure = p.failure
        if failure is not None:
            what = f"could not read a message from the kernel ({type(failure).__name__}: {safe_str(failure)})"
        else:
            what = f"died with {exit_description(code)}"

        def error() -> BaseException:
            exc = WorkerCrashedError(f"worker {p.slot} (pid {p.pid}) {what} while running {head.describe()}. "
                                     f"The worker was replaced; items that finished are kept.", head.item_indices(), code)
            exc.__cause__ = failure
            return exc

        # Which of its items killed it? Run them again one by one: the error
        # then names the item, and a chunk is only ~25 ms of work. (A counter
        # the worker updates per item would cost the fast path ~0.1 µs/item.)
        self.policy.worker_lost(head, WorkerCrashedError, f"worker {p.slot} (pid {p.pid}) {what} while "
                                 f"running {head.describe()}", error, isolate=failure is None,
                                 worker=p.slot)

    def check_timeouts(self) -> None:
        now = time.perf_counter()
        for p in list(self.workers.procs.values()):
            if not p.inflight:
                continue
            head = p.inflight[0]
            t = head.job.options.timeout
            if t is None or head.cancelled or now < self.deadline(p):
                continue
            self.workers.stop_worker(p)
            for c in list(p.inflight)[1:]:
                self.policy.give_back(c)
            self.policy.worker_lost(
                head, ItemTimeoutError, f"{head.describe()} ran longer than the {t:g} s timeout per item",
                lambda head=head, t=t: ItemTimeoutError(f"{head.describe()} ran longer than the {t:g} s timeout; "
                                                        f"its worker was killed and replaced.", head.item_indices()[0], t),
                worker=p.slot)

    def next_deadline(self) -> float | None:
        now = time.perf_counter()
        best = None
        for p in self.workers.procs.values():
            if p.inflight and p.inflight[0].job.options.timeout is not None:
                left = self.deadline(p) - now
                best = left if best is None else min(best, left)
        if self.jobs and memory.SUPPORTED:  # the memory guard looks while maps run
            left = self.next_guard - now
            best = left if best is None else min(best, left)
        return None if best is None else max(best, 0.0)

    def guard_memory(self) -> None:
        """Stop a worker over its map's --max-memory, or the largest when memory runs out."""
        self.next_guard = time.perf_counter() + memory.PERIOD_S
        stops = memory.over_limit({p: (p.pid, p.inflight[0].job.options.max_memory)
                                   for p in self.workers.procs.values() if p.inflight},
                                  held=sum(j.received for j in self.jobs if j.active))
        for p, size, why in stops:
            head = p.inflight[0]
            self.workers.stop_worker(p)
            for c in list(p.inflight)[1:]:
                self.policy.give_back(c)
            what = f"worker {p.slot} (pid {p.pid}) was stopped while running {head.describe()}: {why}"
            self.policy.worker_lost(
                head, WorkerMemoryError, what,
                lambda head=head, what=what, size=size: WorkerMemoryError(
                    f"{what}. The worker was replaced; items that finished are kept.",
                    head.item_indices(), size, head.job.options.max_memory), worker=p.slot)

    @staticmethod
    def deadline(p: WorkerHandle) -> float:
        """When the running item's timeout expires. Until the worker says the chunk
        began (start-up, imports, loading a big function), a grace period applies.

        The clock restarts at each report of a chunk of several items (a report is
        checked for before each item, sent once ``progress_every`` passed since the
        last): the item running began at most that long after the last report, so
        none fails before it ran the timeout, and a hung one fails within that much after."""
        head = p.inflight[0]
        t = head.job.options.timeout
        limit = t + (P.progress_every(t) if len(head.items) > 1 else 0.0)
        return p.head_started + limit + (0.0 if p.head_begun else START_GRACE_S)

    def abandon(self, job: Job) -> None:
        """Stop all work of a finished, failed or cancelled job at once."""
        for p in list(self.workers.procs.values()):
            if not any(c.job is job for c in p.inflight):
                continue
            if p.inflight[0].job is job:
                self._drain(p, job)  # results it sent already finished: the job keeps them
            if p.inflight and p.inflight[0].job is job:  # running it now: kill, re-queue the others
                self.workers.stop_worker(p)
                for c in p.inflight:
                    self.policy.give_back(c)
            else:
                for c in p.inflight:
                    if c.job is job:
                        c.cancelled = True
        self.forget_finished()

    def _drain(self, p: WorkerHandle, job: Job) -> None:
        """Take the results of ``job`` that ``p`` sent and we have not read yet (before it is killed)."""
        self.workers.read_elsewhere.add(p)
        try:
            while p.inflight and p.inflight[0].job is job and p.pending():
                msg, frames = p.read()
                kind = type(msg)
                if kind is P.ChunkDone:
                    self._place_done(p, msg, frames)
                elif kind is not P.Began and kind is not P.Progress:
                    break  # a failure or a farewell: it is killed and what it holds handled as usual
        except (EOFError, OSError):
            pass


def _note_behind(job: Job, imported: dict) -> None:
    """Say so when a worker just imported a local module the kernel runs an older copy of."""
    from ...moduleedits import first_behind

    found = first_behind(imported)
    if found is None:
        return
    name, why = found
    note = (f"a worker imported the module {name} from its file, which differs from this kernel's copy ({why}): "
            f"the results may differ from a loop here, which runs the kernel's copy. If the file was edited, "
            f"reload it (importlib.reload({name})) or restart the kernel, and map again")
    if note not in job.report.notes:
        job.report.notes.append(note)
