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
import os
import select
import sys
import threading
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


TURN_WAIT_S = 0.005  # how long a caller sending directly waits for the manager's turn to end


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
        # Held by whoever changes the manager's state: the manager thread for
        # each turn, the caller's thread while it sends a small map directly.
        self.lock = threading.Lock()
        self._holder: int | None = None  # the thread sending directly (add_direct), while it does
        self._thread_id: int | None = None  # the manager thread's
        # The worker whose pipe the caller's thread reads for a quiet map's reply
        # (read_reply), taken out of the manager's wait until it is handed back.
        self._lent: WorkerHandle | None = None
        self._lend_r = self._lend_w = -1  # wakes a caller in read_reply when a turn takes the pipe back
        if os.name == "posix":  # (quiet chunks, hence lends, are Linux only)
            self._lend_r, self._lend_w = os.pipe()
            os.set_blocking(self._lend_r, False)
            os.set_blocking(self._lend_w, False)

    def command(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the manager thread, in its next turn."""
        self._cmds.append(fn)
        self.workers.waiter.wake()
        return True

    def add(self, job: Job) -> None:
        """(A command) ``job`` joins the running maps."""
        self.workers.spawn_error = None  # a new map tries again to start what failed
        self._join(job)
        self.workers.refresh_stale()

    def _join(self, job: Job) -> None:
        self._item_times.recall(job)
        self.jobs.append(job)
        job.maybe_finish()  # an empty ITERABLE is done at once

    def add_direct(self, job: Job) -> bool:
        """From the caller's thread: add ``job`` and send its first chunks now, if that is safe.

        It saves the caller's hand-off to the manager thread (a thread wake-up
        and a manager turn before the first chunk leaves). It waits for the
        manager's turn to end (the manager holds ``lock`` only in turns), briefly.
        Refused (False: send the map as a command) on the manager's own thread
        (an observer), for a stream, while a command waits, or unless the pool
        is idle (no map running, no chunk held) with every worker the map
        wants warm: nothing here starts, stops or reads a worker, so the
        manager's turn, which it is woken for afterwards, still does all that
        (deadlines, memory guard, replacements) as it would have; and an
        interrupt of the caller's thread mid-send concerns this map alone.
        """
        me = threading.get_ident()
        if job.source.is_stream or me in (self._thread_id, self._holder):
            return False  # from the manager's thread (an observer) or from inside a direct send
        procs = list(self.workers.procs.values())  # a hint, read without the lock: no lock while cold
        if len(procs) < self.workers.size or not all(p.ready for p in procs):
            return False
        # the manager holds the lock only in turns: wait for the end of a short one, not a long
        # one (a worker started or killed), which the command path would wait for anyway
        if not self.lock.acquire(timeout=TURN_WAIT_S):
            return False
        self._holder = me
        lent = None
        try:
            if self.closed or self._cmds or any(j.active for j in self.jobs) or not self.workers.warm_for(job):
                return False
            try:
                self._join(job)
                self._schedule()
                lent = self._lent
                if lent is not None and not (lent.inflight and lent.inflight[0].job is job):
                    self._reclaim()  # its chunk did not go (items that do not pickle): nothing to read
                    lent = None
            except Exception as exc:  # as in a manager turn: fail the maps, start over
                self._reclaim()
                self._recover(exc)
            except BaseException:  # an interrupt, maybe mid-send: stop this map and the workers it reached
                self._reclaim()
                job.stop()
                self.outcomes.abandon(job)
                raise
        finally:
            self._holder = None
            self.lock.release()
        # Its turn: deadlines, the memory guard, the window refilled. A map's replies wake
        # the manager anyway (its pipes are in the wait); a caller that waits at once wakes
        # it only if the map runs NUDGE_S (~5 ms) without ending (caller.wait_for): a small
        # map then costs no manager turn on the way out, where its thread fights the caller's
        # for the GIL. Anyone else's map (async: nobody may wait) wakes it now.
        if job.waited:
            job.nudge = self.workers.waiter.wake
            if lent is not None:  # its one chunk's reply is this thread's to read (read_reply)
                job.reply = lambda budget: self.read_reply(lent, job, budget)
        else:
            self.workers.waiter.wake()
        return True

    def read_reply(self, p: WorkerHandle, job: Job, budget: float) -> None:
        """On the caller's thread: read ``p``'s reply to ``job`` for up to ``budget`` s, then hand the pipe back.

        The pipe was taken out of the manager's wait when the map's one quiet
        chunk was sent (``_schedule`` under ``add_direct``): the reply wakes no
        manager turn and no waiting caller. Each message is read and handled
        under ``lock``, as a manager turn would (``Outcomes.handle``). Anything
        else goes the usual way: a death (the pipe's end, or the manager's turn
        for the sentinel, still watched), a kill (timeout, memory guard,
        cancel: ``p`` is no longer the slot's worker) or ``budget`` spent hand
        the pipe back and leave the rest to the manager, nudged by the caller.
        An interrupt between messages only hands the pipe back; one inside a
        read or its handling stops the map and kills the worker, as during a
        direct send.
        """
        me = threading.get_ident()
        end = time.perf_counter() + budget
        try:
            fd = p.conn.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(self._lend_r, select.POLLIN)  # the manager took the pipe back
        except (OSError, ValueError):  # closed already: killed by the manager
            self._give_back(p)
            return
        timed = job.options.timeout is not None
        try:
            while not job.finished.is_set():
                if timed and p.inflight:  # its deadline is the manager's to act on: back by then
                    end = min(end, self.outcomes.deadline(p))
                left = end - time.perf_counter()
                events = poller.poll(max(1, int(left * 1000 + 0.999))) if left > 0 else []
                if not events:
                    if time.perf_counter() >= end:
                        return
                    continue
                if any(f == self._lend_r for f, _ in events):
                    _drain(self._lend_r)  # (or a byte left by an earlier lend's reclaim)
                with self.lock:
                    if self._lent is not p or self.workers.procs.get(p.slot) is not p:
                        return  # the manager ended it (a death, a timeout, the memory guard, a cancel)
                    if not any(f == fd for f, _ in poller.poll(0)):
                        continue  # a turn read it (a stale ready entry, see may_read), or a stale wake
                    self._holder = me  # an observer that maps sends it as a command
                    try:
                        msg, frames = p.read()
                        self.workers.read_elsewhere.add(p)
                        self.outcomes.handle(p, msg, frames)
                    except (EOFError, OSError):
                        return  # dying: its sentinel tells the manager
                    except Exception as exc:  # as in a manager turn
                        self._recover(exc)
                        return
                    except BaseException:  # an interrupt mid-message: the pipe is unusable
                        self.workers.stop_worker(p)
                        job.stop()
                        self.outcomes.abandon(job)
                        raise
                    finally:
                        self._holder = None
        finally:
            self._give_back(p)

    def _give_back(self, p: WorkerHandle) -> None:
        """``p``'s pipe is watched by the manager again; it is woken if anything waits for it."""
        with self.lock:
            if self._lent is not p:
                return
            self._reclaim(notify=False)
            if self._cmds or any(j.active for j in self.jobs):
                self.workers.waiter.wake()  # what came meanwhile is scheduled on p too

    def _reclaim(self, notify: bool = True) -> None:
        """(Under ``lock``) the lent pipe, if any, is in the manager's wait again.

        Any manager turn takes it back first: it then reads the reply itself and
        the caller's thread, finding the pipe gone, waits as for any map. So a
        lend the caller never uses (interrupted before it waits) costs nothing.
        """
        p, self._lent = self._lent, None
        if p is not None and self.workers.procs.get(p.slot) is p:
            self.workers.waiter.add(p.conn, (PIPE, p))
        if p is not None and notify:  # a caller in read_reply's poll stops waiting on it
            try:
                os.write(self._lend_w, b"\0")
            except OSError:  # full: it holds a byte the caller will see
                pass

    def main(self) -> None:
        self._thread_id = threading.get_ident()
        try:
            start_resource_tracker()
        except Exception as exc:  # the manager thread must live on, or every map would hang
            self._recover(exc)
        try:
            with self.lock:
                self.workers.start_workers()
            while not self.closed:
                try:
                    self._step()
                except Exception as exc:
                    with self.lock:
                        self._recover(exc)
        finally:
            with self.lock:
                self.workers.stop_workers()

    def _step(self) -> None:
        """One turn: wait for anything, then handle commands, results, deaths, deadlines.

        A ready pipe gives one message per turn: the wait is level-triggered, so
        a second message makes the next wait return at once. That costs less
        than asking the pipe whether more is waiting.
        """
        with self.lock:
            timeout = self.outcomes.next_deadline()
        ready = self.workers.events(timeout)
        with self.lock:
            self._turn(ready)

    def _turn(self, ready: list) -> None:
        workers, outcomes = self.workers, self.outcomes
        if self._lent is not None:
            self._reclaim()
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
        self._reclaim()
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
                # its worker's only chunk and nothing left to send anyone: a quiet chunk. Not
                # while a stream may still yield items: its next ones must not wait for this
                # chunk's answer (and its read-ahead, or its error, for the items after them)
                quiet = not p.inflight and not any(
                    j.has_work() or (j.active and j.source.is_stream and not j.source.exhausted) for j in self.jobs)
                if quiet and job.waited and self._holder is not None and self._lent is None \
                        and not any(q.inflight for q in self.workers.procs.values()):
                    # the whole of a blocking map sent from its caller's thread: that
                    # thread reads the reply too (read_reply); out of our wait first
                    self._lent = p
                    self.workers.waiter.remove(p.conn)
                if not self.workers.send(p, Chunk(next(self._seq), job, *got, quiet)):
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
        with self.lock:
            self._reclaim()
            self.workers.stop_workers()
            for job in list(self.jobs):
                job.fail(PoolmapError("the pool was shut down while this map was running"))
            self.jobs.clear()
            self.workers.close()
            for fd in (self._lend_r, self._lend_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._lend_r = self._lend_w = -1  # a second stop closes nobody's descriptor


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except OSError:  # empty (BlockingIOError), or closed by a shutdown
        pass
