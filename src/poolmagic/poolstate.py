"""A pool's state apart from its workers: whether it takes work, the maps it runs, its last map.

``PoolState`` is one of the objects ``poolmagic.Pool`` is made of (api.py):
multiprocessing's RUN, then CLOSE or TERMINATE; whether it is the shared pool
(the magics' and pmap's, which user code may not close); the maps not finished
yet, which ``join`` waits for and ``terminate`` ends; and the last map, for
``_poolmap`` and ``--tune``.
"""
from __future__ import annotations

import functools
import threading
import time
import weakref
from typing import Any, Callable

from .engine.core.events import MapFinished
from .engine.core.job import Job
from .errors import BadInputError, PoolmapError
from .mpcompat import CLOSE, RUN, check_running


class PoolState:
    """RUN/CLOSE/TERMINATE, shared or not, the maps running, the last map."""

    def __init__(self) -> None:
        self.state = RUN  # multiprocessing's: RUN, then CLOSE or TERMINATE (then work is refused)
        self.shared = False  # the magics' and pmap's pool (get_pool): user code may not close it
        self._live: set[Job] = set()  # maps not finished yet (join waits for them)
        self._live_lock = threading.Lock()
        self._last: tuple = (None, None)  # (report, job), or weak references to them (see last)
        self._idle: Callable[[], None] | None = None  # after close: what stops the workers once no map runs
        self._stopped: threading.Event | None = None  # set once it ran (join waits for it)

    # ------------------------------------------------------------ taking work
    def check_running(self) -> None:
        """PoolNotRunningError (a ValueError, as multiprocessing's) once closed or terminated."""
        check_running(self.state)

    def not_shared(self, what: str) -> None:
        """Refuse ``what`` on the shared pool: the magics and pmap rely on it."""
        if self.shared:
            raise BadInputError(
                f"this is poolmagic's shared pool (the magics' and pmap's): it cannot {what}. Stop it with "
                f"poolmagic.shutdown_pool() (the next use starts a fresh one), or make a pool of your own: "
                f"poolmagic.Pool()"
            )

    def close(self, idle: Callable[[], None] | None = None) -> None:
        """Refuse new work (CLOSE). ``idle()`` stops the workers once no map runs: now, or
        when the last one ends (multiprocessing's workers leave once a closed pool's work is
        done: a closed pool, even dropped, kept its worker processes until the kernel exited)."""
        self.not_shared("close")
        if self.state != RUN:
            return
        self.state = CLOSE
        with self._live_lock:
            if self._live and idle is not None:
                self._idle, self._stopped = idle, threading.Event()
                return
        if idle is not None:
            idle()

    def make_shared(self) -> None:
        """This pool becomes the shared one: it keeps its last map for ``_poolmap``."""
        self.shared = True
        self._last = tuple(r() if isinstance(r, weakref.ref) else r for r in self._last)

    # ------------------------------------------------------------ the maps running
    def started(self, job: Job) -> None:
        """Count ``job`` as running until its MapFinished event."""
        with self._live_lock:
            self._live.add(job)
        job.observers.append(functools.partial(self._forget, job))

    def _forget(self, job: Job, event: Any) -> None:
        if type(event) is MapFinished:
            with self._live_lock:
                self._live.discard(job)
                idle, self._idle = (self._idle, None) if not self._live else (None, self._idle)
            if idle is not None:  # on the backend's own thread: it is stopped from another
                threading.Thread(target=self._stop_idle, args=(idle,), daemon=True, name="poolmagic-close").start()

    def _stop_idle(self, idle: Callable[[], None]) -> None:
        try:
            idle()
        finally:
            self._stopped.set()  # type: ignore[union-attr]

    def running(self) -> list[Job]:
        with self._live_lock:
            return list(self._live)

    def stop_maps(self) -> None:
        """End every map still running (one the backend had not taken up yet too), with the
        error a map the backend was running gets: "the map was cancelled" blamed the user."""
        for job in self.running():
            job.stop(PoolmapError("the pool was shut down while this map was running"))

    def wait_maps(self, timeout: float | None) -> None:
        """After close or terminate: wait up to ``timeout`` seconds for the maps running."""
        if self.state == RUN:
            raise ValueError("Pool is still running")
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.running():
            job.finished.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._stopped is not None:  # the workers stop as the last map ends: join returns after
            self._stopped.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------ the last map
    # The shared pool keeps it; a pool of your own keeps it only while you do
    # (multiprocessing keeps nothing: a long-lived pool must not hold the inputs
    # and results of its last map).
    def last(self, k: int) -> Any:
        """The last map's report (``k`` = 0) or Job (1), if still held."""
        ref = self._last[k]
        return ref() if isinstance(ref, weakref.ref) else ref

    def remember(self, k: int, value: Any) -> None:
        pair = list(self._last)
        pair[k] = value if value is None or self.shared else weakref.ref(value)
        self._last = tuple(pair)
