"""The dask backend: the same maps on a dask.distributed cluster.

How data flows::

    caller thread (kernel)      manager thread                  dask (scheduler, workers)
    ──────────────────────      ──────────────                  ─────────────────────────
    Pool.run(f, items)
      submit(Job) ──► queue ──► start a LocalCluster it owns    ──► its workers: forks of our
                                  (daskforkserver), or connect       server, which imported dask
                                  to an address
                                scatter the function once per   ──► to one worker, the others fetch
                                  version (a Blob)                   it once (our LocalCluster: big
                                                                     buffers mapped from a memfd)
                                job.next_items(size): one task  ──► dasktask.run, pinned to a
                                  per CHUNK, ≤ 2 in flight per       worker: the map's context,
                                  worker (the Job's adaptive         the function (unpickled once
                                  sizes, grown to ~200 ms)           per worker), "began" event,
                                                                     run_chunk
                                results (as_completed thread)  ◄──  pickled results, output, errors
                                events: a task began; a worker ◄──  worker, scheduler
                                  left ("remove-worker")
                                job.chunk_done / items_failed
      job.wait() ◄── notify ───┘

The manager thread answers every chunk exactly once (see daskoutcomes.py for
deaths, timeouts and cancels); the caller's thread only waits, feeds a
stream's items and prints output in item order, as with the local backend.

Failures, as the local backend has them:

* A worker that dies fails the item it was running at once; the other chunks
  it held run again elsewhere. A LocalCluster we own never retries a task on
  another worker (``allowed_failures=0``) and its nannies start new workers.
* ``--timeout``: the clock starts when the task says it began. At the
  deadline the item fails; on a cluster we own its worker process is
  SIGKILLed and its nanny starts a new one. A task on a remote cluster cannot
  be stopped: it runs on, its worker gets no new task meanwhile, and its
  result is dropped.
* An interrupt or ``cancel()`` cancels the map's tasks and, on a cluster we
  own, kills the workers running them, as the local backend does. Their
  replacements are forks of a server that has imported dask
  (daskforkserver.py): the next map runs ~0.1 s later.
* Memory (our own cluster, daskmemory.py): a worker above ``--max-memory``,
  or the largest when the kernel's memory runs low, is SIGKILLed and its item
  fails with ``WorkerMemoryError``, as on the local backend.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from distributed import Client, LocalCluster

from ..errors import NestedPoolError, PoolmapError
from . import worker as _worker
from .base import Backend
from .daskenv import RemoteEnvironment
from .daskcluster import (
    CONNECT_TIMEOUT_S,
    MARKS_PREFIX,
    REFRESH_OWNED_S,
    REFRESH_REMOTE_S,
    DaskCluster,
    _quietly,
    marks_folder,
)
from .daskmemory import DaskMemoryGuard
from .daskscale import Scaler
from .daskoutcomes import DaskChunk, DaskOutcomes
from .daskplumbing import dashboard_link, forget_at_exit, stop_at_exit
from .daskscheduling import (
    KEEP_VERSIONS,
    SCATTER_ATTEMPTS,
    SCATTER_TIMEOUT_S,
    TASK_S,
    WINDOW,
    DaskScheduling,
)
from .job import ItemTimes, Job

CONNECT_WAIT_S = 30.0  # how long a map's checks wait for a remote scheduler's connection

# DaskBackend, and the settings and helpers this module held before it was split (still imported from here)
__all__ = [
    "CONNECT_TIMEOUT_S",
    "KEEP_VERSIONS",
    "MARKS_PREFIX",
    "REFRESH_OWNED_S",
    "REFRESH_REMOTE_S",
    "SCATTER_ATTEMPTS",
    "SCATTER_TIMEOUT_S",
    "TASK_S",
    "WINDOW",
    "DaskBackend",
    "marks_folder",
]


class DaskBackend(DaskCluster, DaskScheduling, DaskOutcomes, DaskMemoryGuard, Backend):
    """Maps on a dask.distributed cluster: a LocalCluster it owns, or the one at ``address``.

    The class is assembled from five parts, each a module of its own: this
    one (the public face and the manager thread's loop), DaskCluster
    (starting or reaching the cluster, its workers, closing it:
    daskcluster.py), DaskScheduling (chunk sizes, which map goes to which
    worker, tasks and scattered functions: daskscheduling.py), DaskOutcomes
    (what each result, death, deadline or cancel does to a job:
    daskoutcomes.py) and DaskMemoryGuard (--max-memory and the memory guard
    on our own cluster: daskmemory.py). Each part comes before those that
    declare the methods it provides. All of their methods but the public
    ones run on the manager thread.
    """

    def __init__(self, size: int, address: str | None = None, dashboard: bool = False):
        """``dashboard``: our LocalCluster serves dask's dashboard (on 127.0.0.1, unauthenticated)."""
        self._size = max(1, int(size))
        self.address = address
        self.owned = address is None
        self.dashboard = bool(dashboard) and self.owned
        self.description = "dask LocalCluster" if self.owned else f"dask cluster {address}"
        self._cap: int | None = None  # remote: at most this many workers (%poolsize N)
        self._scaler: Scaler | None = None  # grows and shrinks our LocalCluster (daskscale.py)
        self._waiting: dict[int, Job] = {}  # maps told they wait for a worker (a remote cluster has none)
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()  # callables the manager thread runs
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._jobs: list[Job] = []
        self._rr = 0
        self._inflight: dict[int, DaskChunk] = {}  # seq -> chunk; answered chunks leave at once
        self._by_key: dict[str, DaskChunk] = {}
        self._seq = itertools.count()
        self._token = uuid.uuid4().hex[:8]
        self._topic = f"poolmagic-{self._token}"  # our tasks' "began"/"end" events
        self._blobs: OrderedDict[str, Any] = OrderedDict()  # function version -> scattered future
        self._contexts: OrderedDict[str, Any] = OrderedDict()  # context version -> scattered future
        self._workers: dict[str, int | None] = {}  # address -> pid (None: not known yet)
        self._slots: dict[str, int] = {}  # address -> the number shown as its worker
        self._listening: set[str] = set()  # worker addresses whose event topic we follow
        self._refreshed = 0.0
        self._next_guard = 0.0  # when the memory guard looks next (our own cluster)
        self._expected: set[str] = set()  # workers we killed: what they held goes back, unblamed
        # chunks given up on that still run (left to finish, or on a remote cluster): seq -> address
        self._zombies: dict[int, str] = {}
        self._zombie_keys: dict[str, Any] = {}  # their futures (ours, left to finish): key -> chunk
        self._kills: list[tuple[float, str, int, int]] = []  # (when, address, pid, seq): workers to kill
        self._gone: set[str] = set()  # workers that left (a stale worker list may still name them)
        self._dir: str | None = None  # our LocalCluster's private folder (marks, scratch space)
        self._marks: str | None = None  # our LocalCluster's workers write their running chunk here
        self._memfds: dict[str, int] = {}  # function version -> its buffers in shared memory (ours)
        self._item_times = ItemTimes()
        self._ac: Any = None
        self._more = threading.Event()
        self.remote_env = None if self.owned else RemoteEnvironment()  # modules, packages, variables

    # ------------------------------------------------------------------ Backend
    @property
    def size(self) -> int:
        if self.owned:
            return self._size
        n = len(self._workers) or 1
        return min(n, self._cap) if self._cap else n

    @property
    def state(self) -> str:
        if self._workers:
            return "warm"
        return "starting" if self._thread is not None and not self._closed else "cold"

    def start(self) -> None:
        if _worker.IN_WORKER:
            raise NestedPoolError(
                "poolmagic cannot start a pool inside one of its own workers: the outer map "
                "already uses the cores. Call the function directly (or in a plain loop) here."
            )
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._closed:
            raise PoolmapError("this pool has been shut down")
        if self._thread is None:
            stop_at_exit(self)
            self._ready.clear()
            self._thread = threading.Thread(target=self._main, name="poolmagic-dask", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the cluster is up (or connected); raise why it is not."""
        self.start()
        if not self._ready.wait(timeout):
            raise PoolmapError(f"the dask cluster did not come up within {timeout:g} s")
        if self._start_error is not None:
            raise self._start_error

    def submit(self, job: Job) -> None:
        self.start()
        job.abort = lambda exc: self.cancel(job, exc, wait=0)
        job.source.on_items = self._wake
        job.source.set_want(self._workers_for(job) * WINDOW)

        def cmd() -> None:
            self._item_times.recall(job)
            self._jobs.append(job)
            self._note_fewer_workers(job)
            job.maybe_finish()  # an empty ITERABLE is done at once

        with self._lock:  # a failed start empties the queue under this lock: nothing is lost
            self._start_locked()
            self._q.put(cmd)

    def cancel(self, job: Job, error: BaseException | None = None, wait: float = 1.0) -> None:
        done = threading.Event()

        def cmd() -> None:
            job.stop(error)
            self._abandon(job)
            done.set()

        with self._lock:
            running = self._thread is not None and not self._closed
            if running:
                self._q.put(cmd)
        if not running:
            cmd()
        elif wait:
            done.wait(wait)

    def resize(self, n: int) -> None:
        n = max(1, int(n))
        if not self.owned:  # a remote cluster's size is its own: use at most n of its workers
            self._cap = n
            self._wake()
            return
        self._size = n
        self._wake()  # the manager thread scales the cluster (_fit_cluster)

    def wait_workers(self, n: int, timeout: float) -> int:
        """Our LocalCluster: until it runs ``n`` workers; a remote cluster is not
        ours to grow: how many it has."""
        client = self.client
        if client is None:  # not connected (yet): what the manager saw last
            return min(n, max(len(self._workers), 1))
        if self.owned:
            with contextlib.suppress(Exception):  # a timeout: the caller gets what did start
                client.wait_for_workers(n, timeout=timeout)
        try:
            have = len(client.scheduler_info()["workers"])
        except Exception:
            have = len(self._workers)
        return min(n, max(have, 1))

    def worker_pids(self) -> list[int]:
        """Worker processes on this machine (a LocalCluster we own); none for a remote cluster."""
        cluster = self.cluster
        if cluster is None:
            return []
        return [n.pid for n in list(cluster.workers.values()) if getattr(n, "pid", None)]

    def disown(self) -> None:
        """In a child made by a bare ``os.fork()``: the cluster is the parent's."""
        self._closed = True

    def prepare_function(self, func: Any, items: Any, star: bool) -> tuple[Any, list[str]]:
        """A remote cluster: local modules sent by value, packages compared, relative paths refused."""
        if self.remote_env is None:
            return func, []
        self.wait_ready(CONNECT_WAIT_S)
        return self.remote_env.prepare(self.client, func, items, star)

    def shutdown(self) -> None:
        if self.remote_env is not None:
            self.remote_env.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        forget_at_exit(self)
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)
        for job in list(self._jobs):
            job.fail(PoolmapError("the pool was shut down while this map was running"))
        self._jobs.clear()
        self._teardown()

    # ------------------------------------------------------------------ status
    def status_detail(self) -> str:
        """``%poolsize``'s second line: scheduler, workers, cores, dashboard."""
        client = self.client
        if client is None:
            if self._start_error is not None:
                return f"dask: not connected: {self._start_error}"
            return "dask: starting" if self._thread is not None else "dask: not started (starts on first use)"
        try:
            workers = client.scheduler_info()["workers"]
        except Exception as exc:
            return f"dask: scheduler {client.scheduler.address} not answering ({type(exc).__name__})"
        threads = sorted({int(w.get("nthreads", 0)) for w in workers.values()})
        owner = "LocalCluster started by poolmagic" if self.owned else "cluster (not started by poolmagic)"
        link = dashboard_link(client)
        if link is None:
            board = "dashboard off (%poolsize --backend dask --dashboard)" if self.owned else "no dashboard"
        elif self.owned:  # without bokeh the page only says so; its other routes (logs, metrics) serve
            bokeh = "needs bokeh: pip install bokeh; " if importlib.util.find_spec("bokeh") is None else ""
            board = f"dashboard {link} ({bokeh}no password: anyone on this machine can open it)"
        else:
            board = f"dashboard {link}"
        tls = " · TLS with a certificate of its own" if self.owned else ""
        text = (
            f"dask {owner}: scheduler {client.scheduler.address} · {_plural(len(workers), 'worker')}"
            + (f" × {_plural(threads[0], 'thread') if len(threads) == 1 else '/'.join(map(str, threads)) + ' threads'}"
               " (task slots; the cores are counted above)" if threads else "")
            + f"{tls} · {board}"
        )
        return text if self.remote_env is None else f"{text}\n{self.remote_env.describe()}"

    # ------------------------------------------------------------------ manager thread
    def _wake(self) -> None:
        self._q.put(_noop)

    def _main(self) -> None:
        try:
            self._connect()
        except BaseException as exc:
            if self._closed:
                self._teardown()
            else:
                self._connect_failed(exc)
            return
        if self._closed:  # shut down while it was starting
            self._teardown()
            return
        self._start_error = None
        self._ready.set()
        me = threading.current_thread()
        while not self._closed and self._thread is me:  # (None after a lost scheduler stayed away)
            try:
                self._step()
            except Exception as exc:
                self._recover(exc)

    def _step(self) -> None:
        try:
            first = self._q.get(timeout=self._wait_s())
        except queue.Empty:
            first = _noop
        todo = [first]
        while True:
            try:
                todo.append(self._q.get_nowait())
            except queue.Empty:
                break
        for fn in todo:
            fn()
            if self._closed:
                return
        if self._lost() and not self._reconnect():
            return
        if self._inflight and any(j.options.timeout is not None for j in self._jobs):
            self._check_timeouts()
        if self._kills:
            self._kill_due()
        if self._guard_due():
            self._guard_memory()
        self._fit_cluster()
        self._schedule()

    def _note_fewer_workers(self, job: Job) -> None:
        """A remote cluster's workers are its own to add: ``-n N`` above them is said, not granted."""
        n = job.options.workers
        if not self.owned and n and n > self.size:
            job.report.notes.append(
                f"-n {n}: the dask cluster at {self.address} gave this pool {self.size} "
                f"worker{'s' if self.size != 1 else ''}, and the map ran on those; "
                f"start more with `dask worker {self.address}`"
            )

    def _fit_cluster(self) -> None:
        """Our LocalCluster runs the pool's size, more while a map asks for more
        (``-n N``, as the local pool starts extra workers), and shrinks back after,
        retiring only workers that hold no chunk of ours (daskscale.py)."""
        if not self.owned or self.cluster is None or self._scaler is None:
            return
        want = max([self._size, *[j.options.workers or 0 for j in self._jobs]])
        self._scaler.fit(want, self._holds)

    def _holds(self, address: str) -> bool:
        """A chunk of ours is queued or runs on the worker at ``address``."""
        return any(c.worker == address for c in self._inflight.values()) or address in self._zombies.values()

    def _wait_s(self) -> float | None:
        """How long the manager may sleep: until a deadline, or a look at the workers while maps run."""
        wait = self._next_deadline()
        if self._jobs:  # a worker that vanished without a word must not hold a map for ever
            tick = REFRESH_OWNED_S if self.owned else REFRESH_REMOTE_S
            wait = tick if wait is None else min(wait, tick)
        return wait

    def _recover(self, exc: BaseException) -> None:
        """An internal error: fail the running maps; the pool stays usable."""
        import traceback

        traceback.print_exc(file=sys.__stderr__)
        for job in list(self._jobs):
            job.fail(PoolmapError(f"poolmagic's dask backend hit an internal error: {exc!r}"))
            self._abandon(job)
        self._jobs.clear()

    def _collect(self) -> None:
        """Hand each finished task, its result already fetched, to the manager thread."""
        ac = self._ac
        while not self._closed and self._ac is ac:  # a new connection has a thread of its own
            self._more.wait(0.5)
            self._more.clear()
            try:
                for fut, result in ac:
                    self._q.put(lambda fut=fut, result=result: self._on_result(fut, result))
                    if self._closed:
                        return
            except Exception:
                if self._closed:
                    return
                time.sleep(0.05)


def _noop() -> None:
    pass


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
