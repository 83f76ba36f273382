"""The local backend's public face: LocalBackend, built from its parts by composition.

See the package's docstring (``engine/local/__init__.py``) for how data flows.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

from ... import moduleedits  # (light: what it compares with is imported when a file was edited)

from ...cores import available_cores
from ...errors import NestedPoolError, PoolmapError
from ..core.runchunk import in_worker
from ..base import Backend
from ..core.job import Job
from ..core.schedule import WINDOW, workers_for
from ..processes import default_start_method, forkserver_preload, install_main_guard, stop_at_exit
from .manager import Manager
from .workers import WorkerSet


class LocalBackend(Backend):
    """Worker processes on this machine, supervised by a manager thread.

    It holds three parts: the worker set (the transport: processes, pipes,
    sentinels; workers.py), the manager (the loop and the running maps;
    manager.py) and the outcomes (what replies, deaths and deadlines do;
    outcomes.py). Its own methods are the Backend interface; all of theirs
    but these run on the manager thread.
    """

    name = "local"

    def __init__(self, size: int, start_method: str | None = None):
        if start_method is not None:
            _check_start_method(start_method)
        self.start_method = start_method or default_start_method()
        self.ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            self.ctx.set_forkserver_preload(forkserver_preload())
        self.description = f"local processes ({self.start_method})"
        install_main_guard()
        jobs: list[Job] = []
        self.workers = WorkerSet(self.ctx, self.start_method, max(1, int(size)), available_cores(), jobs,
                                 self, lambda: self.manager.forget_finished_jobs())
        self.manager = Manager(self.workers, jobs)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def size(self) -> int:
        return self.workers.size

    def start(self) -> None:
        if in_worker():
            raise NestedPoolError(
                "poolmagic cannot start a pool inside one of its own workers: the outer map "
                "already uses the cores. Call the function directly (or in a plain loop) here, "
                "or map the inner work and not the outer one."
            )
        with self._lock:
            if self._closed:
                raise PoolmapError("this pool has been shut down")
            if self._thread is None:
                stop_at_exit(self)
                self._thread = threading.Thread(target=self.manager.main, name="poolmagic-manager", daemon=True)
                self._thread.start()

    def prepare_function(self, func: Any, items: Any, star: bool) -> tuple[Any, list[str]]:
        """Refuse a map that would use a local module edited since the kernel imported it.

        The workers import such a module from its file (a worker that imported
        it before is replaced once the file changes), while a loop here runs
        the kernel's copy.
        """
        names = self.workers.edited_modules(moduleedits.STARTED - 2.0) if self.workers.procs else ()
        if names:
            moduleedits.refuse_behind_if_used(names, func, items)
        moduleedits.refuse_set_in_notebook(func)
        return func, []

    def submit(self, job: Job) -> None:
        self.start()
        job.abort = lambda exc: self.cancel(job, exc, wait=0)
        job.source.on_items = self.workers.waiter.wake
        job.source.set_want(workers_for(job, self.workers.size) * WINDOW)
        if not self.manager.add_direct(job):  # sent from here when the workers are warm
            self.manager.command(lambda: self.manager.add(job))

    def cancel(self, job: Job, error: BaseException | None = None, wait: float = 1.0) -> None:
        self.manager.policy.cancel(self.manager.command, job, error, wait)

    def resize(self, n: int) -> None:
        self.workers.size = max(1, int(n))
        if self._thread is not None:
            self.manager.command(lambda: None)

    @property
    def state(self) -> str:
        if self.worker_pids():
            return "warm"
        return "starting" if self._thread is not None and not self._closed else "cold"

    def disown(self) -> None:
        """In a child made by a bare ``os.fork()``: the workers are the parent's.

        Such a child inherits multiprocessing's list of children, and its exit
        handler would terminate every daemon on it, ours included (a
        ``multiprocessing`` child resets that list itself). Closed, the pool
        refuses maps there and its shutdown touches nothing.
        """
        from multiprocessing import process

        self._closed = True
        for p in self.workers.procs.values():
            process._children.discard(p.proc)  # type: ignore[attr-defined]

    def worker_pids(self) -> list[int]:
        return self.workers.pids()

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.manager.closed = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self.manager.command(lambda: None)
            thread.join(5)
        self.manager.stop()


def _check_start_method(method: str) -> None:
    """Refuse a start method poolmagic does not use here, as POOLMAGIC_START_METHOD is refused."""
    allowed = [m for m in ("forkserver", "spawn") if m in mp.get_all_start_methods()]
    if method in allowed:
        return
    from ...errors import BadInputError

    why = (" ('fork' would fork this multi-threaded process: a lock held by another thread "
           "stays locked in the child forever)" if method == "fork"
           else " (not on this platform)" if method == "forkserver" else "")
    raise BadInputError(f"start_method={method!r} is not allowed{why}; poolmagic's start methods here are "
                        f"{' and '.join(repr(m) for m in allowed)}")
