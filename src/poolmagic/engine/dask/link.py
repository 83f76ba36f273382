"""The dask backend's link to its cluster: starting or reaching it, following its workers, closing it.

A part the dask backend holds (``DaskBackend.link``), as local/workers.py is of
the local backend: a LocalCluster we own is started here
(or a remote scheduler reached), the worker list is read again while maps
run and each worker's events followed, and at the end the client is closed
and a LocalCluster we own killed and closed (never a remote one). Runs on
the manager thread, but for the event handlers, which only hand over.
Its words are other modules': why a cluster cannot be reached
(connecterror.py), its line in ``%poolsize`` (statusline.py); so is the
folder our workers write their marks in (marks.py).
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from distributed import Client, LocalCluster, as_completed

from ...errors import PoolmapError
from .address import PROBE_TIMEOUT_S, check_scheduler
from .connecterror import connect_error
from .env import RemoteEnvironment
from .marks import cluster_folder, read_marks
from .plumbing import check_workers, kill_worker, release_cluster, start_local_cluster, unbatch
from .scale import Scaler
from .statusline import StatusLine
from .state import State, incarnation
from ..events import Waiting
from ..job import Job

CONNECT_TIMEOUT_S = 10.0
REFRESH_OWNED_S = 0.1  # how often the worker list is read again while work waits: our cluster (no round trip)
REFRESH_REMOTE_S = 1.0  # a remote cluster (a round trip to the scheduler)


class ClusterLink:
    """The cluster and its client, the list of its workers and their events.

    Held by DaskBackend. ``post(fn)`` hands ``fn`` to the manager thread;
    ``events`` (the backend's Outcomes, set by the backend) is told of
    results, of tasks that began and of workers that left.
    """

    def __init__(self, state: State, address: str | None, size: Callable[[], int], dashboard: bool, topic: str,
                 post: Callable[[Callable[[], None]], None], wake: Callable[[], None],
                 closed: Callable[[], bool]) -> None:
        self.state = state
        self.owned = address is None
        self.address = address
        self.size = size  # the pool's size now (our LocalCluster starts with it)
        self.dashboard = dashboard
        self.topic = topic  # our tasks' "began"/"end" events
        self.post, self.wake, self.closed = post, wake, closed
        self.events: Any = None  # outcomes.Outcomes: on_result, on_task_event, worker_gone
        self.cap: int | None = None  # remote: at most this many workers (%poolsize N)
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None
        self.scaler: Scaler | None = None  # grows and shrinks our LocalCluster (scale.py)
        self.status_line = StatusLine()  # %poolsize's line (a remote link's dashboard asked once)
        self.lock = threading.Lock()
        self.listening: set[str] = set()  # worker addresses whose event topic we follow
        self.refreshed = 0.0
        self.dir: str | None = None  # our LocalCluster's private folder (marks, scratch space)
        self.marks: str | None = None  # our LocalCluster's workers write their running chunk here
        self.memfds: dict[str, int] = {}  # function version -> its buffers in shared memory (ours)
        self.blobs: OrderedDict[str, Any] = OrderedDict()  # function version -> scattered future
        self.contexts: OrderedDict[str, Any] = OrderedDict()  # context version -> scattered future
        self.ac: Any = None
        self.more = threading.Event()
        self.remote_env = None if self.owned else RemoteEnvironment()  # modules, packages, variables

    # ------------------------------------------------------------------ connecting
    def connect(self) -> None:
        if self.owned:
            self.dir = cluster_folder()
            self.marks = os.path.join(self.dir, "marks")  # see task._mark
            self.cluster, self.client = start_local_cluster(self.size(), self.dashboard, self.dir)
        else:
            security = check_scheduler(self.address, min(PROBE_TIMEOUT_S, CONNECT_TIMEOUT_S))  # fails in seconds
            self.client = Client(self.address, timeout=CONNECT_TIMEOUT_S, set_as_default=False, security=security)
            from . import task

            task.CLIENT_PID = os.getpid()  # a task running in this process is refused (task.IN_KERNEL)
            check_workers(self.client)
            self.remote_env.check_packages(self.client, [p for p in ("numpy", "pandas") if p in sys.modules], wait=False)
        if self.closed():
            return
        if self.owned:
            self.scaler = Scaler(self.cluster, self.wake)  # (resized while it started: _fit_cluster)
        unbatch(getattr(self.client, "scheduler_comm", None))  # our submits go at once
        self.client.subscribe_topic(self.topic, self.on_topic)
        self.ac = as_completed(loop=self.client.loop, with_results=True, raise_errors=False)
        threading.Thread(target=self.collect, name="poolmagic-dask-results", daemon=True).start()
        self.refresh_workers(force=True)

    def connect_error(self, exc: BaseException, again: bool = False) -> PoolmapError:
        """Why the cluster cannot be reached (the backend fails the maps with it); all is closed.

        ``again``: the connection was lost in use and could not be made anew.
        """
        err = connect_error(exc, None if self.owned else self.address, again)
        self.teardown()
        return err

    # ------------------------------------------------------------------ a lost scheduler
    def lost(self) -> bool:
        """Our client lost its remote scheduler (it is reconnecting, or gave up).

        The scheduler forgets a client's tasks when its connection drops, so
        what we had in flight will never come back, even if the client gets
        through again: we start anew instead.
        """
        c = self.client
        return not self.owned and c is not None and c.status in ("connecting", "closing", "closed", "failed")

    # ------------------------------------------------------------------ workers
    def refresh_workers(self, force: bool = False) -> None:
        """Which workers the cluster has now; follow each one's events.

        Each worker's own event topic, not the scheduler's "all": dask sends
        some "all" events (replicate) holding objects it cannot serialize,
        which would close this client's connection.
        """
        now = time.monotonic()
        if not force and now - self.refreshed < (REFRESH_OWNED_S if self.owned else REFRESH_REMOTE_S):
            return
        self.refreshed = now
        try:
            if self.cluster is not None:  # kept up to date by the cluster itself: no round trip
                workers = dict(self.cluster.scheduler_info.get("workers", {}))
            else:
                workers = self.client.scheduler_info()["workers"]
        except Exception:
            return
        self.state.task_slots = sum(int(w.get("nthreads") or 1) for w in workers.values() if isinstance(w, dict))
        for address, info in workers.items():
            if address in self.state.workers:
                continue
            wid = incarnation(info)
            if address in self.state.gone:
                if self.state.gone[address] in (None, wid):
                    continue  # the worker that left, still listed
                del self.state.gone[address]  # a new worker on the port of one that left
                self.state.slots.pop(address, None)  # (shown as a new worker)
            self.state.ids[address] = wid
            self.state.workers[address] = self.pid_of(address)  # ours; a remote one: from its events
            self.state.slot(address)
            self.listen(address)
        for address in [a for a in self.state.workers if a not in workers]:
            self.events.worker_gone(address, expected=None)  # in case its event never came

    def listen(self, address: str) -> None:
        if address in self.listening or self.client is None:
            return
        self.listening.add(address)

        def handler(event: Any, address: str = address) -> None:  # the client's event loop
            msg = event[1]
            if isinstance(msg, dict) and msg.get("action") == "remove-worker":
                self.post(lambda: self.events.worker_gone(address, bool(msg.get("expected")), event=True))

        self.client.subscribe_topic(address, handler)

    def unlisten(self, address: str) -> None:
        if address in self.listening:
            self.listening.discard(address)
            try:
                self.client.unsubscribe_topic(address)
            except Exception:
                pass

    def on_topic(self, event: Any) -> None:  # the client's event loop: hand over only
        msg = event[1]
        if isinstance(msg, dict):
            self.post(lambda: self.events.on_task_event(msg))

    def say_waiting(self, jobs: list[Job]) -> None:
        """``jobs`` wait for a worker: say so once each (their displays show it, their
        reports keep it), and that they have one again when they do.

        A remote cluster may have none yet (or lost them with a restarted
        scheduler); it may scale up, so the maps wait rather than fail. Our
        own LocalCluster's nannies restart a worker within a second: not said.
        """
        if self.owned or not (jobs or self.state.waiting):  # (every turn of the manager: nothing to do, mostly)
            return
        waiting = {id(j): j for j in jobs}
        for key, job in self.state.waiting.items():
            if key not in waiting:
                job.publish(Waiting(None))
        for key, job in waiting.items():
            if key not in self.state.waiting:
                job.publish(Waiting(
                    f"waiting for a worker: the dask cluster at {self.address} has none "
                    f"(start one with `dask worker {self.address}`)"
                ))
                note = f"the dask cluster at {self.address} had no worker for a while: the map waited"
                if note not in job.report.notes:  # once, however often its workers were all gone
                    job.report.notes.append(note)
        self.state.waiting = waiting

    def usable(self) -> list[str]:
        """Workers that may get chunks, in a stable order (-n N takes the first N)."""
        scaler = self.scaler
        addrs = [a for a in sorted(self.state.workers, key=self.state.slot)
                 if a not in self.state.expected and not (scaler is not None and scaler.is_retiring(a))]
        if not self.owned and self.cap:
            addrs = addrs[: self.cap]
        return addrs

    def running_mark(self, address: str) -> int | None:
        """The chunk our worker at ``address`` wrote down as running (-1: none; None: unknown)."""
        return self.marks_of(address)[0]

    def marks_of(self, address: str) -> tuple[int | None, int | None]:
        """(the chunk running, the last chunk that ended) as our worker at ``address`` wrote
        them down (task._mark); None where unknown (not our cluster, or nothing written)."""
        return read_marks(self.marks, address)

    def pid_of(self, address: str) -> int | None:
        """The process of the worker at ``address`` (a LocalCluster we own)."""
        if self.cluster is None:
            return None
        for nanny in list(self.cluster.workers.values()):
            if getattr(nanny, "worker_address", None) == address:
                return nanny.pid
        return None

    def collect(self) -> None:
        """Hand each finished task, its result already fetched, to the manager thread (a thread of its own)."""
        ac = self.ac
        while not self.closed() and self.ac is ac:  # a new connection has a thread of its own
            self.more.wait(0.5)
            self.more.clear()
            try:
                for fut, result in ac:
                    self.post(lambda fut=fut, result=result: self.events.on_result(fut, result))
                    if self.closed():
                        return
            except Exception:
                if self.closed():
                    return
                time.sleep(0.05)

    def cancel(self, chunks: list) -> None:
        """Cancel the tasks of ``chunks`` (what is queued goes; what runs, runs on)."""
        if chunks and self.client is not None:
            try:
                self.client.cancel([c.future for c in chunks])
            except Exception:
                pass

    def describe(self) -> str:
        """The connected cluster in a line: scheduler, workers, threads, TLS, dashboard."""
        return self.status_line.describe(self.client, self.owned, self.remote_env)

    # ------------------------------------------------------------------ the end
    def teardown(self) -> None:
        """Close the client; kill and close a LocalCluster we own (never a remote one)."""
        try:
            self.close_dask()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = self.marks = None
            for fd in self.memfds.values():
                _close(fd)
            self.memfds.clear()

    def close_dask(self) -> None:
        with self.lock:
            client, cluster = self.client, self.cluster
            self.client = self.cluster = None
            if self.scaler is not None:
                self.scaler.closed = True
                self.scaler = None
        self.more.set()
        if client is not None:
            futures = [c.future for c in list(self.state.inflight.values())]
            if futures:
                try:
                    client.cancel(futures)
                except Exception:
                    pass
            for topic in (self.topic, *self.listening):
                try:
                    client.unsubscribe_topic(topic)
                except Exception:
                    pass
        if cluster is not None:  # hard first: a worker stuck in C code would hold a polite close
            for nanny in list(cluster.workers.values()):
                nanny.closing = True
                pid = getattr(nanny, "pid", None)
                if pid:
                    kill_worker(pid)
        if client is not None:
            _quietly(client.close, 2)
        if cluster is not None:
            _quietly(cluster.close, 2)
            release_cluster()
        self.state.forget_chunks()
        self.blobs.clear()
        self.contexts.clear()
        self.listening.clear()


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
