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
* dask starts a new worker under the name of one it dropped, and asked while
  that one still closes, the name's return cancels the close: the old worker
  stayed for good, idle. ``PoolCluster`` never gives a name twice, and a
  retired worker is told by its process (``state.incarnation``), not by name
  or address (the OS gives a dead worker's port to a new one).
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

from .state import incarnation

REPAIR_EVERY_S = 1.0  # how often a cluster missing a nanny of its spec is told to start it


class PoolCluster(LocalCluster):
    """A LocalCluster that never gives up on a worker its nanny restarts (see the module docstring)."""

    def _update_worker_status(self, op: str, msg: Any) -> None:
        Cluster._update_worker_status(self, op, msg)  # (not SpecCluster's: no lost-worker timer)

    def new_worker_spec(self) -> dict:
        """A name never used before. dask's own gives a dropped worker's name to the next one;
        asked for while the dropped worker was still closing, that cancelled its close, and the
        worker stayed for good, retired and idle."""
        spec = super().new_worker_spec()
        self._i += 1
        return spec


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
        # the incarnations (state.incarnation) of the workers whose drop was applied: dask
        # gives a dropped name to the next worker it starts, and the OS its port
        self.retired: set[str] = set()
        self._seen: dict[str, tuple[Any, Any]] = {}  # worker address -> (spec name, incarnation), as seen
        self._todo: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._busy = False
        self._repaired = 0.0
        self.closed = False

    def _workers(self) -> dict[str, tuple[Any, Any]]:
        """address -> (spec name, incarnation) of the workers the scheduler lists now (and remembered)."""
        now = {a: (w.get("name"), incarnation(w)) for a, w in dict(self.cluster.scheduler_info.get("workers", {})).items()}
        self._seen.update(now)
        return now

    def is_retiring(self, address: str) -> bool:
        """The worker at ``address`` is (or will be) retired: it gets no new chunk."""
        w = self.cluster.scheduler_info.get("workers", {}).get(address)
        if w is not None:
            self._seen[address] = (w.get("name"), incarnation(w))
        seen = self._seen.get(address)  # (after it left too: its removal is not its chunk's fault)
        if seen is None:
            return False
        name, wid = seen
        return wid in self.retired or name in self.retiring

    def closed_by_us(self, address: str) -> bool:
        """The worker at ``address`` was closed by a drop (its removal is no chunk's fault). A
        worker only chosen to retire still runs what it holds, and may crash on its own."""
        self.is_retiring(address)  # (reads what the scheduler lists of it)
        seen = self._seen.get(address)
        return seen is not None and seen[1] in self.retired

    def fit(self, want: int, holds: Callable[[str], bool]) -> None:
        """Ask for ``want`` workers; ``holds(address)``: a chunk of ours is on that worker."""
        cluster = self.cluster
        spec = list(cluster.worker_spec)
        address_of = {name: a for a, (name, wid) in self._workers().items() if wid not in self.retired}
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
        self._seen.pop(address, None)

    def _drop(self, names: list) -> None:
        """Close the workers of ``names`` (on the scaling thread)."""
        for address, (name, wid) in self._workers().items():
            if name in names:
                self.retired.add(wid)
        for name in names:
            self.cluster.worker_spec.pop(name, None)
        # closes the nannies left out of the spec. Their names stay retiring: a worker of theirs
        # still starting registers later, and is closed as soon as it has (PoolCluster never
        # gives the name to another worker)
        self.cluster.scale(len(self.cluster.worker_spec))

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
