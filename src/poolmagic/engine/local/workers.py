"""The local backend's transport: its worker processes, their pipes and sentinels.

An idle pool keeps at most one worker per core warm and grows to its size
when a map needs it; starting a worker that fails fails the waiting maps
(when no worker is left) and is tried again by the next map; a worker is
always killed with its whole process group, so nothing its function started
outlives it. Every wait is on pipes and sentinels together (one epoll set),
so a death is seen the moment it happens. Runs on the manager thread.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from ...errors import PoolmapError
from .. import protocol as P
from .. import worker as _worker
from ..core.inflight import Chunk
from ..core.job import Job
from ..core.schedule import WINDOW, timed
from ..handle import SHARED_MIN_BYTES, WorkerHandle, kill_group
from ..processes import (
    WORKER_NAME,
    block_sigint,
    others_have_workers,
    shared_buffers,
    stop_helper_processes,
)
from ..warm import warm_modules

_DISK_TIMES_S = 0.2  # how long one reading of the user files' times serves (disk_times)
from .waiter import Waiter

SPAWN_PER_TURN = 16  # workers started per manager turn: it keeps serving meanwhile
PIPE, DEATH = "pipe", "death"  # what events() reports about a worker


class WorkerSet:
    """Worker processes on this machine: the local Transport (core/transport.py).

    ``jobs`` is the manager's list of running maps (the same list object):
    how many workers are wanted depends on them, and a failed start fails them.
    """

    lacks: frozenset[str] = frozenset()

    def __init__(self, ctx: Any, start_method: str, size: int, idle_size: int, jobs: list[Job],
                 owner: Any, forget_finished: Callable[[], None]):
        self.ctx, self.start_method = ctx, start_method
        self.size = size  # workers while maps run (%poolsize N)
        self.idle_size = idle_size  # workers kept warm before a map asks for more
        self.jobs = jobs
        self.owner = owner  # the backend: the forkserver is shared with other backends' workers
        self.forget_finished = forget_finished
        self.procs: dict[int, WorkerHandle] = {}
        self.waiter = Waiter()
        self.spawn_error: BaseException | None = None
        self.read_elsewhere: set[WorkerHandle] = set()  # pipes read this turn outside the turn's own read
        self._shared: dict[str, int] = {}  # payload key -> memfd of its big buffers
        self._disk_times: dict[str, int | None] = {}  # disk_times: user file -> mtime, as last read
        self._disk_at = -1e9

    # ------------------------------------------------------------ Transport
    def events(self, timeout: float | None) -> list[tuple[str, WorkerHandle]]:
        """Wait for a message or a death: (PIPE or DEATH, worker) pairs. Starts a manager turn."""
        ready = self.waiter.wait(timeout)
        self.read_elsewhere.clear()
        return ready

    def capacity(self) -> list[WorkerHandle]:
        """Workers with room in their window, least loaded first.

        A worker running a quiet chunk has none: it was told nothing follows
        until it answers, so it reads its pipe with no thread of its own.
        """
        return [p for p in sorted(self.procs.values(), key=lambda p: len(p.inflight))
                if not (p.stale or p.retiring or len(p.inflight) >= WINDOW or (p.inflight and p.inflight[-1].quiet))]

    def send(self, p: WorkerHandle, chunk: Chunk) -> bool:
        """Send ``chunk`` (its function and context first if ``p`` lacks them).

        False if its items do not pickle (nothing was sent). A worker that
        dies meanwhile still counts it: its death hands it back.
        """
        job = chunk.job
        try:
            data, frames = p.encode_chunk(chunk.seq, job, chunk.start, chunk.items, timed(job), chunk.quiet)
        except Exception:
            return False
        chunk.t_sent = time.perf_counter()
        job.started(p.slot, p.pid, chunk.start, len(chunk.items))
        try:
            p.send_chunk(chunk, data, frames, self._shared_fd)
        except OSError:
            pass  # the worker is dying; its sentinel will report it and re-queue
        return True

    def may_read(self, p: WorkerHandle) -> bool:
        """Whether ``p``'s pipe, reported ready at the start of this turn, still has a message.

        A command (a cancel) or another worker's message (a failed map's
        drain) may have read what made it ready: a blocking read of an empty
        pipe would stop the manager for good, so such a pipe is asked first.
        """
        return p not in self.read_elsewhere or p.pending()

    def start_workers(self) -> None:
        """Start the workers wanted and missing; stop idle ones above the limit or stale."""
        want = self._desired()
        limit = max([self.size, *[j.options.workers or 0 for j in self.jobs]])
        for p in list(self.procs.values()):
            if (p.slot >= limit or p.stale) and not p.inflight:
                self.stop_worker(p)
        if self.spawn_error is not None:
            return
        started = 0
        for slot in range(want):
            if slot in self.procs:
                continue
            if started == SPAWN_PER_TURN:
                self.waiter.wake()  # more next turn; results and commands first
                return
            try:
                self._spawn(slot)
            except Exception as exc:
                self.spawn_failed(exc)
                return
            started += 1

    def stop_worker(self, p: WorkerHandle) -> None:
        p.kill()
        self.forget(p)

    def stop_workers(self) -> None:
        procs = list(self.procs.values())
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
            self.forget(p)

    def status(self) -> str:
        return f"{len(self.procs)} local processes ({self.start_method})"

    # ------------------------------------------------------------ the rest
    def pids(self) -> list[int]:
        return [p.pid for p in list(self.procs.values())]

    def forget(self, p: WorkerHandle) -> None:
        """``p`` is gone: stop watching it and close its pipe."""
        if self.procs.get(p.slot) is p:
            del self.procs[p.slot]
        self.waiter.remove(p.conn)
        self.waiter.remove(p.sentinel)
        p.close()

    def close(self) -> None:
        self.waiter.close()

    def forget_payloads(self, live: set[str]) -> None:
        """Close the shared memory of function versions no running map uses."""
        for key in [k for k in self._shared if k not in live]:
            os.close(self._shared.pop(key))

    def _desired(self) -> int:
        """Workers wanted now: the pool's size while maps run, fewer while idle.

        An idle pool keeps at most one worker per core warm; a pool sized far
        above the cores (for waiting-bound work) grows when a map needs it.
        """
        busy = [j for j in self.jobs if j.active]
        if not busy:
            return min(self.size, self.idle_size)
        extra = [j.options.workers for j in busy if j.options.workers]
        return max([self.size, *extra])

    def spawn_failed(self, exc: BaseException) -> None:
        """Starting a worker failed: with no worker left, the waiting maps fail now.

        The next map tries again (the cause, e.g. too many open files, may be gone).
        """
        self.spawn_error = exc
        if any(p.ready for p in self.procs.values()):
            return  # the maps go on with the workers that did start
        for p in list(self.procs.values()):  # started from the same broken state
            self.stop_worker(p)
        if self.start_method == "forkserver" and not others_have_workers(self.owner):
            # The forkserver may be what is broken (started while file descriptors
            # ran out, it keeps that limit): the next map starts a fresh one.
            stop_helper_processes()
        err = PoolmapError(f"could not start a worker process: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        for job in list(self.jobs):
            job.fail(err)
        self.forget_finished()

    def _spawn(self, slot: int) -> None:
        block_sigint()
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        P.widen_buffers(parent_conn)
        P.widen_buffers(child_conn)
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
        self.procs[slot] = p
        self.waiter.add(parent_conn, (PIPE, p))
        self.waiter.add(p.sentinel, (DEATH, p))

    def warm_for(self, job: Job) -> bool:
        """Whether ``job`` can be sent at once: every worker it wants runs, is ready, current and idle.

        Then a manager turn would start and stop nothing before sending it
        (user modules changed on disk are looked at first, as for any map).
        """
        if self.spawn_error is not None:
            return False
        self.mark_stale()
        want = max(self._desired(), job.options.workers or 0, self.size)
        if len(self.procs) != want:
            return False
        for slot, p in self.procs.items():
            if slot >= want or not p.ready or p.stale or p.retiring or p.inflight:
                return False
        return True

    def edited_modules(self, since: float) -> list[str]:
        """The user modules some worker imported whose file was modified after ``since`` (the
        kernel's start: moduleedits.py), or since that worker imported it. Any thread may ask; the
        files' times are read once for this and for ``mark_stale`` (a stat each, ~1-3 µs)."""
        times = self.disk_times(fresh=True)
        since_ns = int(since * 1e9)
        out = []
        for p in list(self.procs.values()):
            for name, (path, mtime) in list(p.modules.items()):
                now = times.get(path)
                if now is not None and (now != mtime or now >= since_ns) and name not in out:
                    out.append(name)
        return out

    def disk_times(self, fresh: bool = False) -> dict[str, int | None]:
        """Each worker-imported user file's mtime (None: gone), read once a map: ``fresh`` as the
        map starts (edited_modules, on the caller's thread); the stale checks that follow within
        ~0.2 s use what it read."""
        now = time.monotonic()
        if not fresh and now - self._disk_at < _DISK_TIMES_S:
            return self._disk_times
        times: dict[str, int | None] = {}
        for p in list(self.procs.values()):
            for path, _ in list(p.modules.values()):
                if path not in times:
                    try:
                        times[path] = os.stat(path).st_mtime_ns
                    except OSError:
                        times[path] = None
        self._disk_times, self._disk_at = times, now
        return times

    def refresh_stale(self) -> None:
        """Recycle workers whose imported user modules changed on disk."""
        self.mark_stale()
        self.start_workers()

    def mark_stale(self) -> None:
        """Mark the workers whose imported user modules changed on disk (replaced when idle)."""
        times = self.disk_times()
        for p in self.procs.values():
            for path, mtime in p.modules.values():
                if times.get(path, mtime) != mtime:
                    p.stale = True
                    break

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
