"""The failure policy: what a failed chunk, a lost worker or a cancel does to a map.

The same on every backend, so it is written once here and each backend holds
a ``FailurePolicy`` built with the one thing that differs: how to stop all
the work of a map that ended (``abandon``: kill the workers running its
items, forget what is queued). Each method answers a chunk exactly once, as
the Job's contract asks (core/job.py), and abandons the map if that answer
ended it:

* a chunk whose items did not unpickle in the worker is re-run item by item
  to find the one that does not, and that item fails;
* a chunk whose context or function could not be applied fails the map;
* a worker lost while running a chunk (a crash, a timeout, a memory stop)
  fails its item, or with several items re-runs them one by one to name the
  culprit (``Job.isolate``); what it held behind that chunk goes back;
* items that cannot be pickled to be sent fail, the others of their chunk run;
* a chunk whose results do not unpickle in the kernel is re-run item by item,
  and the item whose result does not fails;
* a cancel ends the map and abandons its work, on the backend's own thread.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from ...errors import ItemPicklingError, add_note, safe_str
from .inflight import Chunk
from .job import Job


class FailurePolicy:
    """One backend's use of the failure policy; ``the_worker``, ``a_worker`` name its workers in messages."""

    def __init__(self, abandon: Callable[[Job], None], the_worker: str = "the worker",
                 a_worker: str = "a worker process"):
        self.abandon = abandon
        self.the_worker, self.a_worker = the_worker, a_worker

    def ended(self, job: Job) -> None:
        """After an answer: a map that it ended stops all its work at once."""
        if not job.active:
            self.abandon(job)

    @staticmethod
    def give_back(c: Chunk) -> None:
        """A chunk that never ran (or not through a fault of its own): back to its job, or dropped."""
        if c.cancelled or not c.job.active:
            c.job.drop_chunk()
        else:
            c.job.requeue(c.start, c.items)

    def chunk_failed(self, c: Chunk, stage: str, exc: BaseException) -> None:
        """The worker could not run ``c``: its items did not unpickle (``stage`` "decode"),
        or the map's context ("context") or function ("load") could not be applied."""
        job = c.job
        if c.cancelled or not job.active:
            job.drop_chunk()
            return
        if stage == "decode":
            if len(c.items) > 1:  # find the item that does not unpickle
                job.retry_singly(c.start, c.items)
                return
            err = ItemPicklingError(f"{c.describe()} could not be unpickled in {self.the_worker}: "
                                    f"{type(exc).__name__}: {safe_str(exc)}")
            err.__cause__ = exc
            job.items_failed(c.indices, err, c.items, c.start)
        else:
            what = ("the kernel's working directory or environment could not be applied"
                    if stage == "context" else "the function could not be loaded")
            add_note(exc, f"poolmagic: {what} in {self.a_worker}.")
            job.drop_chunk()
            job.fail(exc)
        self.ended(job)

    @staticmethod
    def results_undecodable(c: Chunk, exc: BaseException) -> None:
        """The results of ``c`` came back but do not unpickle in the kernel. Several items
        run again one by one, so that the error names the item whose result it is and the
        chunk's others keep theirs; one item fails with ``ItemPicklingError``."""
        job = c.job
        if len(c.items) > 1:
            job.retry_singly(c.start, c.items)
            return
        err = ItemPicklingError(f"the results of {c.describe()} could not be unpickled in the kernel: {exc}")
        err.__cause__ = exc
        job.items_failed(c.indices, err, c.items, c.start)

    def worker_lost(self, c: Chunk, kind: type, what: str, error: Callable[[], BaseException],
                    isolate: bool = True, worker: int | None = None) -> None:
        """``c`` was running when its worker was lost (``kind``: the error class of a crash,
        timeout or memory stop). One item fails with ``error()``; several are run again one
        by one (``what`` says what happened), so that the error names the item to blame and
        the others, and failed attempts of theirs (``--retries``), are not counted. Without
        ``isolate`` (the loss is no item's doing) all of them fail. ``worker``: its slot, a
        worker that ran items though no chunk of it came back."""
        job = c.job
        if c.cancelled or not job.active:
            job.drop_chunk()
            return
        if worker is not None:
            job.ran_on(worker)
        if isolate and len(c.items) > 1:
            job.isolate(c.start, c.items, what, kind)
            return
        job.items_failed(c.indices, error(), c.items, c.start)
        self.ended(job)

    def unsendable(self, job: Job, start: int, items: Any) -> None:
        """A chunk that cannot be pickled to be sent: its bad items fail, the others run."""
        job.unsendable(start, items)
        self.ended(job)

    def cancel(self, run: Callable[[Callable[[], None]], bool], job: Job,
               error: BaseException | None, wait: float) -> None:
        """Backend.cancel: end ``job`` and abandon its work on the backend's thread.

        ``run`` hands a command to that thread and says whether it did (False:
        no thread runs, so the command runs here). Waits at most ``wait`` s.
        """
        done = threading.Event()

        def cmd() -> None:
            job.stop(error)
            self.abandon(job)
            done.set()

        if not run(cmd):
            cmd()
        elif wait:
            done.wait(wait)
