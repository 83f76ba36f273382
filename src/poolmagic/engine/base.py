"""The interface every backend implements: run Jobs on some set of workers.

A backend owns only what differs between backends: how workers start, how a
chunk reaches one and comes back, how a worker is stopped. What every backend
must do the same way (chunk sizing, results in order, errors by index, item
feeding, events) lives in the Job (job.py), above this interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..errors import BadInputError
from .core.job import Job
from .core.transport import CAPABILITIES, KILL_ON_TIMEOUT, MEMORY_LIMIT, NATIVE_THREAD_LIMIT

# map option -> (its flag, the capability it needs: see core/transport.py CAPABILITIES)
OPTION_NEEDS = {"timeout": ("--timeout", KILL_ON_TIMEOUT), "max_memory": ("--max-memory", MEMORY_LIMIT),
                "threads": ("--threads", NATIVE_THREAD_LIMIT)}


class Backend(ABC):
    """Runs Jobs on some set of workers. Thread-safe; never blocks the caller long.

    Callers (the API, ``%poolsize``, switching backends) use only what is
    declared here: never a backend's class name or private attributes.
    """

    #: the name it is registered under (backends.py): "local", "dask"
    name: str = "?"
    #: shown by %poolsize, e.g. "local processes (forkserver)"
    description: str = "?"
    #: what it cannot do (core/transport.py CAPABILITIES); a map needing one is refused
    lacks: frozenset[str] = frozenset()
    #: the cluster it is connected to, if any (``Pool(backend="dask", address=...)``)
    address: str | None = None
    #: whether it serves a dashboard
    dashboard: bool = False
    _closed: bool = False

    @property
    def limits_memory(self) -> bool:
        """Whether maps may set --max-memory: the workers' memory can be read from here."""
        return MEMORY_LIMIT not in self.lacks

    @property
    def closed(self) -> bool:
        """Shut down (or disowned in a forked child): it runs no more maps."""
        return self._closed

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the workers can take maps (a cluster up or connected); raise why not.

        Local workers start with the first map: nothing to wait for.
        """

    def cores(self) -> int | None:
        """The CPUs a map's workers share when they run elsewhere (a remote cluster's task
        slots), or None: this machine's, which the card counts itself."""
        return None

    def status_detail(self) -> str | None:
        """A second line for ``%poolsize`` (a cluster's scheduler, workers, dashboard), or None."""
        return None

    def check_options(self, options: Any, from_pool: frozenset = frozenset()) -> None:
        """Refuse (BadInputError, before any work) a map option this backend cannot honour.

        The reason is the backend's own when ``lacks`` maps each capability to one
        (threads, a remote dask cluster), else the words of CAPABILITIES.
        ``from_pool``: the fields the pool set, not the call (``%poolsize --max-memory``):
        the error then says how to clear them.
        """
        for field, (flag, capability) in OPTION_NEEDS.items():
            if getattr(options, field, None) is not None and capability in self.lacks:
                why = self.lacks[capability] if isinstance(self.lacks, dict) else CAPABILITIES[capability]
                fix = (f"it is the pool's setting: clear it (%poolsize {flag} off)" if field in from_pool else
                       "run this map on the local backend (%poolsize --backend local, or Pool(backend=\"local\"))")
                raise BadInputError(f"{flag} ({field}=) cannot work on the {self.name} backend: {why}. "
                                    f"Drop it, or {fix}.")

    def disown(self) -> None:
        """In a child made by a bare ``os.fork()``: the workers are the parent's; touch nothing."""
        self._closed = True

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of workers the backend aims to keep."""

    @abstractmethod
    def start(self) -> None:
        """Begin warming up workers (returns at once)."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Start running ``job``; results flow back through the job."""

    @abstractmethod
    def cancel(self, job: Job, error: BaseException | None = None, wait: float = 1.0) -> None:
        """Stop ``job`` now: kill what runs its items, keep what finished.

        Without ``error`` the job ends "cancelled" (an interrupt, ``.cancel()``);
        with one it ends "failed" with that error (its ITERABLE raised).
        """

    @abstractmethod
    def resize(self, n: int) -> None:
        """Aim for ``n`` workers from the next chunk on."""

    def prepare_function(self, func: Any, items: Any, star: bool) -> tuple[Any, list[str]]:
        """Before a map of ``func`` over ``items``: refuse what cannot work on these workers.

        Returns what to send in place of ``func`` (it may carry what the
        workers lack) and notes for the map's summary. Workers that share this
        machine's files and environment (the default) need nothing.
        """
        return func, []

    def wait_workers(self, n: int, timeout: float) -> int:
        """Wait until ``n`` workers run (after ``resize(n)``); returns how many can.

        Fewer when the workers are not ours to start (a remote cluster's).
        The local backend starts its workers with the map: nothing to wait for.
        """
        return n

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every worker and helper process; idempotent."""

    @abstractmethod
    def worker_pids(self) -> list[int]:
        """Process ids of live workers (for status and leak checks)."""

    @property
    def state(self) -> str:
        """"warm" (workers up), "starting" or "cold" (nothing started yet)."""
        return "warm" if self.worker_pids() else "cold"
