"""Run by each worker process of a LocalCluster that poolmagic starts (dask's worker preload).

Jupyter interrupts a kernel by sending SIGINT to its whole process group,
and a terminal's Ctrl-C reaches its foreground group: a dask worker there
would get a KeyboardInterrupt in the middle of an item, or die. poolmagic
decides what an interrupt stops (it cancels the map's tasks and kills the
workers running them), so a worker leads a process group of its own, and a
SIGINT that still reaches it does nothing. (A handler that does nothing, not
SIG_IGN: processes the function starts get the default SIGINT back on exec.)
A worker still exits with its kernel: dask's nanny pipe tells it. A worker
forked by our server (forkserver.py) also lets go of the server's "alive"
pipe and dies with the server, which outlives the kernel by no more than its
exit hook: killing each worker's process group, with whatever the mapped
function started.

Heavy modules the kernel had imported when it started the cluster (numpy,
pandas: ``WARM_ENV``) are imported here, before the worker takes tasks, as
the local backend's forkserver preloads them: otherwise the first map over a
numpy global waits for numpy's import in every worker.
"""
from __future__ import annotations

import os
import signal
from typing import Any

from ..core.childprocess import die_with_parent, notebook_builtins, release_forkserver_pipe

WARM_ENV = "POOLMAGIC_DASK_WARM"  # comma-separated module names


# dask batches each stream's messages, holding one for up to 10 ms (client to
# scheduler), 5 ms (scheduler to worker) or 2 ms after the one before: a 2-item
# map took 19.7 ms, 15 of them in those waits. With no wait, messages still go
# together while a write is under way: 5.5 ms. (Our LocalCluster's streams, and
# our client's to any scheduler.)
STREAM_INTERVAL_S = 0.0


def unbatch(stream: Any) -> None:
    """Let a dask BatchedSend write at once (see STREAM_INTERVAL_S)."""
    if stream is not None and hasattr(stream, "interval"):
        stream.interval = STREAM_INTERVAL_S


def dask_setup(worker: Any) -> None:
    unbatch(getattr(worker, "batched_stream", None))  # "a chunk ended" goes at once
    close_http(worker)
    for name in filter(None, os.environ.get(WARM_ENV, "").split(",")):
        try:
            __import__(name)
        except Exception:
            pass
    if hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    if release_forkserver_pipe():  # forked by our server (forkserver.py): die with it
        die_with_parent()
    notebook_builtins()
    try:
        signal.signal(signal.SIGINT, _ignore)
    except ValueError:  # not the main thread
        return
    if hasattr(signal, "pthread_sigmask"):  # blocked by the server that forked us
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def close_http(worker: Any) -> None:
    """Stop the worker's HTTP server: it serves nothing we need (metrics, health),
    and listens without authentication while everything else needs the cluster's
    certificate. (dask starts it whatever its routes.)"""
    server = getattr(worker, "http_server", None)
    if server is not None:
        try:
            server.stop()
        except Exception:
            pass
    getattr(worker, "services", {}).pop("dashboard", None)


def _ignore(signum: int, frame: object) -> None:
    pass
