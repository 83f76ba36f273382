"""Starting, stopping and recycling the local backend's worker processes.

Part of the local backend (mixed into LocalBackend). An idle pool keeps at
most one worker per core warm and grows to its size when a map needs it;
starting a worker that fails fails the waiting maps (when no worker is left)
and is tried again by the next map; a worker is always killed with its whole
process group, so nothing its function started outlives it.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import PoolmapError
from . import worker as _worker
from . import protocol as P
from .handle import WorkerHandle, kill_group
from .job import Job
from .processes import WORKER_NAME, Waiter, block_sigint, others_have_workers, stop_helper_processes, warm_modules

SPAWN_PER_TURN = 16  # workers started per manager turn: it keeps serving meanwhile
PIPE, DEATH = "pipe", "death"  # what the waiter reports about a worker


class WorkerSet:
    """Mixin of LocalBackend: the worker processes themselves."""

    _procs: dict[int, WorkerHandle]
    _jobs: list[Job]
    _size: int
    _idle_size: int
    _waiter: Waiter
    _spawn_error: BaseException | None
    ctx: Any
    start_method: str

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
        if any(p.ready for p in self._procs.values()):
            return  # the maps go on with the workers that did start
        for p in list(self._procs.values()):  # started from the same broken state
            self._kill(p)
        if self.start_method == "forkserver" and not others_have_workers(self):
            # The forkserver may be what is broken (started while file descriptors
            # ran out, it keeps that limit): the next map starts a fresh one.
            stop_helper_processes()
        err = PoolmapError(f"could not start a worker process: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        for job in list(self._jobs):
            job.fail(err)
        self._forget_finished_jobs()

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
        self._procs[slot] = p
        self._waiter.add(parent_conn, (PIPE, p))
        self._waiter.add(p.sentinel, (DEATH, p))

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

