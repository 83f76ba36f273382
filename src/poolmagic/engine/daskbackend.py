"""The dask backend: the same maps on a dask.distributed cluster.

How data flows::

    caller thread (kernel)      manager thread                  dask (scheduler, workers)
    ──────────────────────      ──────────────                  ─────────────────────────
    Pool.run(f, items)
      submit(Job) ──► queue ──► start a LocalCluster it owns,
                                  or connect to an address
                                scatter the function once per   ──► to one worker, the others fetch
                                  version (a Blob)                   it once (our LocalCluster: big
                                                                     buffers mapped from a memfd)
                                job.next_items(size): one task  ──► dasktask.run, pinned to a
                                  per CHUNK, ≤ 2 in flight per       worker: the map's context,
                                  worker (the Job's adaptive         the function (unpickled once
                                  sizes, grown to ~100 ms)           per worker), "began" event,
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
  own, kills the workers running them (0.3 s later, once the cell has
  returned), as the local backend does.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

import cloudpickle
from distributed import Client, LocalCluster, as_completed
from distributed.comm import CommClosedError

from ..errors import NestedPoolError, PoolmapError, safe_str
from . import dasktask
from . import protocol as P
from . import worker as _worker
from .base import Backend
from .daskoutcomes import DaskChunk, DaskOutcomes
from .daskplumbing import check_workers, dashboard_link, forget_at_exit, start_local_cluster, stop_at_exit
from .handle import SHARED_MIN_BYTES
from .job import STREAM_MAX_CHUNK, ItemTimes, Job
from .local import TIMED_ABOVE_S
from .processes import shared_buffers

CONNECT_TIMEOUT_S = 10.0
WINDOW = 2  # chunks in flight per worker: one running, one ready behind it (as locally)
# A dask task costs a few ms of CPU between the client, the scheduler and the
# worker (a local chunk ~0.1 ms): chunks of ~100 ms keep that to a few per cent,
# where the local backend's 25 ms chunks would make it a quarter or more.
TASK_S = 0.1
SCATTER_ATTEMPTS = 3
SCATTER_TIMEOUT_S = 10.0
KEEP_VERSIONS = 4  # function versions kept scattered, as a local worker caches 4
REFRESH_OWNED_S = 0.1  # how often the worker list is read again while work waits: our cluster (no round trip)
REFRESH_REMOTE_S = 1.0  # a remote cluster (a round trip to the scheduler)


class DaskBackend(DaskOutcomes, Backend):
    """Maps on a dask.distributed cluster: a LocalCluster it owns, or the one at ``address``."""

    def __init__(self, size: int, address: str | None = None):
        self._size = max(1, int(size))
        self.address = address
        self.owned = address is None
        self.description = "dask LocalCluster" if self.owned else f"dask cluster {address}"
        self._cap: int | None = None  # remote: at most this many workers (%poolsize N)
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
        self._expected: set[str] = set()  # workers we killed: what they held goes back, unblamed
        # chunks given up on that still run (left to finish, or on a remote cluster): seq -> address
        self._zombies: dict[int, str] = {}
        self._zombie_keys: dict[str, int] = {}  # their futures (ours, left to finish): key -> seq
        self._kills: list[tuple[float, str, int, int]] = []  # (when, address, pid, seq): workers to kill
        self._gone: set[str] = set()  # workers that left (a stale worker list may still name them)
        self._marks: str | None = None  # our LocalCluster's workers write their running chunk here
        self._memfds: dict[str, int] = {}  # function version -> its buffers in shared memory (ours)
        self._item_times = ItemTimes()
        self._ac: Any = None
        self._more = threading.Event()

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
        cluster = self.cluster
        if cluster is not None:  # starting workers takes a second: not on the caller's thread
            threading.Thread(target=_quietly, args=(cluster.scale, n), daemon=True, name="poolmagic-dask-scale").start()
        self._wake()

    def worker_pids(self) -> list[int]:
        """Worker processes on this machine (a LocalCluster we own); none for a remote cluster."""
        cluster = self.cluster
        if cluster is None:
            return []
        return [n.pid for n in list(cluster.workers.values()) if getattr(n, "pid", None)]

    def disown(self) -> None:
        """In a child made by a bare ``os.fork()``: the cluster is the parent's."""
        self._closed = True

    def shutdown(self) -> None:
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
        cores = sum(int(w.get("nthreads", 0)) for w in workers.values())
        owner = "LocalCluster started by poolmagic" if self.owned else "cluster (not started by poolmagic)"
        link = dashboard_link(client)
        if link is None:
            board = "no dashboard"
        elif self.owned and importlib.util.find_spec("bokeh") is None:  # the page would only say so
            board = f"dashboard {link} (needs bokeh: pip install bokeh)"
        else:
            board = f"dashboard {link}"
        return (
            f"dask {owner}: scheduler {client.scheduler.address} · {_plural(len(workers), 'worker')} · "
            f"{_plural(cores, 'core')} · {board}"
        )

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
        while not self._closed:
            try:
                self._step()
            except Exception as exc:
                self._recover(exc)

    def _connect(self) -> None:
        if self.owned:
            self._marks = marks_folder()  # see dasktask._mark
            self.cluster, self.client = start_local_cluster(self._size)
        else:
            self.client = Client(self.address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            check_workers(self.client)
        if self._closed:
            return
        if self.owned and len(self.cluster.worker_spec) != self._size:  # resized while it started
            self.cluster.scale(self._size)
        self.client.subscribe_topic(self._topic, self._on_topic)
        self._ac = as_completed(loop=self.client.loop, with_results=True, raise_errors=False)
        threading.Thread(target=self._collect, name="poolmagic-dask-results", daemon=True).start()
        self._refresh_workers(force=True)

    def _connect_failed(self, exc: BaseException) -> None:
        where = "start a dask LocalCluster" if self.owned else f"connect to the dask scheduler at {self.address}"
        if isinstance(exc, PoolmapError):
            err = exc
        else:
            err = PoolmapError(f"could not {where}: {type(exc).__name__}: {safe_str(exc)}")
            err.__cause__ = exc
        self._start_error = err
        self._teardown()
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
        for job in list(self._jobs):
            job.fail(err)
        self._jobs.clear()

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
        if self._inflight and any(j.options.timeout is not None for j in self._jobs):
            self._check_timeouts()
        if self._kills:
            self._kill_due()
        self._schedule()

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
        while not self._closed:
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

    # ------------------------------------------------------------------ workers
    def _refresh_workers(self, force: bool = False) -> None:
        """Which workers the cluster has now; follow each one's events.

        Each worker's own event topic, not the scheduler's "all": dask sends
        some "all" events (replicate) holding objects it cannot serialize,
        which would close this client's connection.
        """
        now = time.monotonic()
        if not force and now - self._refreshed < (REFRESH_OWNED_S if self.owned else REFRESH_REMOTE_S):
            return
        self._refreshed = now
        try:
            if self.cluster is not None:  # kept up to date by the cluster itself: no round trip
                workers = dict(self.cluster.scheduler_info.get("workers", {}))
            else:
                workers = self.client.scheduler_info()["workers"]
        except Exception:
            return
        for address in workers:
            if address not in self._workers and address not in self._gone:
                self._workers[address] = self._pid_of(address)  # ours; a remote one: from its events
                self._slot(address)
                self._listen(address)
        for address in [a for a in self._workers if a not in workers]:
            self._worker_gone(address, expected=None)  # in case its event never came

    def _listen(self, address: str) -> None:
        if address in self._listening or self.client is None:
            return
        self._listening.add(address)

        def handler(event: Any, address: str = address) -> None:  # the client's event loop
            msg = event[1]
            if isinstance(msg, dict) and msg.get("action") == "remove-worker":
                self._q.put(lambda: self._worker_gone(address, bool(msg.get("expected")), event=True))

        self.client.subscribe_topic(address, handler)

    def _unlisten(self, address: str) -> None:
        if address in self._listening:
            self._listening.discard(address)
            try:
                self.client.unsubscribe_topic(address)
            except Exception:
                pass

    def _on_topic(self, event: Any) -> None:  # the client's event loop: hand over only
        msg = event[1]
        if isinstance(msg, dict):
            self._q.put(lambda: self._on_task_event(msg))

    def _usable(self) -> list[str]:
        """Workers that may get chunks, in a stable order (-n N takes the first N)."""
        addrs = [a for a in sorted(self._workers, key=self._slot) if a not in self._expected]
        if not self.owned and self._cap:
            addrs = addrs[: self._cap]
        return addrs

    def _slot(self, address: str | None) -> int:
        if address is None:
            return -1
        slot = self._slots.get(address)
        if slot is None:
            slot = self._slots[address] = len(self._slots)
        return slot

    def _running_mark(self, address: str) -> int | None:
        """The chunk our worker at ``address`` wrote down as running (-1: none; None: unknown)."""
        if self._marks is None:
            return None
        try:
            with open(os.path.join(self._marks, dasktask.mark_name(address)), "rb") as f:
                return int(f.read().strip() or b"-1")
        except (OSError, ValueError):
            return None

    def _pid_of(self, address: str) -> int | None:
        """The process of the worker at ``address`` (a LocalCluster we own)."""
        if self.cluster is None:
            return None
        for nanny in list(self.cluster.workers.values()):
            if getattr(nanny, "worker_address", None) == address:
                return nanny.pid
        return None

    # ------------------------------------------------------------------ scheduling
    def _workers_for(self, job: Job) -> int:
        return job.options.workers or self.size

    def _schedule(self) -> None:
        if self._jobs and self.client is not None:
            self._refresh_workers()
        jobs = [j for j in self._jobs if j.has_work()]
        if jobs and self.client is not None:
            usable = self._usable()
            rank = {a: i for i, a in enumerate(usable)}
            load = dict.fromkeys(usable, 0)
            for c in self._inflight.values():
                if c.worker in load:
                    load[c.worker] += 1
            for a in self._zombies.values():
                if a in load:
                    load[a] += 1
            while jobs:
                sent = False
                for address in sorted(usable, key=load.__getitem__):
                    if load[address] >= WINDOW:
                        continue
                    job = self._pick(jobs, rank[address])
                    if job is None:
                        continue
                    size = self._chunk_size(job)
                    got = job.next_items(size)
                    if job.source.is_stream:  # buffered ahead: about half a round of chunks
                        job.source.set_want(size * max(1, self._workers_for(job) // 2))
                    if got is None:
                        continue
                    if self._send(job, *got, address):
                        load[address] += 1
                        sent = True
                jobs = [j for j in jobs if j.has_work()]
                if not sent:
                    break
        self._forget_finished_jobs()

    def _chunk_size(self, job: Job) -> int:
        """The Job's size, grown to ~TASK_S of work while 2 chunks per worker remain."""
        workers = self._workers_for(job)
        size = job.chunk_size(workers)
        t = job.per_item_s()
        if job.chunksize or t is None:  # the user's size; a probe
            return size
        bigger = math.ceil(TASK_S / max(t, 1e-9))
        rem = job.source.remaining()
        if rem is None:
            bigger = min(bigger, STREAM_MAX_CHUNK)
        else:
            bigger = min(bigger, math.ceil(rem / (2 * workers)))  # the tail still balances
        return max(size, bigger)

    def _pick(self, jobs: list[Job], rank: int) -> Job | None:
        n = len(jobs)
        for k in range(n):
            job = jobs[(self._rr + k) % n]
            w = job.options.workers
            if job.has_work() and (w is None or rank < w):
                self._rr = (self._rr + k + 1) % n
                return job
        return None

    def _send(self, job: Job, start: int, items: Any, address: str) -> bool:
        """Submit one chunk as one task pinned to ``address``; False if it was not sent."""
        if type(items) is range:
            wire: Any = items  # plain pickle knows ranges
        else:  # anything else may hold notebook-defined classes: cloudpickle, as locally
            try:
                data, frames = P.dumps_oob(items, cloudpickle.dumps)
            except Exception:
                self._unpicklable_items(job, start, items)
                return False
            wire = dasktask.Blob(None, data, frames)
        t = job.per_item_s()
        timed = t is None or t >= TIMED_ABOVE_S
        seq = next(self._seq)
        try:
            fn = self._scattered(self._blobs, job.payload.key, lambda: self._function_blob(job.payload))
            # the kernel's cwd, environment and sys.path mean nothing on another machine
            ctx = self._scattered(self._contexts, job.context.key, lambda: dasktask.Box(job.context)) if self.owned else None
            fut = self.client.submit(
                dasktask.run, fn, ctx, seq, start, wire, job.wire_options, timed, self._topic, not self.owned,
                self._marks,
                key=f"poolmap-{_task_name(job)}-{self._token}-{seq}", retries=0,
                workers=[address], allow_other_workers=False,
            )
        except Exception as exc:
            job.requeue(start, items)  # it never ran; the failed job will not take it again
            err = PoolmapError(f"could not submit a task to the dask cluster: {type(exc).__name__}: {safe_str(exc)}")
            err.__cause__ = exc
            job.fail(err)
            self._abandon(job)
            return False
        c = DaskChunk(seq, job, start, items, fut, address, (fn,) if ctx is None else (fn, ctx))
        self._inflight[seq] = c
        self._by_key[fut.key] = c
        self._ac.add(fut)
        self._more.set()
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
                fut = self.client.scatter(make(), hash=False, timeout=SCATTER_TIMEOUT_S)
                break
            except (OSError, CommClosedError):  # a worker died just now; the scheduler will know soon
                if attempt == SCATTER_ATTEMPTS - 1:
                    raise
                time.sleep(0.2)
                self._refresh_workers(force=True)
        cache[version] = fut
        in_use = {j.payload.key for j in self._jobs} | {j.context.key for j in self._jobs}
        for old in list(cache)[:-KEEP_VERSIONS]:
            if old not in in_use:
                del cache[old]  # releasing the future frees the workers' copies
                _close(self._memfds.pop(old, None))  # workers keep what they mapped
        return fut

    def _function_blob(self, payload: Any) -> Any:
        """What to scatter for a function version: its bytes, or on our own cluster,
        big buffers in shared memory that every worker maps (no copy per worker)."""
        sizes = tuple(b.nbytes for b in payload.buffers)
        if self.owned and sum(sizes) >= SHARED_MIN_BYTES:
            fd = shared_buffers(payload.buffers)
            if fd is not None:
                self._memfds[payload.key] = fd
                return dasktask.SharedBlob(payload.key, payload.data, f"/proc/{os.getpid()}/fd/{fd}", sizes)
        return dasktask.Blob(payload.key, payload.data, payload.buffers)

    def _forget_finished_jobs(self) -> None:
        keep = []
        for j in self._jobs:
            if j.active:
                keep.append(j)
            else:
                self._item_times.remember(j)
        self._jobs = keep

    # ------------------------------------------------------------------ the end
    def _teardown(self) -> None:
        """Close the client; kill and close a LocalCluster we own (never a remote one)."""
        try:
            self._close_dask()
        finally:
            if self._marks is not None:
                shutil.rmtree(self._marks, ignore_errors=True)
            for fd in self._memfds.values():
                _close(fd)
            self._memfds.clear()

    def _close_dask(self) -> None:
        with self._lock:
            client, cluster = self.client, self.cluster
            self.client = self.cluster = None
        self._more.set()
        if client is not None:
            futures = [c.future for c in list(self._inflight.values())]
            if futures:
                try:
                    client.cancel(futures)
                except Exception:
                    pass
            for topic in (self._topic, *self._listening):
                try:
                    client.unsubscribe_topic(topic)
                except Exception:
                    pass
        if cluster is not None:  # hard first: a worker stuck in C code would hold a polite close
            for nanny in list(cluster.workers.values()):
                nanny.closing = True
                pid = getattr(nanny, "pid", None)
                if pid:
                    _kill(pid)
        if client is not None:
            _quietly(client.close, 2)
        if cluster is not None:
            _quietly(cluster.close, 2)
        self._inflight.clear()
        self._by_key.clear()
        self._blobs.clear()
        self._contexts.clear()
        self._listening.clear()


MARKS_PREFIX = "poolmagic-dask-"


def marks_folder() -> str:
    """A new folder for our LocalCluster's marks, named after this process.

    Removed at shutdown; those of processes that no longer exist (a kernel
    that was killed) are removed here.
    """
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        names = []
    for name in names:
        m = re.fullmatch(re.escape(MARKS_PREFIX) + r"(\d+)-\w+", name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{MARKS_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's
    return True


def _kill(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _noop() -> None:
    pass


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _quietly(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _task_name(job: Job) -> str:
    """The function's name, for the dashboard's task stream (``poolmap-work``)."""
    name = re.sub(r"\W+", "_", getattr(job.report, "func_name", "") or "map").strip("_")
    return name[:40] or "map"
