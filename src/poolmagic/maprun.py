"""A prepared map started on a pool's backend, and waited for on the caller's thread.

``start`` hands the Job to its observers (the caller's display, a handle, the
pool's count of running maps, the checkpoint, the items' identities) and then
to the backend. ``wait_for`` is ``Pool.run``'s, ``pmap``'s and ``%%poolmap``'s
wait: while it waits, the workers' print() output is written in item order, a
stream ITERABLE is fed and a live display ticks; Ctrl-C stops the running
items and keeps the results that finished. Before returning, the checkpoint
holds every finished result (``finish_checkpoint``, also a handle's last step).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .engine.base import Backend
from .engine.core.transport import KILL_ON_INTERRUPT, OWN_PROCESS
from .engine.core.job import Job, write_outputs
from .errors import add_note, point_at_function
from .seenitems import SeenItems
from .report import RunReport

if TYPE_CHECKING:
    from .poolstate import PoolState


def start(job: Job, backend: Backend, life: "PoolState", watch: Any = None,
          before: Callable[[Job], None] | None = None, remember: bool = True) -> None:
    """Remember ``job`` as the pool's last map (``_poolmap``, ``--tune``), attach its
    observers (``watch``, then ``before``), and submit it."""
    if remember:
        life.remember(0, job.report)
        life.remember(1, job)
    if watch is not None:
        watch.attach(job)
    if before is not None:
        before(job)
    life.started(job)
    if job.checkpoint is not None:  # attached as the map starts: a job only prepared holds no file
        job.checkpoint.attach(job)
    if getattr(job.report.results, "keeps", True):  # imap's keeps no result: nothing to resume
        SeenItems(job)  # the items' identities, for a later --resume (a stream's: 8 bytes an item)
    backend.submit(job)


def wait_for(job: Job, backend: Backend, watch: Any = None) -> RunReport:
    """Wait for ``job`` and return its report, or raise its error.

    On failure the error carries ``.poolmap_report`` (results that finished
    stay). ``watch``: a live display, ticked here and closed at the end.
    """
    __tracebackhide__ = True
    try:
        job.wait(on_output=write_outputs, on_tick=watch.tick if watch is not None else None)
    except BaseException as exc:  # KeyboardInterrupt while waiting or reading the ITERABLE
        backend.cancel(job)
        write_outputs(job.take_printable(final=True))
        finish_checkpoint(job)
        if watch is not None:
            watch.close()
        if not isinstance(exc, KeyboardInterrupt):
            raise
        r = job.report
        stop = KeyboardInterrupt()
        if KILL_ON_INTERRUPT not in backend.lacks:
            running = "the running items were stopped"
        elif OWN_PROCESS in backend.lacks:
            running = "items already running finish in the background (a thread cannot be stopped)"
        else:  # a remote dask cluster: its lacks say why
            running = f"the running items were not stopped ({backend.lacks[KILL_ON_INTERRUPT]})"
        add_note(
            stop,
            f"poolmagic: interrupted; {running} and {r.done} of "
            f"{r.items if r.items is not None else '?'} results kept (_poolmap.results).",
        )
        stop.poolmap_report = r  # type: ignore[attr-defined]
        raise point_at_function(stop, job.func) from None
    if watch is not None:
        watch.close()
    finish_checkpoint(job)
    if job.error is not None:
        raise job.error
    return job.report


def finish_checkpoint(job: Job) -> None:
    """Return only once the checkpoint holds every finished result."""
    if isinstance(job.report.identity, SeenItems):
        job.report.identity.settle()
    ck = getattr(job, "checkpoint", None)
    if ck is not None:
        err = ck.wait()
        if err is not None:
            job.report.notes.append(f"the checkpoint {ck.path} could not be written: {err}")
