"""Plumbing of the dask backend: starting a LocalCluster, reaching a remote one, exit.

Everything here talks to dask.distributed or the operating system; the
backend (backend.py) only decides *when*.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from typing import Any

import cloudpickle
import dask
from distributed import Client, LocalCluster, Nanny
from distributed.security import Security
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import silence_logging_cmgr

from ...errors import PoolmapError
from ..core.exits import ExitList
from . import forkserver
from .preload import WARM_ENV, unbatch
from .scale import PoolCluster
from ..handle import kill_group
from ..processes import install_main_guard
from ..warm import warm_modules

DASK_WORKER_NAME = "Dask Worker process"  # how a nanny names the process it starts


class ExitCodes:
    """How the worker processes of the LocalClusters we own ended, by worker address."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.cond = threading.Condition()

    def note(self, address: str | None, code: int) -> None:
        if address:
            with self.cond:
                self.codes[address] = code
                self.cond.notify_all()

    def wait(self, address: str, timeout: float) -> int | None:
        """The exit status of the worker at ``address``, waiting up to ``timeout`` for it."""
        with self.cond:
            self.cond.wait_for(lambda: address in self.codes, timeout)
            return self.codes.pop(address, None)


EXITS = ExitCodes()


class PoolNanny(Nanny):
    """A nanny that records how its worker process ended (for WorkerCrashedError).

    The nannies of a LocalCluster run in this process; dask itself only logs
    the exit status.
    """

    closing = False  # set by poolmagic before it kills the workers to close the cluster

    async def instantiate(self) -> Any:
        """Start the worker process, forked by our server (forkserver.py) where it can be."""
        token = forkserver.OURS.set(forkserver.CONTEXT is not None)
        try:
            return await super().instantiate()
        finally:
            forkserver.OURS.reset(token)

    def _on_worker_exit_sync(self, exitcode: int) -> None:
        try:
            EXITS.note(self.worker_address, exitcode)
        finally:
            if not self.closing:  # a new worker now would only make the close wait for it
                super()._on_worker_exit_sync(exitcode)


class QuietLogs(logging.Filter):
    """Drops dask's log lines about what poolmagic reports itself (crashes, restarts).

    The scheduler and the nannies of a LocalCluster run in the kernel: their
    log lines would otherwise land in whatever cell runs next.
    """

    PATTERNS = re.compile(
        r"marked as failed because|Restarting worker|Worker process \d+ (was killed|exited)|"
        r"Removing worker .* caused the cluster to lose|Received heartbeat from unregistered worker|"
        r"Closed comm .* while trying to write|Failed to communicate with scheduler during heartbeat|"
        r"Batched Comm Closed|reaping stray process|exit status was already read|Couldn't gather keys"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
                return False  # a nanny's restart cut short by the close
            return not self.PATTERNS.search(record.getMessage())
        except Exception:
            return True


_QUIET = QuietLogs()
for _name in ("distributed.scheduler", "distributed.nanny", "distributed.worker", "distributed.core",
              "distributed.batched", "distributed.client", "distributed.process"):
    logging.getLogger(_name).addFilter(_QUIET)


class _Hush:
    """dask's INFO lines held back while any LocalCluster of ours runs (counted).

    ``LocalCluster(silence_logs=...)`` does it per cluster, for the whole
    process: closing the first of two put the level back, and the second
    one's closing lines ("Nanny at ... closed") landed in the next cell.
    """

    def __init__(self) -> None:
        self.count = 0
        self.stack: contextlib.ExitStack | None = None
        self.lock = threading.Lock()

    def hold(self) -> None:
        with self.lock:
            if self.count == 0:
                stack = contextlib.ExitStack()
                for root in ("distributed", "bokeh"):
                    stack.enter_context(silence_logging_cmgr(logging.ERROR, root=root))
                self.stack = stack
            self.count += 1

    def release(self) -> None:
        with self.lock:
            if self.count == 0:
                return
            self.count -= 1
            if self.count == 0 and self.stack is not None:
                self.stack.close()  # the levels they had before our first cluster
                self.stack = None


HUSH = _Hush()


class Unbatched(SchedulerPlugin):
    """Our LocalCluster's scheduler writes to its workers and clients at once."""

    name = "poolmagic-unbatched"

    async def start(self, scheduler: Any) -> None:
        for stream in [*scheduler.stream_comms.values(), *scheduler.client_comms.values()]:
            unbatch(stream)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        unbatch(scheduler.stream_comms.get(worker))

    def add_client(self, scheduler: Any, client: str) -> None:
        # (called before the scheduler makes the client's stream: set on its next turn)
        scheduler.loop.add_callback(lambda: unbatch(scheduler.client_comms.get(client)))


CLUSTER_CONFIG = {
    # dask's sampling profiler interrupts the running item every 10 ms to
    # read its stack: 25 ms items took 41-49 ms with it, 32-35 ms without.
    "distributed.worker.profile.enabled": False,
    # The event-loop health tick (20 ms) wakes each worker for nothing a
    # notebook needs: an idle worker used 4 % of a core with it, 1.3-1.7 % at 1 s.
    "distributed.admin.tick.interval": "1s",
    # The system monitor (CPU, memory, disk and network counters every 0.5 s)
    # feeds the dashboard's graphs: every 2 s and without disk counters, an idle
    # LocalCluster costs the kernel 1.4 % of a core instead of 2.3 %.
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.system-monitor.disk": False,
    # No spilling or pausing by the workers (memory.py has the guard): our
    # tasks are pinned, and a worker paused at 80 % of its limit would hold them
    # until its memory went down. Its monitor also woke each worker 10 times a
    # second, mid-item: a busy 2-worker cluster's context switches went from
    # 140/s to 91/s (the item CPU it saves is within this host's noise).
    # The nanny still kills a worker at 95 %.
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}


def kill_worker(pid: int) -> None:
    """SIGKILL a worker of our LocalCluster and its process group (it leads one,
    see preload.py), so that processes the mapped function started go too."""
    kill_group(pid)
    try:
        os.kill(pid, signal.SIGKILL)  # not yet the leader of a group of its own
    except OSError:
        pass


def drop_main_for_dask_workers() -> None:
    """Keep the nannies' worker processes from re-running the kernel's ``__main__``
    (the local backend's guard, for dask's process names)."""
    install_main_guard(DASK_WORKER_NAME)


# For benchmarks/dask_rows.py only (--tcp): the LocalCluster without TLS, as before
# issue 23, to measure what TLS costs. Any local user could then run code as you.
BENCHMARK_PLAIN_TCP = False


def start_local_cluster(n_workers: int, dashboard: bool = False,
                        directory: str | None = None) -> tuple[LocalCluster, Client]:
    """A LocalCluster only this kernel can use, on loopback only, and its client.

    Mutual TLS with a certificate made for this cluster alone
    (``Security.temporary()``: key and certificate in memory, handed to the
    worker processes through their start pipe), so a process of another user
    on this machine can neither connect nor submit nor read data. Scheduler,
    nannies and workers listen on 127.0.0.1; their HTTP servers are closed
    unless ``dashboard`` (then the scheduler's serves the dashboard, on
    127.0.0.1, without authentication). Scratch space in ``directory`` (ours,
    0700). One thread per worker process, as the local backend's workers; a
    task whose worker dies is not retried on another (``allowed_failures=0``):
    poolmagic reports the item at once instead.
    """
    drop_main_for_dask_workers()
    forkserver.install()
    forkserver.start()  # both released when the cluster is closed (release_cluster)
    HUSH.hold()
    config = cluster_config(dashboard, directory)
    try:
        security = Security() if BENCHMARK_PLAIN_TCP else Security.temporary()
        with dask.config.set(config):  # the scheduler and nannies run here, in the kernel
            cluster = PoolCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                protocol="tcp://" if BENCHMARK_PLAIN_TCP else "tls://",
                security=security,
                # the scheduler's HTTP server on loopback too: without an address it
                # takes 8787 on every interface. Closed below unless asked for.
                dashboard_address="127.0.0.1:0",
                worker_class=PoolNanny,
                scheduler_kwargs={"allowed_failures": 0, "dashboard": dashboard},
                silence_logs=logging.ERROR,  # its workers; in this process HUSH has done it already
                preload=["poolmagic.engine.dask.preload"],  # each worker: its own process group, SIGINT ignored
                env={WARM_ENV: ",".join(warm_modules())},  # ... and the kernel's numpy/pandas, imported up front
                config=config,  # the worker processes' (the scheduler's: dask.config.set)
                local_directory=directory,  # the nannies' and workers' scratch space
            )
    except BaseException:
        release_cluster()
        raise
    try:
        if not dashboard:
            _close_http(cluster)
        client = Client(cluster, set_as_default=False, direct_to_workers=True)  # the cluster's certificate
        client.register_plugin(Unbatched())
    except BaseException:
        cluster.close(timeout=2)
        release_cluster()
        raise
    return cluster, client


def cluster_config(dashboard: bool, directory: str | None) -> dict[str, Any]:
    """CLUSTER_CONFIG, with the HTTP routes and scratch space of this cluster."""
    config = dict(CLUSTER_CONFIG)
    # Without the dashboard, nothing to serve over HTTP (its routes include
    # worker logs, call stacks and metrics); workers never serve any.
    if not dashboard:
        config["distributed.scheduler.http.routes"] = []
    config["distributed.worker.http.routes"] = []
    # dask's lock files guard a scratch space shared by clusters; ours is private
    # to this cluster, and they would be the only files in it not 0600/0700.
    config["distributed.worker.use-file-locking"] = False
    if directory is not None:
        config["temporary-directory"] = directory  # the scheduler's (it has no local_directory argument)
    return config


def _close_http(cluster: LocalCluster) -> None:
    """Stop the scheduler's HTTP server (dask starts one whatever it serves)."""
    scheduler = getattr(cluster, "scheduler", None)
    server = getattr(scheduler, "http_server", None)
    if server is None:
        return

    async def stop() -> None:
        server.stop()
        scheduler.services.pop("dashboard", None)

    cluster.sync(stop)


def release_cluster() -> None:
    """What a LocalCluster of ours held in this process: the forkserver, the hushed logs."""
    forkserver.release()
    HUSH.release()


def check_workers(client: Client) -> None:
    """A remote cluster's workers must import poolmagic, with this Python and cloudpickle."""
    try:
        versions = client.get_versions(packages=["poolmagic", "cloudpickle"])
    except Exception:
        return  # an old scheduler: the first task will tell
    here = sys.version_info[:2]
    # the workers run poolmagic's own code for each chunk (task.py): its version must be ours
    ours = ((versions.get("client") or {}).get("packages") or {}).get("poolmagic")
    for address, info in (versions.get("workers") or {}).items():
        if not isinstance(info, dict):
            continue
        pkgs = info.get("packages") or {}
        py = str((info.get("host") or {}).get("python", ""))
        if pkgs.get("poolmagic") is None:
            raise PoolmapError(
                f"the dask worker {address} cannot import poolmagic: install it in the workers' "
                f"environment too (pip install poolmagic, the same version as here)"
            )
        if ours is not None and pkgs["poolmagic"] != ours:
            raise PoolmapError(
                f"the dask worker {address} has poolmagic {pkgs['poolmagic']}, this kernel {ours}: each chunk "
                f"runs poolmagic's code on the worker; install poolmagic=={ours} in the workers' environment"
            )
        try:
            theirs = tuple(int(p) for p in py.split(".")[:2])
        except ValueError:
            theirs = here
        if theirs != here:
            raise PoolmapError(
                f"the dask worker {address} runs Python {py}, this kernel {here[0]}.{here[1]}: "
                f"functions pickled by value need the same Python version on both sides"
            )
        if pkgs.get("cloudpickle") not in (None, cloudpickle.__version__):
            raise PoolmapError(
                f"the dask worker {address} has cloudpickle {pkgs.get('cloudpickle')}, this kernel "
                f"{cloudpickle.__version__}: install the same version on both sides"
            )


def dashboard_link(client: Client) -> str | None:
    """The URL of the scheduler's HTTP server, when it has one (it may serve no dashboard: see below)."""
    try:
        if "dashboard" not in (client.scheduler_info(n_workers=0).get("services") or {}):
            return None
        return client.dashboard_link
    except Exception:
        return None


DASHBOARD_PROBE_S = 1.0


def serves_dashboard(link: str, timeout: float = DASHBOARD_PROBE_S) -> bool | None:
    """Does the HTTP server at ``link`` serve dask's dashboard? None: cannot tell.

    A scheduler runs its HTTP server (and lists it as its "dashboard" service)
    even with ``--no-dashboard`` or without bokeh, where ``/status`` only says
    "Dask needs bokeh". Its ``individual-plots.json`` (what dask-labextension
    reads) lists the dashboard's plots, and is ``{}`` when there are none.
    False also when the kernel cannot reach it: a link the user could not open.
    """
    import json
    import ssl
    import urllib.request

    head, sep, tail = link.partition("?")[0].rpartition("/status")
    if not sep or tail.strip("/"):
        return None  # a link template of the user's (a proxy): no known place to ask
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only asks which plots exist
    try:
        with urllib.request.urlopen(f"{head}/individual-plots.json", timeout=timeout, context=context) as r:
            return bool(json.loads(r.read(1 << 20) or b"{}"))
    except Exception:
        return False


# Made here, after distributed registered its exit handlers when it was imported: ours runs first.
_STARTED = ExitList()


def stop_at_exit(backend: Any) -> None:
    """Shut ``backend`` down at interpreter exit, before dask's own exit handlers.

    Those were registered when distributed was imported, before this module
    (atexit runs handlers last-in first-out). They would close a LocalCluster
    politely, waiting up to 10 s for a worker stuck in a task; ours kills its
    worker processes first.
    """
    _STARTED.add(backend)


def forget_at_exit(backend: Any) -> None:
    _STARTED.discard(backend)
