"""The local backend's manager thread: one loop that waits, reads, reacts and schedules.

Every turn waits on the wake-up pipe, every worker's pipe and every process
sentinel at once (WorkerSet.events), then runs the commands other threads
queued (a new map, a cancel), reads one message per ready pipe, handles
deaths, deadlines and the memory guard (outcomes.py), starts the workers
wanted (workers.py) and fills every worker's window, the maps taking turns
(core/schedule.py).
"""
from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from typing import Callable

from ...errors import PoolmapError
from ..core.inflight import Chunk
from ..core.job import ItemTimes, Job
from ..core.schedule import RoundRobin, workers_for
from ..handle import WorkerHandle
from ..processes import start_resource_tracker
from .outcomes import Outcomes
from .workers import PIPE, WorkerSet


class Manager:
    """The loop and its state: the running maps, the commands queued for it, the turn of maps."""

    def __init__(self, workers: WorkerSet, jobs: list[Job]):
        self.workers = workers
        self.jobs = jobs  # shared with the worker set and the outcomes: changed in place
        self.outcomes = Outcomes(workers, jobs, self.forget_finished_jobs)
        self.policy = self.outcomes.policy
        self.closed = False
        self._cmds: deque[Callable[[], None]] = deque()
        self._seq = itertools.count()
        self._turns = RoundRobin()
        self._item_times = ItemTimes()

    def command(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the manager thread, in its next turn."""
        self._cmds.append(fn)
        self.workers.waiter.wake()
        return True

    def add(self, job: Job) -> None:
        """(A command) ``job`` joins the running maps."""
        self.workers.spawn_error = None  # a new map tries again to start what failed
        self._item_times.recall(job)
        self.jobs.append(job)
        job.maybe_finish()  # an empty ITERABLE is done at once
        self.workers.refresh_stale()

    def main(self) -> None:
        try:
            start_resource_tracker()
        except Exception as exc:  # the manager thread must live on, or every map would hang
            self._recover(exc)
        try:
            self.workers.start_workers()
            while not self.closed:
                try:
                    self._step()
                except Exception as exc:
                    self._recover(exc)
        finally:
            self.workers.stop_workers()

    def _step(self) -> None:
        """One turn: wait for anything, then handle commands, results, deaths, deadlines.

        A ready pipe gives one message per turn: the wait is level-triggered, so
        a second message makes the next wait return at once. That costs less
        than asking the pipe whether more is waiting.
        """
        workers, outcomes = self.workers, self.outcomes
        ready = workers.events(outcomes.next_deadline())
        while self._cmds:
            self._cmds.popleft()()
        if self.closed:
            return
        deaths = []
        for what, p in ready:
            if workers.procs.get(p.slot) is not p:
                continue  # killed by a command this turn
            if what is PIPE:
                if workers.may_read(p):  # (not drained by a command or another's failure)
                    self._read_one(p)
            else:
                deaths.append(p)
        for p in deaths:
            outcomes.on_death(p)
        if any(j.options.timeout is not None for j in self.jobs):
            outcomes.check_timeouts()
        if self.jobs and time.perf_counter() >= outcomes.next_guard:
            outcomes.guard_memory()
        workers.start_workers()
        self._schedule()

    def _recover(self, exc: BaseException) -> None:
        """An internal error: fail the running maps, start over with fresh workers.

        The pool stays usable; a bug in poolmagic must never hang the next map.
        """
        import traceback

        traceback.print_exc(file=sys.__stderr__)
        for job in list(self.jobs):
            job.fail(PoolmapError(f"poolmagic's engine hit an internal error and restarted its workers: {exc!r}"))
        self.jobs.clear()
        self.workers.stop_workers()

    def _read_one(self, p: WorkerHandle) -> None:
        try:
            msg, frames = p.read()
        except (EOFError, OSError):
            self.outcomes.on_death(p)
            return
        self.outcomes.handle(p, msg, frames)

    def _schedule(self) -> None:
        jobs = [j for j in self.jobs if j.has_work()]
        size = self.workers.size
        while jobs:
            sent = False
            for p in self.workers.capacity():  # each gets at most one chunk per pass
                job = self._turns.pick(jobs, p.slot)
                if job is None:
                    continue
                n = workers_for(job, size)
                chunk_size = job.chunk_size(n)
                got = job.next_items(chunk_size)
                if job.source.is_stream:  # buffered ahead: about half a round of chunks
                    job.source.set_want(chunk_size * max(1, n // 2))
                if got is None:
                    jobs = [j for j in jobs if j.has_work()]
                    continue
                if not self.workers.send(p, Chunk(next(self._seq), job, *got)):
                    self.policy.unsendable(job, *got)
                sent = True
            jobs = [j for j in jobs if j.has_work()]
            if not sent:
                break
        self.forget_finished_jobs()

    def forget_finished_jobs(self) -> None:
        self.jobs[:] = self._item_times.keep_active(self.jobs)
        self.workers.forget_payloads({j.payload.key for j in self.jobs})

    def stop(self) -> None:
        """After the thread ended (shutdown): kill the workers, fail what still runs."""
        self.workers.stop_workers()
        for job in list(self.jobs):
            job.fail(PoolmapError("the pool was shut down while this map was running"))
        self.jobs.clear()
        self.workers.close()
