"""Our LocalCluster's private folder, and the marks its workers write there of the chunk they run.

A worker of a LocalCluster we own writes down which chunk it runs and which
one ended last (task._mark), so that a worker that dies can be told to have
died running a chunk or between two. Reading a mark is a file read, no round
trip to the cluster.
"""
from __future__ import annotations

import os

from .. import runtimedir
from . import task


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


def read_marks(folder: str | None, address: str) -> tuple[int | None, int | None]:
    """(the chunk running, the last chunk that ended) as our worker at ``address`` wrote
    them down in ``folder``; None where unknown (not our cluster, or nothing written)."""
    if folder is None:
        return None, None
    try:
        with open(os.path.join(folder, task.mark_name(address)), "rb") as f:
            lines = f.read().split()
    except OSError:
        return None, None
    try:
        running = int(lines[0]) if lines else -1
        ended = int(lines[1]) if len(lines) > 1 else None
    except ValueError:
        return None, None
    return running, ended
