"""The dask backend: the same maps on a dask.distributed cluster.

How data flows::

    caller thread (kernel)      manager thread                  dask (scheduler, workers)
    ──────────────────────      ──────────────                  ─────────────────────────
    Pool.run(f, items)
      submit(Job) ──► queue ──► start a LocalCluster it owns    ──► its workers: forks of our
                                  (forkserver.py), or connect       server, which imported dask
                                  to an address
                                scatter the function once per   ──► to one worker, the others fetch
                                  version (a Blob)                   it once (our LocalCluster: big
                                                                     buffers mapped from a memfd)
                                job.next_items(size): one task  ──► task.run, pinned to a
                                  per CHUNK, ≤ 2 in flight per       worker: the map's context,
                                  worker (the Job's adaptive         the function (unpickled once
                                  sizes, grown to ~200 ms)           per worker), "began" event,
                                                                     run_chunk
                                results (as_completed thread)  ◄──  pickled results, output, errors
                                events: a task began; a worker ◄──  worker, scheduler
                                  left ("remove-worker")
                                job.chunk_done / items_failed
      job.wait() ◄── notify ───┘

The manager thread answers every chunk exactly once (see outcomes.py for
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
  (forkserver.py): the next map runs ~0.1 s later.
* Memory (our own cluster, memory.py): a worker above ``--max-memory``,
  or the largest when the kernel's memory runs low, is SIGKILLed and its item
  fails with ``WorkerMemoryError``, as on the local backend.
"""
from __future__ import annotations

import contextlib
import queue
import sys
import threading
import uuid
from typing import Any

from distributed import Client, LocalCluster

from ...localmodules import FollowReloads
from ...errors import NestedPoolError, PoolmapError
from ..base import Backend
from ..core.transport import KILL_ON_INTERRUPT, MEMORY_LIMIT
from ..core.job import Job
from ..core.runchunk import in_worker
from .link import REFRESH_OWNED_S, REFRESH_REMOTE_S, ClusterLink
from .memory import MemoryGuard
from .outcomes import Outcomes
from .plumbing import forget_at_exit, stop_at_exit
from ..core.schedule import WINDOW
from .scheduling import Scheduler
from .state import State

CONNECT_WAIT_S = 30.0  # how long a map's checks wait for a remote scheduler's connection

class DaskBackend(Backend):
    """Maps on a dask.distributed cluster: a LocalCluster it owns, or the one at ``address``.

    Built from parts it holds, each a module of its own and each given only
    the shared ``State`` (``shared``, state.py) and the parts it calls: ``link`` (starting
    or reaching the cluster, its workers, closing it: link.py), ``scheduler``
    (chunk sizes, which map goes to which worker, tasks and scattered
    functions: scheduling.py), ``outcomes`` (what each result, death, deadline
    or cancel does to a job: outcomes.py) and ``memory`` (--max-memory and the
    memory guard on our own cluster: memory.py). This class is the public face
    and the manager thread's loop; all but the public methods run on that thread.
    Why one class of ~300 lines: the public methods and the loop share the command
    queue, the lock and the connection's life (start, reconnect, recover); split
    apart, each half would call back into the other's.
    """

    def __init__(self, size: int, address: str | None = None, dashboard: bool = False):
        """``dashboard``: our LocalCluster serves dask's dashboard (on 127.0.0.1, unauthenticated)."""
        self._size = max(1, int(size))
        self.address = address
        self.owned = address is None
        self.dashboard = bool(dashboard) and self.owned
        self.description = "dask LocalCluster" if self.owned else f"dask cluster {address}"
        # a remote cluster's workers are on other machines: their memory cannot be read from here
        self.lacks = {} if self.owned else {MEMORY_LIMIT: (
            "--max-memory reads each worker's memory on this machine, and this cluster's workers "
            "are elsewhere; give them a limit of their own (dask worker --memory-limit)"),
            KILL_ON_INTERRUPT: ("a task on a remote dask cluster cannot be stopped: it runs on to its end "
                                "in its worker, which gets no new task meanwhile, and its results are dropped")}
        self._q: queue.SimpleQueue = queue.SimpleQueue()  # callables the manager thread runs
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.shared = State(self.owned)
        self.link = ClusterLink(self.shared, address, lambda: self._size, self.dashboard,
                                f"poolmagic-{uuid.uuid4().hex[:8]}", self._q.put, self._wake, lambda: self._closed)
        self.outcomes = Outcomes(self.shared, self.link)
        self.link.events = self.outcomes
        self.scheduler = Scheduler(self.shared, self.link, self.outcomes, lambda: self.size)
        self.memory = MemoryGuard(self.shared, self.link, self.outcomes)
        self.reloads = FollowReloads()  # our own cluster's workers keep the local modules they imported

    @property
    def cluster(self) -> LocalCluster | None:
        """Our LocalCluster (None: a remote cluster, or not started)."""
        return self.link.cluster

    @property
    def client(self) -> Client | None:
        return self.link.client

    @property
    def remote_env(self) -> Any:
        """What a remote cluster's workers get of this kernel (env.py); None for our own."""
        return self.link.remote_env

    # ------------------------------------------------------------------ Backend
    def cores(self) -> int | None:
        """A remote cluster's task slots (its workers' threads); our LocalCluster runs here."""
        return None if self.owned else (self.shared.task_slots or None)

    @property
    def size(self) -> int:
        if self.owned:
            return self._size
        n = len(self.shared.workers) or 1
        return min(n, self.link.cap) if self.link.cap else n

    @property
    def state(self) -> str:
        if self.shared.workers:
            return "warm"
        return "starting" if self._thread is not None and not self._closed else "cold"

    def start(self) -> None:
        if in_worker():
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
        job.source.set_want(self.scheduler.workers_for(job) * WINDOW)

        def cmd() -> None:
            self.shared.item_times.recall(job)
            self.shared.jobs.append(job)
            self.scheduler.note_fewer_workers(job)
            job.maybe_finish()  # an empty ITERABLE is done at once

        with self._lock:  # a failed start empties the queue under this lock: nothing is lost
            self._start_locked()
            self._q.put(cmd)

    def cancel(self, job: Job, error: BaseException | None = None, wait: float = 1.0) -> None:
        self.outcomes.policy.cancel(self._command, job, error, wait)

    def _command(self, cmd: Any) -> bool:
        """Hand ``cmd`` to the manager thread; False if none runs (the caller runs it then)."""
        with self._lock:
            running = self._thread is not None and not self._closed
            if running:
                self._q.put(cmd)
        return running

    def resize(self, n: int) -> None:
        n = max(1, int(n))
        if not self.owned:  # a remote cluster's size is its own: use at most n of its workers
            self.link.cap = n
            self._wake()
            return
        self._size = n
        self._wake()  # the manager thread scales the cluster (_fit_cluster)

    def wait_workers(self, n: int, timeout: float) -> int:
        """Our LocalCluster: until it runs ``n`` workers; a remote cluster is not
        ours to grow: how many it has."""
        client = self.client
        if client is None:  # not connected (yet): what the manager saw last
            return min(n, max(len(self.shared.workers), 1))
        if self.owned:
            with contextlib.suppress(Exception):  # a timeout: the caller gets what did start
                client.wait_for_workers(n, timeout=timeout)
        try:
            have = len(client.scheduler_info()["workers"])
        except Exception:
            have = len(self.shared.workers)
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
        """A remote cluster: local modules sent by value, packages compared, relative paths refused.
        Our own: a local module reloaded in the kernel since the workers imported it goes by value."""
        if self.remote_env is None:
            return self.reloads.prepare(func, items)
        self.wait_ready(CONNECT_WAIT_S)
        return self.remote_env.prepare(self.client, func, items, star)

    def shutdown(self) -> None:
        if self.remote_env is not None:
            self.remote_env.close()
        self.reloads.by_value.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        forget_at_exit(self)
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)
        for job in list(self.shared.jobs):
            job.fail(PoolmapError("the pool was shut down while this map was running"))
        self.shared.jobs.clear()
        self.link.teardown()

    # ------------------------------------------------------------------ status
    def status_detail(self) -> str:
        """``%poolsize``'s second line: scheduler, workers, cores, dashboard."""
        if self.client is None:
            if self._start_error is not None:
                return f"dask: not connected: {self._start_error}"
            return "dask: starting" if self._thread is not None else "dask: not started (starts on first use)"
        return self.link.describe()

    # ------------------------------------------------------------------ manager thread
    def _wake(self) -> None:
        self._q.put(_noop)

    def _main(self) -> None:
        try:
            self.link.connect()
        except BaseException as exc:
            if self._closed:
                self.link.teardown()
            else:
                self._connect_failed(exc)
            return
        if self._closed:  # shut down while it was starting
            self.link.teardown()
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
        if self.link.lost() and not self._reconnect():
            return
        if self.shared.inflight and any(j.options.timeout is not None for j in self.shared.jobs):
            self.outcomes.check_timeouts()
        if self.shared.kills:
            self.outcomes.kill_due()
        if self.memory.due():
            self.memory.guard()
        self._fit_cluster()
        self.scheduler.schedule()

    def _fit_cluster(self) -> None:
        """Our LocalCluster runs the pool's size, more while a map asks for more
        (``-n N``, as the local pool starts extra workers), and shrinks back after,
        retiring only workers that hold no chunk of ours (scale.py)."""
        if not self.owned or self.cluster is None or self.link.scaler is None:
            return
        want = max([self._size, *[j.options.workers or 0 for j in self.shared.jobs]])
        self.link.scaler.fit(want, self.shared.holds)

    def _wait_s(self) -> float | None:
        """How long the manager may sleep: until a deadline, or a look at the workers while maps run."""
        wait = self.outcomes.next_deadline()
        if self.shared.jobs:  # a worker that vanished without a word must not hold a map for ever
            tick = REFRESH_OWNED_S if self.owned else REFRESH_REMOTE_S
            wait = tick if wait is None else min(wait, tick)
        return wait

    def _connect_failed(self, exc: BaseException, again: bool = False) -> None:
        """The cluster cannot be reached: the maps fail with why, the next map tries again."""
        err = self.link.connect_error(exc, again)
        self._start_error = err
        with self._lock:
            self._thread = None  # the next map tries again
            self._ready.set()
            while True:  # what was submitted meanwhile: the jobs fail below
                try:
                    self._q.get_nowait()()
                except queue.Empty:
                    break
                except Exception:
                    pass
        for job in list(self.shared.jobs):
            job.fail(err)
        self.shared.jobs.clear()

    def _reconnect(self) -> bool:
        """Our client lost its remote scheduler, which forgets a client's tasks: send what was
        in flight again on a new connection; False if none could be made (the maps have
        failed then, keeping what finished; the next map tries again)."""
        state = self.shared
        for c in sorted(state.inflight.values(), key=lambda c: c.seq):
            state.take(c)
            self.outcomes.give_back(c)  # not the items' fault
        state.zombies.clear()  # their tasks went with the connection
        state.zombie_keys.clear()
        self.link.close_dask()
        state.workers.clear()
        state.gone.clear()
        state.expected.clear()
        try:
            self.link.connect()
        except BaseException as exc:
            self._connect_failed(exc, again=True)
            return False
        return True

    def _recover(self, exc: BaseException) -> None:
        """An internal error: fail the running maps; the pool stays usable."""
        import traceback

        traceback.print_exc(file=sys.__stderr__)
        for job in list(self.shared.jobs):
            job.fail(PoolmapError(f"poolmagic's dask backend hit an internal error: {exc!r}"))
            self.outcomes.abandon(job)
        self.shared.jobs.clear()


def _noop() -> None:
    pass
