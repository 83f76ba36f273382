"""The dask backend's cluster: starting or reaching it, following its workers, closing it.

Part of the dask backend (mixed into DaskBackend, whose state it uses), as
workerset.py is of the local backend: a LocalCluster we own is started here
(or a remote scheduler reached), the worker list is read again while maps
run and each worker's events followed, and at the end the client is closed
and a LocalCluster we own killed and closed (never a remote one). Runs on
the manager thread, but for the event handlers, which only hand over.
"""
from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
import time
from typing import Any, Callable

from distributed import Client, LocalCluster, as_completed

from ..errors import PoolmapError, safe_str
from . import dasktask, runtimedir
from .daskaddress import PROBE_TIMEOUT_S, check_scheduler
from .daskoutcomes import DaskChunk
from .daskplumbing import check_workers, kill_worker, release_cluster, start_local_cluster, unbatch
from .daskscale import Scaler
from .events import Waiting
from .job import Job

CONNECT_TIMEOUT_S = 10.0
REFRESH_OWNED_S = 0.1  # how often the worker list is read again while work waits: our cluster (no round trip)
REFRESH_REMOTE_S = 1.0  # a remote cluster (a round trip to the scheduler)


class DaskCluster:
    """Mixin of DaskBackend: the cluster and its client, and the list of its workers."""

    owned: bool
    address: str | None
    _size: int
    _cap: int | None
    _scaler: Any  # daskscale.Scaler of our LocalCluster, else None
    _wake: Callable[[], None]
    _waiting: dict[int, Job]
    cluster: LocalCluster | None
    client: Client | None
    _q: queue.SimpleQueue
    _lock: threading.Lock
    _thread: threading.Thread | None
    _closed: bool
    _ready: threading.Event
    _start_error: BaseException | None
    _jobs: list[Job]
    _inflight: dict[int, DaskChunk]
    _by_key: dict[str, DaskChunk]
    _topic: str
    _blobs: Any
    _contexts: Any
    _workers: dict[str, int | None]
    _slots: dict[str, int]
    _listening: set[str]
    _refreshed: float
    _expected: set[str]
    _gone: set[str]
    _marks: str | None
    _dir: str | None
    dashboard: bool
    _memfds: dict[str, int]
    _ac: Any
    remote_env: Any  # daskenv.RemoteEnvironment of a cluster not ours, else None
    _more: threading.Event

    # ------------------------------------------------------------------ connecting
    def _connect(self) -> None:
        if self.owned:
            self._dir = cluster_folder()
            self._marks = os.path.join(self._dir, "marks")  # see dasktask._mark
            self.cluster, self.client = start_local_cluster(self._size, self.dashboard, self._dir)
        else:
            security = check_scheduler(self.address, min(PROBE_TIMEOUT_S, CONNECT_TIMEOUT_S))  # fails in seconds
            self.client = Client(self.address, timeout=CONNECT_TIMEOUT_S, set_as_default=False, security=security)
            check_workers(self.client)
            self.remote_env.check_packages(self.client, [p for p in ("numpy", "pandas") if p in sys.modules], wait=False)
        if self._closed:
            return
        if self.owned:
            self._scaler = Scaler(self.cluster, self._wake)  # (resized while it started: _fit_cluster)
        unbatch(getattr(self.client, "scheduler_comm", None))  # our submits go at once
        self.client.subscribe_topic(self._topic, self._on_topic)
        self._ac = as_completed(loop=self.client.loop, with_results=True, raise_errors=False)
        threading.Thread(target=self._collect, name="poolmagic-dask-results", daemon=True).start()
        self._refresh_workers(force=True)

    def _connect_failed(self, exc: BaseException, again: bool = False) -> None:
        """The cluster cannot be reached: the maps fail with why, the next map tries again.

        ``again``: the connection was lost in use and could not be made anew.
        """
        where = "start a dask LocalCluster" if self.owned else f"connect to the dask scheduler at {self.address}"
        if again:
            where = f"connect again to the dask scheduler at {self.address} after losing the connection"
        # A Client(...) that fails after starting its event loop (a tls:// address
        # without dask's TLS configuration) leaves a half-made client in a cycle:
        # closed only at interpreter exit, where that took 20 s. Close it now.
        _close_clients_in(exc)
        _drop_frames(exc)
        if isinstance(exc, PoolmapError) and again:  # (daskaddress's checks: said once, with "again")
            reason = str(exc).removeprefix(f"could not connect to the dask scheduler at {self.address}: ")
            err = PoolmapError(f"could not {where}: {reason}")
        elif isinstance(exc, PoolmapError):
            err = exc
        else:
            hint = ""
            if (self.address or "").startswith("tls://") and "ssl" in safe_str(exc).lower():
                hint = (" (a tls:// scheduler needs dask's TLS configuration: distributed.comm.tls.ca-file, "
                        ".client.cert and .client.key, e.g. in ~/.config/dask/distributed.yaml)")
            err = PoolmapError(f"could not {where}: {type(exc).__name__}: {safe_str(exc)}{hint}")
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

    # ------------------------------------------------------------------ a lost scheduler
    def _lost(self) -> bool:
        """Our client lost its remote scheduler (it is reconnecting, or gave up).

        The scheduler forgets a client's tasks when its connection drops, so
        what we had in flight will never come back, even if the client gets
        through again: we start anew instead.
        """
        c = self.client
        return not self.owned and c is not None and c.status in ("connecting", "closing", "closed", "failed")

    def _reconnect(self) -> bool:
        """Send what was in flight again on a new connection; False if none could be made
        (the maps have failed then, keeping what finished; the next map tries again)."""
        for c in sorted(self._inflight.values(), key=lambda c: c.seq):
            self._take(c)
            self._give_back(c)  # not the items' fault
        self._zombies.clear()  # their tasks went with the connection
        self._zombie_keys.clear()
        self._close_dask()
        self._workers.clear()
        self._gone.clear()
        self._expected.clear()
        try:
            self._connect()
        except BaseException as exc:
            self._connect_failed(exc, again=True)
            return False
        return True

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

    def _say_waiting(self, jobs: list[Job]) -> None:
        """``jobs`` wait for a worker: say so once each (their displays show it, their
        reports keep it), and that they have one again when they do.

        A remote cluster may have none yet (or lost them with a restarted
        scheduler); it may scale up, so the maps wait rather than fail. Our
        own LocalCluster's nannies restart a worker within a second: not said.
        """
        if self.owned or not (jobs or self._waiting):  # (every turn of the manager: nothing to do, mostly)
            return
        waiting = {id(j): j for j in jobs}
        for key, job in self._waiting.items():
            if key not in waiting:
                job.publish(Waiting(None))
        for key, job in waiting.items():
            if key not in self._waiting:
                job.publish(Waiting(
                    f"waiting for a worker: the dask cluster at {self.address} has none "
                    f"(start one with `dask worker {self.address}`)"
                ))
                job.report.notes.append(f"the dask cluster at {self.address} had no worker for a while: the map waited")
        self._waiting = waiting

    def _usable(self) -> list[str]:
        """Workers that may get chunks, in a stable order (-n N takes the first N)."""
        scaler = self._scaler
        addrs = [a for a in sorted(self._workers, key=self._slot)
                 if a not in self._expected and not (scaler is not None and scaler.is_retiring(a))]
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

    # ------------------------------------------------------------------ the end
    def _teardown(self) -> None:
        """Close the client; kill and close a LocalCluster we own (never a remote one)."""
        try:
            self._close_dask()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = self._marks = None
            for fd in self._memfds.values():
                _close(fd)
            self._memfds.clear()

    def _close_dask(self) -> None:
        with self._lock:
            client, cluster = self.client, self.cluster
            self.client = self.cluster = None
            if self._scaler is not None:
                self._scaler.closed = True
                self._scaler = None
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
                    kill_worker(pid)
        if client is not None:
            _quietly(client.close, 2)
        if cluster is not None:
            _quietly(cluster.close, 2)
            release_cluster()
        self._inflight.clear()
        self._by_key.clear()
        self._blobs.clear()
        self._contexts.clear()
        self._listening.clear()


def _close_clients_in(exc: BaseException) -> None:
    """Close the dask clients whose methods ``exc`` came through (``self`` of its frames)."""
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, Client) and obj.status != "closed":
            _quietly(obj.close, 2)
        tb = tb.tb_next


def _drop_frames(exc: BaseException | None) -> None:
    """Forget the tracebacks of ``exc`` and the exceptions it chains to (the messages stay)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


MARKS_PREFIX = "poolmagic-"  # (runtimedir.PREFIX: every runtime directory of ours)


def cluster_folder() -> str:
    """A new private folder for our LocalCluster: its workers' marks and dask's scratch space.

    Inside this process's runtime directory (runtimedir.py: 0700, named after
    the pid, removed at exit and, after a SIGKILL, by the next one); removed
    when the cluster closes. Everything in it is made 0700/0600.
    """
    path = runtimedir.subdir("dask")
    for name in ("marks", "dask-scratch-space"):  # (dask would make its scratch space 0755)
        os.mkdir(os.path.join(path, name), 0o700)
    return path


def marks_folder() -> str:
    """(The marks of a cluster: see cluster_folder.)"""
    return os.path.join(cluster_folder(), "marks")


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

