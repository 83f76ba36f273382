"""What a backend must do to move chunks on its substrate: the transport protocol.

How data flows, for any backend::

    caller thread                 backend thread (the manager)                 transport's workers
    ─────────────                 ────────────────────────────                 ───────────────────
    Pool.run(f, items)
      backend.submit(Job) ──────► job joins the running maps
                                  transport.start_workers(want)  ──────────►  processes, threads,
                                                                              cluster workers
                                  for each worker with capacity():
                                    schedule.RoundRobin.pick(maps)
                                    job.chunk_size() / next_items()
                                    transport.send(worker, Chunk) ─────────►  core.chunk.run_chunk:
                                                                              items, print(), errors,
                                                                              times, seeds
                                  transport.events(timeout)      ◄──────────  a reply, a death
                                    a reply:  job.chunk_done(...)
                                    failed:   FailurePolicy.chunk_failed
                                    a death:  FailurePolicy.worker_lost,
                                              give_back (what it held
                                              behind), stop_worker,
                                              start_workers (its replacement)
                                    a deadline: FailurePolicy.worker_lost
                                              (ItemTimeoutError)
      job.wait() ◄── notify ───── job ends: FailurePolicy.ended → abandon
      (core/caller.py: feeds a      (the transport stops what still runs
       stream, prints output in      the map's items)
       item order)
    KeyboardInterrupt
      backend.cancel(job) ──────► FailurePolicy.cancel: job.stop, abandon

The core (this package) owns everything above the arrows that every backend
does the same way: the Job and its record, chunk sizes, the window, the turn
of maps, the failure policy and the events. A transport owns only what moves
chunks on its substrate and what it can tell about its workers. A backend
(base.Backend) is a transport plus the manager that drives it; what it
cannot do it declares in ``lacks`` (the capabilities below), and the API
refuses an option that needs one with the words of CAPABILITIES.

Adding a backend: a Backend subclass (its transport and manager, on this
core) and one ``backends.register(name, factory, extra)`` line. Adding a
per-item option: a field of MapOptions and its use in ``core.runchunk``.
"""
from __future__ import annotations

from typing import Hashable, Protocol, Sequence, TypeVar, runtime_checkable

from .inflight import Chunk

# What a backend may be unable to do (Backend.lacks), and what that means for a map.
KILL_ON_TIMEOUT = "kill-on-timeout"
KILL_ON_INTERRUPT = "kill-on-interrupt"
CRASH_ISOLATION = "crash-isolation"
MEMORY_LIMIT = "memory-limit"
NATIVE_THREAD_LIMIT = "native-thread-limit"
WORKER_SETUP = "worker-setup"
OWN_PROCESS = "own-process"
CAPABILITIES = {
    KILL_ON_TIMEOUT: "stop an item that runs past --timeout (it runs on; its result is dropped)",
    KILL_ON_INTERRUPT: "stop a running item on an interrupt or cancel (it runs on to its end; a result it gives then is kept)",
    CRASH_ISOLATION: "survive an item that crashes its worker (the crash takes the kernel down)",
    MEMORY_LIMIT: "read a worker's memory: --max-memory",
    NATIVE_THREAD_LIMIT: "limit a worker's native thread pools (BLAS, OpenMP): --threads",
    WORKER_SETUP: "set a worker up or retire it: initializer=, maxtasksperchild=",
    OWN_PROCESS: "run items in a process of their own (what an item changes stays in the kernel)",
}

W = TypeVar("W", bound=Hashable)  # a worker as the transport knows it (a handle, an address)


@runtime_checkable
class Transport(Protocol[W]):
    """Moves chunks to workers and tells what happened to them. Called from the manager thread only
    (or under the manager's lock: the local backend's caller sends into an idle pool itself).

    A transport decides nothing about maps: which chunk goes where, when a
    map fails and what a lost worker's items become are the core's.
    """

    #: capabilities it does not have (KILL_ON_TIMEOUT, ...): see CAPABILITIES
    lacks: frozenset[str]

    def start_workers(self) -> None:
        """Start the workers that are wanted and missing (replacements too); stop extra idle ones."""

    def stop_workers(self) -> None:
        """Stop every worker now (shutdown, or an internal error: start over)."""

    def capacity(self) -> Sequence[W]:
        """The workers that can take a chunk now, least loaded first (room in their window)."""

    def send(self, worker: W, chunk: Chunk) -> bool:
        """Send ``chunk`` to ``worker``; False if its items cannot be pickled (nothing was
        sent: the core's policy answers it, FailurePolicy.unsendable)."""

    def events(self, timeout: float | None) -> Sequence[tuple[str, W]]:
        """Wait up to ``timeout`` s for something from the workers: (what, worker) pairs."""

    def stop_worker(self, worker: W) -> None:
        """Stop ``worker`` now (a timeout, a memory stop, an abandoned map); a new one
        takes its place at the next ``start_workers``."""

    def status(self) -> str:
        """One line for ``%poolsize``: what runs where."""
