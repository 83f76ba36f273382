"""Growing and shrinking the dask LocalCluster that poolmagic owns, without losing a chunk.

Our LocalCluster runs the pool's size, more while a map asks for more (``-n
N``, as the local pool starts extra workers), and shrinks back after. Two
things dask does by itself lost work (issue 22):

* ``cluster.scale(n)`` retires the newest workers, whatever they run. A map
  that started meanwhile had sent a chunk to one of them (a worker still in
  the list is usable): the worker closed under it and its item failed with
  WorkerCrashedError, exit code 0 (1 map in 60). Here the workers to retire
  are chosen first, get no new chunk (``retiring``), and are retired only
  once they hold none.
* A SpecCluster forgets a worker that is absent from the scheduler when its
  ``lost-worker-timeout`` (15 s) after a removal ends, closing its nanny for
  good. After a few kills (--timeout, a crash, an interrupt) a worker was
  often absent again at that moment, restarting: after about six, the cluster
  had no nanny left and the next map waited for ever. ``PoolCluster`` keeps
  its nannies (they restart their workers), and ``fit`` starts any nanny of
  the cluster's spec that is missing all the same.

Scaling takes a second: a thread of its own applies the requests, in order,
and the maps go on meanwhile with the workers there are.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from distributed import LocalCluster
from distributed.deploy.cluster import Cluster

REPAIR_EVERY_S = 1.0  # how often a cluster missing a nanny of its spec is told to start it


class PoolCluster(LocalCluster):
    """A LocalCluster that never gives up on a worker its nanny restarts (see the module docstring)."""

    def _update_worker_status(self, op: str, msg: Any) -> None:
        Cluster._update_worker_status(self, op, msg)  # (not SpecCluster's: no lost-worker timer)


class Scaler:
    """Fits our LocalCluster to the size wanted; chosen workers are retired once idle.

    ``fit`` and ``gone`` run on the manager thread; the requests they make
    run on a thread of their own, one at a time.
    """

    def __init__(self, cluster: LocalCluster, wake: Callable[[], None]) -> None:
        """``wake``: called when a request has been applied (the manager thread looks again)."""
        self.cluster = cluster
        self.wake = wake
        # spec names chosen to go: their workers get no new chunk. By name, not address: a
        # worker still starting has none yet, and one that registers after its name was
        # dropped from the spec is closed as soon as its nanny's start ends.
        self.retiring: set[Any] = set()
        # of those, the names a drop was asked for: never kept after all (the drop may run
        # any moment on the scaling thread: a chunk sent meanwhile would die with the worker)
        self.dropping: set[Any] = set()
        self._names: dict[str, Any] = {}  # worker address -> its spec name, as seen
        self._todo: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._busy = False
        self._repaired = 0.0
        self.closed = False

    def is_retiring(self, address: str) -> bool:
        """The worker at ``address`` is (or will be) retired: it gets no new chunk."""
        name = self._names.get(address)
        if name is None:
            info = self.cluster.scheduler_info.get("workers", {}).get(address)
            if info is None:
                return False
            name = self._names[address] = info.get("name")
        return name in self.retiring

    def fit(self, want: int, holds: Callable[[str], bool]) -> None:
        """Ask for ``want`` workers; ``holds(address)``: a chunk of ours is on that worker."""
        cluster = self.cluster
        spec = list(cluster.worker_spec)
        address_of = {w.get("name"): a for a, w in dict(cluster.scheduler_info.get("workers", {})).items()}
        for name, address in address_of.items():
            self._names[address] = name  # known after the worker has left too
        live = [n for n in spec if n not in self.dropping]  # (the others go, whatever is asked)
        if want >= len(live):
            self.retiring -= set(live)  # chosen, not yet dropped: kept after all
        if want > len(live):
            if not self._busy:  # (busy: looked at again once the thread has applied it)
                self._ask(lambda: cluster.scale(want))
            return
        if want < len(live):
            chosen = [n for n in reversed(live) if n in self.retiring]
            chosen += [n for n in reversed(live) if n not in chosen][: len(live) - want - len(chosen)]
            self.retiring.update(chosen)
            idle = [n for n in chosen if address_of.get(n) is None or not holds(address_of[n])]
            if idle and not self._busy:
                self.dropping.update(idle)
                self._ask(lambda: self._drop(idle))
            return
        if set(spec) - set(cluster.workers) and not self._busy:  # a nanny missing: start it again
            now = time.monotonic()
            if now - self._repaired >= REPAIR_EVERY_S:
                self._repaired = now
                self._ask(lambda: cluster.scale(len(cluster.worker_spec)))

    def gone(self, address: str) -> None:
        """The worker at ``address`` left the cluster."""
        self._names.pop(address, None)

    def _drop(self, names: list) -> None:
        for name in names:
            self.cluster.worker_spec.pop(name, None)
        self.cluster.scale(len(self.cluster.worker_spec))  # closes the nannies left out of the spec

    def _ask(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._todo.append(fn)
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._run, daemon=True, name="poolmagic-dask-scale").start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._todo or self.closed:
                    self._todo.clear()
                    self._busy = False
                    break
                fn = self._todo.pop(0)
            try:
                fn()
            except Exception:
                pass
        self.wake()
