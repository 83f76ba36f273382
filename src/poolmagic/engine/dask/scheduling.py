"""Which chunk of which map goes to which dask worker, and sending it there.

A part the dask backend holds (``DaskBackend.scheduler``): on
each turn of the manager thread, chunks are sized (the Job's adaptive size,
grown to ~TASK_S of work, a worker's last share whole), the maps take turns
for each worker with room in its window (WINDOW chunks in flight), and each
chunk is submitted as one task pinned to its worker. The function (and, on
our own cluster, the kernel's context) is scattered once per version and its
future cached.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

import cloudpickle
from distributed.comm import CommClosedError

from ...errors import PoolmapError, safe_str
from . import env, task
from .. import protocol as P
from .link import _close
from .state import DaskChunk, State
from ..core.job import Job
from ..core.schedule import STREAM_MAX_CHUNK, WINDOW, RoundRobin, timed, workers_for
from ..handle import SHARED_MIN_BYTES
from ..processes import shared_buffers

# A dask task costs ~6 ms of CPU between the client, the scheduler and the
# worker (a local chunk ~0.1 ms), on the cores the items need: chunks of ~200 ms
# keep that near 3 %, where the local backend's 25 ms chunks would make it a
# quarter or more (100 ms chunks: dask ÷ local 0.94 on the CPU row, 200 ms: 1.01,
# median of 7 interleaved runs each).
TASK_S = 0.2
# A worker's share of what is left goes whole when it is at most this many
# chunks' worth: 10 items' share is one task of 10, not 7 and then 3.
TAIL_MAX = 1.5
SCATTER_ATTEMPTS = 3
SCATTER_TIMEOUT_S = 10.0
KEEP_VERSIONS = 4  # function versions kept scattered, as a local worker caches 4


class Scheduler:
    """Chunk sizes, the choice of map per worker, tasks and scattered functions (held by DaskBackend).

    ``size()``: the pool's size now; ``outcomes``: what a chunk that cannot be
    sent does to its map.
    """

    def __init__(self, state: State, link: Any, outcomes: Any, size: Callable[[], int]) -> None:
        self.state = state
        self.link = link
        self.outcomes = outcomes
        self.size = size
        self.owned = state.owned
        self._turns = RoundRobin()  # the maps take turns for each worker (core/schedule.py)
        self._seq = itertools.count()
        self._token = uuid.uuid4().hex[:8]

    def workers_for(self, job: Job) -> int:
        return workers_for(job, self.size())

    def note_fewer_workers(self, job: Job) -> None:
        """A remote cluster's workers are its own to add: ``-n N`` above them is said, not granted."""
        n = job.options.workers
        if not self.owned and n and n > self.size():
            job.report.notes.append(
                f"-n {n}: the dask cluster at {self.link.address} gave this pool {self.size()} "
                f"worker{'s' if self.size() != 1 else ''}, and the map ran on those; "
                f"start more with `dask worker {self.link.address}`"
            )

    def schedule(self) -> None:
        if self.state.jobs and self.link.client is not None:
            self.link.refresh_workers()
        jobs = [j for j in self.state.jobs if j.has_work()]
        if jobs and self.link.client is not None:
            usable = self.link.usable()
            self.link.say_waiting(jobs if not usable else [])
            rank = {a: i for i, a in enumerate(usable)}
            load = dict.fromkeys(usable, 0)
            waiting = set()  # workers with a chunk that has not begun: nothing more for them yet
            for c in self.state.inflight.values():
                if c.worker in load:
                    load[c.worker] += 1
                    if c.began is None:
                        waiting.add(c.worker)
            busy = {a for a in self.state.zombies.values() if a in load}
            for a in busy:  # a task given up on runs on there (remote): no new task meanwhile
                load[a] = WINDOW
            if busy and busy == set(usable):
                for job in jobs:
                    self._say_busy(job)
            while jobs:
                sent = False
                for address in sorted(usable, key=load.__getitem__):
                    # A dask worker may start two tasks in either order: the chunk
                    # behind is sent once the one before has begun (an item sent
                    # first ran after an item that killed its worker, and was lost).
                    if load[address] >= WINDOW or address in waiting:
                        continue
                    job = self._turns.pick(jobs, rank[address])
                    if job is None:
                        continue
                    size = self._chunk_size(job, address, usable)
                    if size == 0:  # it holds its share of the map already: others take the rest
                        continue
                    got = job.next_items(size)
                    if job.source.is_stream:  # buffered ahead: about half a round of chunks
                        job.source.set_want(size * max(1, self.workers_for(job) // 2))
                    if got is None:
                        continue
                    if self._send(job, *got, address):
                        load[address] += 1
                        waiting.add(address)
                        sent = True
                jobs = [j for j in jobs if j.has_work()]
                if not sent:
                    break
        self.state.forget_finished_jobs()

    def _say_busy(self, job: Job) -> None:
        """Every worker still runs a task an earlier map gave up on: the map waits, and says why."""
        note = (f"the map waited for the dask workers to finish tasks that an earlier map gave up on "
                f"(a timeout or a cancel): a task on the cluster at {self.link.address} cannot be stopped")
        if note not in job.report.notes:
            job.report.notes.append(note)

    def _chunk_size(self, job: Job, address: str, usable: list[str]) -> int:
        """The Job's size grown to ~TASK_S of work, but no more than ``address``'s share
        of what is left, so that the workers end together (0: it has its share).

        The share is counted in seconds, from each map's time per item and what
        each worker holds (its running chunk less what ran of it). A dask task
        costs ~6 ms of CPU between the kernel and its worker: a tail of
        one-item tasks, as the local backend sends, made 8 tasks of 16 × 25 ms
        items where the shares make 2 (one per worker), and ending the tail
        with the guided ``rem / (2 × workers)`` left one worker idle for up to
        2 items' time.
        """
        workers = self.workers_for(job)
        size = job.chunk_size(workers)
        t = job.per_item_s()
        if job.chunksize or t is None:  # the user's size; a probe
            return size
        t = max(t, 1e-9)
        rem = job.source.remaining()
        if rem is None:
            return max(size, min(math.ceil(TASK_S / t), STREAM_MAX_CHUNK))
        size = max(size, math.ceil(TASK_S / t))
        busy = self._busy_s(usable[:workers])
        mine = busy.get(address, 0.0)
        share = (sum(busy.values()) + rem * t) / max(1, len(busy)) - mine
        n = int(share / t + 0.5)
        if n < 1:  # the least busy worker always takes one
            return 1 if mine <= min(busy.values(), default=0.0) else 0
        return n if n <= size * TAIL_MAX else size

    def _busy_s(self, addresses: list[str]) -> dict[str, float]:
        """Seconds of work each of ``addresses`` still holds, by its chunks' maps' times per item."""
        now = time.perf_counter()
        busy = dict.fromkeys(addresses, 0.0)
        for c in self.state.inflight.values():
            if c.worker in busy:
                left = (c.job.per_item_s() or 0.0) * len(c.items)
                if c.began is not None:
                    left = max(0.0, left - (now - c.began))
                busy[c.worker] += left
        return busy

    def _send(self, job: Job, start: int, items: Any, address: str) -> bool:
        """Submit one chunk as one task pinned to ``address``; False if it was not sent."""
        if type(items) is range:
            wire: Any = items  # plain pickle knows ranges
        else:  # anything else may hold notebook-defined classes: cloudpickle, as locally
            try:
                data, frames = P.dumps_oob(items, cloudpickle.dumps)
            except Exception:
                self.outcomes.policy.unsendable(job, start, items)
                return False
            wire = task.Blob(None, data, frames)
        seq = next(self._seq)
        try:
            fn = self._scattered(self.link.blobs, job.payload.key, lambda: self._function_blob(job.payload))
            # a remote machine gets only the variables the user set: the kernel's cwd, sys.path,
            # thread limits and start-up environment describe this machine
            if self.owned:
                ctx = self._scattered(self.link.contexts, job.context.key, lambda: task.Box(job.context))
            else:
                overlay = env.overlay_for(job.context)
                ctx = self._scattered(self.link.contexts, overlay.key, lambda: task.Box(overlay))
            fut = self.link.client.submit(
                task.run, fn, ctx, seq, start, wire, job.wire_options, timed(job), self.link.topic, not self.owned,
                self.link.marks, job.seed_indices(start, len(items)),
                key=f"poolmap-{_task_name(job)}-{self._token}-{seq}", retries=0,
                workers=[address], allow_other_workers=False,
            )
        except Exception as exc:
            job.requeue(start, items)  # it never ran; the failed job will not take it again
            err = PoolmapError(f"could not submit a task to the dask cluster: {type(exc).__name__}: {safe_str(exc)}")
            err.__cause__ = exc
            job.fail(err)
            self.outcomes.abandon(job)
            return False
        c = DaskChunk(seq, job, start, items, fut, address, (fn,) if ctx is None else (fn, ctx))
        self.state.inflight[seq] = c
        self.state.by_key[fut.key] = c
        self.link.ac.add(fut)
        self.link.more.set()
        return True

    def _scattered(self, cache: OrderedDict, version: str, make: Callable[[], Any]) -> Any:
        """The future of ``make()`` scattered to every worker, once per ``version``."""
        fut = cache.get(version)
        if fut is not None and fut.status == "finished":
            cache.move_to_end(version)
            return fut
        # (not cached, or lost with the workers that held it: scattered anew)
        for attempt in range(SCATTER_ATTEMPTS):
            try:
                # To one running worker (a stale list of ours could name only dead ones);
                # the others fetch it with their first task of this version. Not
                # broadcast: dask's replicate looped for ever when a worker left
                # meanwhile (a map after a timeout hung its test, 1 full suite in 2).
                fut = self.link.client.scatter(make(), hash=False, timeout=SCATTER_TIMEOUT_S)
                break
            # A worker died just now; the scheduler will know soon. KeyError: the worker the
            # data went to (directly) left before the scheduler heard of it (update_data):
            # the oracle's crash_once maps on dask failed at submit with "KeyError: 'tls://...'"
            except (OSError, CommClosedError, KeyError):
                if attempt == SCATTER_ATTEMPTS - 1:
                    raise
                time.sleep(0.2)
                self.link.refresh_workers(force=True)
        cache[version] = fut
        in_use = {j.payload.key for j in self.state.jobs} | {j.context.key for j in self.state.jobs}
        for old in list(cache)[:-KEEP_VERSIONS]:
            if old not in in_use:
                del cache[old]  # releasing the future frees the workers' copies
                _close(self.link.memfds.pop(old, None))  # workers keep what they mapped
        return fut

    def _function_blob(self, payload: Any) -> Any:
        """What to scatter for a function version: its bytes, or on our own cluster,
        big buffers in shared memory that every worker maps (no copy per worker)."""
        sizes = tuple(b.nbytes for b in payload.buffers)
        if self.owned and sum(sizes) >= SHARED_MIN_BYTES:
            fd = shared_buffers(payload.buffers)
            if fd is not None:
                self.link.memfds[payload.key] = fd
                return task.SharedBlob(payload.key, payload.data, f"/proc/{os.getpid()}/fd/{fd}", sizes)
        return task.Blob(payload.key, payload.data, payload.buffers)


def _task_name(job: Job) -> str:
    """The function's name, for the dashboard's task stream (``poolmap-work``)."""
    name = re.sub(r"\W+", "_", getattr(job.report, "func_name", "") or "map").strip("_")
    return name[:40] or "map"
