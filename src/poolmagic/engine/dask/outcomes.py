"""What each task result, worker death, deadline or cancel does to the job it concerns.

A part the dask backend holds (``DaskBackend.outcomes``), kept apart as the
local backend keeps outcomes.py: it is the failure policy, the
same as the local backend's. Runs on the manager thread, which answers every
chunk exactly once: ``State.take`` removes a chunk from the chunks in flight, and
whatever comes later for it (a result of a task we gave up on, a second
report of the same death) finds nothing.

Tasks are pinned to a worker (``workers=[address]``, no other allowed), as
local chunks are sent to one worker: when a worker dies, the chunks it held
are exactly those pinned to it, the one it had begun (or the oldest) is the
one that was running, and dask cannot run that task again on another worker
(a crashing item would take that one down too).
"""
from __future__ import annotations

import pickle
import time
from typing import Any

from distributed.comm import CommClosedError

from ...errors import (
    ItemTimeoutError,
    PoolmapError,
    WorkerCrashedError,
    add_note,
    exit_description,
    rebuild_exception,
)
from .. import protocol as P
from . import forkserver
from .plumbing import EXITS, kill_worker
from ..core.events import ChunkRecord
from ..core.failures import FailurePolicy
from ..core.job import Job
from .state import DaskChunk, State

EXIT_CODE_WAIT_S = 0.2  # how long a crash report waits for the nanny to say how its worker ended
# A LocalCluster's nanny takes about this long to start a new worker: a chunk given
# up on that will end sooner by itself is left to finish (its result dropped).
# Forked by our server (forkserver.py), two replacements are up in 0.09 s; spawned
# (where there is no forkserver), in 0.26 s, with most of a second of CPU each.
FORKED = forkserver.CONTEXT is not None
RESTART_S = 0.2 if FORKED else 1.0
# A worker given up on is killed this long after (it gets no new chunk meanwhile).
# Spawned replacements took both cores for most of a second, and an interrupted
# cell returned in 0.77-1.3 s instead of 0.28 s, unless its kill waited for it.
KILL_AFTER_S = 0.0 if FORKED else 0.3


def _is_death(exc: BaseException) -> bool:
    """The task failed because its worker went away (not because of its own code)."""
    return type(exc).__name__ == "KilledWorker" or isinstance(exc, (CommClosedError, ConnectionError))


class Outcomes:
    """What results, deaths, deadlines and cancels do to the maps (held by DaskBackend).

    ``link``: the cluster (its client, its workers' pids and marks, the scaler).
    """

    def __init__(self, state: State, link: Any) -> None:
        self.state = state
        self.link = link
        self.owned = state.owned
        # the failure policy every backend shares (core/failures.py); abandoning a map is ours
        self.policy = FailurePolicy(self.abandon, the_worker="the dask worker", a_worker="a dask worker")
        self.give_back = self.policy.give_back  # (not the items' fault: run again, or dropped)

    # ------------------------------------------------------------------ results
    def on_result(self, fut: Any, result: Any) -> None:
        c = self.state.by_key.get(fut.key)
        if c is None:
            z = self.state.zombie_keys.pop(fut.key, None)
            if z is not None:  # a chunk left to finish: its worker is free again
                self.state.zombies.pop(z.seq, None)
                if fut.status == "finished" and result[0] == "done":
                    self._late(z, result)  # its items finished: keep them
            return  # answered already (a death, a timeout, a cancel)
        status = fut.status
        if status == "error" and _is_death(result[1]):
            self.worker_gone(c.worker, expected=False)  # its death was not reported as an event
            return
        self.state.take(c)
        job = c.job
        if not job.active and not (status == "finished" and result[0] == "done"):
            job.drop_chunk()
            return
        if status == "finished":
            if result[0] == "done":
                self._done(c, result)
            else:  # the items did not unpickle, or the context or function could not be applied
                self.policy.chunk_failed(c, result[1], rebuild_exception(result[2], job.filename_of))
        elif any(d.status != "finished" for d in c.deps):
            # dask cancels a task whose scattered input died with every worker that
            # held it ("lost dependencies"): the version is scattered again, the chunk re-run
            job.requeue(c.start, c.items)
        elif status == "error":
            self._errored(c, result[1])
        else:  # cancelled by someone else, or lost with the scheduler
            job.items_failed(c.indices, PoolmapError(
                f"the dask cluster dropped the task running {c.describe()} ({status})"), c.items, c.start)
        if not job.active:
            self.abandon(job)

    def _done(self, c: DaskChunk, result: tuple) -> None:
        _, t0, t1, times, pid, address, body, frames, cpu, waited = result
        job = c.job
        try:
            out, records, errs = pickle.loads(body, buffers=frames)
        except Exception as exc:
            self.policy.results_undecodable(c, exc)
            return
        if not self.owned:  # another machine's clock: place the chunk at its arrival here
            now = time.perf_counter()
            t0, t1 = now - (t1 - t0), now
        errors = [(i, rebuild_exception(pe, job.filename_of)) for i, pe in errs]
        rec = ChunkRecord(self.state.slot(c.worker), c.start, len(out), t0, t1, times, pid, t_sent=c.t_sent,
                          t_recv=time.perf_counter(), nbytes=len(body) + sum(memoryview(f).nbytes for f in frames),
                          waited_s=waited or 0.0, cpu_s=cpu)
        job.chunk_done(rec, out, records, errors, c.items)

    @staticmethod
    def _late(c: DaskChunk, result: tuple) -> None:
        """A chunk the ended map gave up on finished after all: its results are kept, and its errors."""
        try:
            out, _, errs = pickle.loads(result[6], buffers=result[7])
            errors = [(i, rebuild_exception(pe, c.job.filename_of)) for i, pe in errs]
        except Exception:
            return
        c.job.late_results(c.start, out, errors, c.items)

    def _errored(self, c: DaskChunk, exc: BaseException) -> None:
        """The task itself failed (not the function's items: run_chunk catches those)."""
        job = c.job
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "poolmagic":
            err = PoolmapError(
                f"the dask worker {c.worker} cannot import poolmagic: install it in the workers' "
                f"environment too (pip install poolmagic, the same version as here)"
            )
            err.__cause__ = exc
            exc = err
        else:
            add_note(exc, f"poolmagic: the dask task of {c.describe()} failed on {c.worker}.")
        job.drop_chunk()
        job.fail(exc)

    def on_task_event(self, msg: dict) -> None:
        """A task began (or, on a remote cluster, ended) on its worker."""
        seq = msg.get("seq")
        if msg.get("end"):
            self.state.zombies.pop(seq, None)  # a task we gave up on has left its worker
            return
        c = self.state.inflight.get(seq)
        if c is None:
            return
        c.began = time.perf_counter()
        if "done" in msg:  # the chunk's next item began (--timeout): its clock starts now
            return
        c.pid = msg.get("pid")
        if c.pid:
            self.state.workers[c.worker] = c.pid
        c.job.started(self.state.slot(c.worker), c.pid or 0, c.start, len(c.items))

    # ------------------------------------------------------------------ deaths
    def worker_gone(self, address: str, expected: bool | None, event: bool = False) -> None:
        """``address`` left the cluster: what it held runs again, what it ran fails.

        ``expected``: it was stopped on purpose (retired, restarted), False: it
        died, None: it vanished from the worker list without a word. ``event``:
        this is its own "remove-worker" event, the last we follow for it (when
        it vanished first, its event may still come and say how it left).
        A function version that died with it is scattered again when next
        needed (Scheduler._scattered looks at its future's status).
        """
        pid = self.state.workers.pop(address, None)
        self.state.gone[address] = self.state.ids.pop(address, None)
        if event:
            self.link.unlisten(address)
        for seq in [s for s, a in self.state.zombies.items() if a == address]:
            del self.state.zombies[seq]
        for key in [k for k, z in self.state.zombie_keys.items() if z.seq not in self.state.zombies]:
            del self.state.zombie_keys[key]
        # killed by us, or retired by us once idle (scale.py): nothing it held is to blame
        killed = address in self.state.expected or (self.link.scaler is not None and self.link.scaler.closed_by_us(address))
        self.state.expected.discard(address)
        if self.link.scaler is not None:
            self.link.scaler.gone(address)
        chunks = sorted((c for c in self.state.inflight.values() if c.worker == address), key=lambda c: c.seq)
        if not chunks:
            return
        for c in chunks:
            self.state.take(c)
        self.link.cancel(chunks)
        head = None if killed or expected else self._was_running(address, chunks, vanished=expected is None)
        ended = self.link.marks_of(address)[1]
        for c in chunks:
            if c is head:
                continue
            if self._ran(c, chunks, ended) and not c.cancelled:
                c.job.results_lost(c.start, c.items)  # finished, its result still on the worker
            else:
                self.give_back(c)  # queued
        if head is not None:
            self._crashed(head, address, pid)

    @staticmethod
    def _ran(c: DaskChunk, chunks: list[DaskChunk], ended: int | None) -> bool:
        """A chunk of a dead worker that had run to its end: its result died with the worker.

        Our own cluster's workers write down the last chunk that ended (a
        one-thread worker runs its chunks in order); on a remote one, a chunk
        that began before another one began had ended."""
        if c.future.status == "finished" or (ended is not None and c.seq <= ended):
            return True
        return c.began is not None and any(o.began is not None and o.seq > c.seq for o in chunks)

    def _was_running(self, address: str, chunks: list[DaskChunk], vanished: bool) -> DaskChunk | None:
        """Which of a dead worker's chunks it was running (None: none of them, or no telling)."""
        mark = self.link.running_mark(address)
        if mark is not None:  # our own cluster: the worker wrote it down
            return next((c for c in chunks if c.seq == mark), None)
        # Otherwise from what dask told: not one whose task finished (its result
        # died with the worker), the last one that said it began, else the oldest:
        # a one-thread worker runs its tasks in the order they came.
        open_ = [c for c in chunks if c.future.status != "finished"]
        began = [c for c in open_ if c.began is not None]
        if began:
            return began[-1]
        return None if vanished or not open_ else open_[0]

    def _crashed(self, c: DaskChunk, address: str, pid: int | None = None) -> None:
        """``c`` was running when its worker died: its item fails; several are run again
        one by one to find the one that kills workers, as the local backend does."""
        if not c.job.active:
            c.job.drop_chunk()
            return
        code = EXITS.wait(address, EXIT_CODE_WAIT_S) if self.owned else None
        pid = c.pid or pid
        where = f"{address}, pid {pid}" if pid else address
        if self.owned:
            what = f"died with {exit_description(code)}" if code is not None else "died"
            tail = "Its nanny starts a new worker; items that finished are kept."
        else:
            what = "left the cluster (it died or was stopped)"
            tail = "Items that finished are kept."
        said = f"dask worker {self.state.slot(address)} ({where}) {what} while running {c.describe()}"
        self.policy.worker_lost(c, WorkerCrashedError, said,
                                lambda: WorkerCrashedError(f"{said}. {tail}", c.item_indices(), code),
                                worker=self.state.slot(address))

    # ------------------------------------------------------------------ timeouts, cancel
    @staticmethod
    def _deadline(c: DaskChunk) -> float | None:
        t = c.job.options.timeout
        if t is None or c.began is None:
            return None  # the clock starts when the task says it runs
        # and again when it says it moved on, at most progress_every(t) after an item began
        # (local/outcomes.py: deadline)
        return c.began + t + (P.progress_every(t) if len(c.items) > 1 else 0.0)

    def next_deadline(self) -> float | None:
        best = min((k[0] for k in self.state.kills), default=None)
        for c in self.state.inflight.values():
            d = self._deadline(c)
            if d is not None:
                best = d if best is None else min(best, d)
        return None if best is None else max(0.0, best - time.perf_counter())

    def check_timeouts(self) -> None:
        now = time.perf_counter()
        for c in list(self.state.inflight.values()):
            d = self._deadline(c)
            if d is None or now < d or not self.state.take(c):
                continue
            self.link.cancel([c])
            self._stop_running(c)
            if not self.owned:  # chunks queued behind it would wait for its end: run them elsewhere
                behind = [o for o in self.state.inflight.values() if o.worker == c.worker and o.began is None]
                for o in behind:
                    self.state.take(o)
                self.link.cancel(behind)
                for o in behind:
                    self.give_back(o)
            if self.owned:
                what = "its dask worker was killed and its nanny starts a new one"
            else:
                what = ("the task runs on in its dask worker (a task on a remote cluster cannot be "
                        "stopped) and its result will be dropped")
            t = c.job.options.timeout
            self.policy.worker_lost(
                c, ItemTimeoutError, f"{c.describe()} ran longer than the {t:g} s timeout per item",
                lambda c=c, t=t, what=what: ItemTimeoutError(
                    f"{c.describe()} ran longer than the {t:g} s timeout; {what}.", c.item_indices()[0], t),
                worker=self.state.slot(c.worker))

    def _stop_running(self, c: DaskChunk) -> None:
        """A task we gave up on while it runs: kill its worker (ours), or wait out its end (remote)."""
        if not self.owned:
            self.state.zombies[c.seq] = c.worker  # its worker stays busy with it until it says it ended
            return
        pid = self.link.pid_of(c.worker)
        if pid is None:
            return
        self.state.expected.add(c.worker)  # what it holds goes back to its jobs, unblamed
        self.state.kills.append((time.perf_counter() + KILL_AFTER_S, c.worker, pid, c.seq))

    def kill_due(self) -> None:
        """Kill the workers given up on whose time has come (KILL_AFTER_S)."""
        now = time.perf_counter()
        for due in [k for k in self.state.kills if k[0] <= now]:
            self.state.kills.remove(due)
            _, address, pid, seq = due
            if self.link.pid_of(address) != pid:  # gone already: never kill another's process
                continue
            if self.link.running_mark(address) not in (seq, None):  # the chunk ended meanwhile
                self.state.expected.discard(address)  # back to work, unharmed
                continue
            kill_worker(pid)  # its nanny starts a new worker

    def abandon(self, job: Job) -> None:
        """Stop all work of a finished, failed or cancelled job at once."""
        chunks = [c for c in self.state.inflight.values() if c.job is job]
        heads: dict[str, DaskChunk] = {}  # what each worker runs now: its oldest chunk
        for c in sorted(self.state.inflight.values(), key=lambda c: c.seq):
            heads.setdefault(c.worker, c)
        stop, finish = [], []
        for c in chunks:
            self.state.take(c)
            job.drop_chunk()
            # running now, even if its "began" is still on its way (queued ones just go)
            if c.began is not None or heads.get(c.worker) is c:
                (finish if self._ends_soon(c) else stop).append(c)
        self.link.cancel([c for c in chunks if c not in finish])
        for c in stop:
            self._stop_running(c)
        for c in finish:  # its worker is busy until the result comes (and is dropped)
            self.state.zombies[c.seq] = c.worker
            self.state.zombie_keys[c.future.key] = c
        self.state.forget_finished_jobs()

    def _ends_soon(self, c: DaskChunk) -> bool:
        """A running chunk of ours that will end before a new worker could start."""
        t = c.job.per_item_s()
        if not self.owned or t is None:
            return False  # a remote task runs on anyway; unknown: it may run for ever
        ran = time.perf_counter() - c.began if c.began is not None else 0.0
        return t * len(c.items) - ran < RESTART_S
