"""Why a map paid or did not: where the time went, and what to do about it.

Computed from a RunReport's chunk records alone (any backend writes them):

* **busy**: time inside the function, summed over workers;
* **transport**: pickling, sending and receiving, per chunk the time between
  the worker being free and starting it, plus between finishing and the
  kernel having its results;
* **idle**: the rest of workers × wall (waiting for work, or for the slowest).

The speedup it reports is honest about what it is: busy ÷ wall is the
average number of busy workers, an *estimate* of the gain over a plain loop.
Time a worker spent runnable but waiting for a CPU (more workers than cores;
measured from Linux's schedstat for items long enough to be timed) is taken
out first, or 6 workers on 2 cores would claim "≈5.5×". The estimate is still
too high when workers slow each other down in other ways (memory bandwidth,
shared caches); a *measured* figure exists only when one worker's speed on the
same function version was timed (``%poolsize --tune``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import RunReport

SMALL_ITEM_S = 100e-6
GOOD_EFFICIENCY = 0.7
BIG_RESULT = 64 << 10  # bytes per result above which moving results can be the cause


@dataclass
class Finding:
    kind: str  #: "slower", "small_items", "few_items", "straggler", "oversubscribed", "contended", "transport", "threads"
    text: str


@dataclass
class Analysis:
    wall_s: float
    busy_s: float  #: in the function, summed over workers (waiting for a CPU included)
    waited_s: float  #: of busy_s, runnable but waiting for a CPU
    transport_s: float
    idle_s: float
    workers: int
    cores: int
    speedup: float  #: estimate: busy ÷ wall
    efficiency: float  #: speedup ÷ workers used
    measured: float | None  #: against one worker's measured speed, when known
    busy_share: float = 0.0  #: busy ÷ (workers used × wall): how much of the time workers were in the function
    findings: list[Finding] = field(default_factory=list)


def transport_s(r: "RunReport") -> float:
    """Seconds chunks spent travelling, not waiting behind another chunk."""
    total = 0.0
    by_worker = defaultdict(list)
    for c in r.chunks:
        if c.t_sent and c.t_recv:
            by_worker[c.worker].append(c)
    wall = r.wall_s
    for chunks in by_worker.values():
        free = 0.0
        moving = busy = 0.0
        for c in sorted(chunks, key=lambda c: c.t0):
            moving += max(0.0, c.t0 - max(c.t_sent, free)) + max(0.0, c.t_recv - c.t1)
            busy += c.t1 - c.t0
            free = max(c.t1, c.t_recv)  # sending its results, the worker is not free yet
        # a result still on its way while the worker already runs its next chunk
        # overlaps busy time: a worker's time cannot exceed the wall
        total += min(moving, max(0.0, wall - busy))
    return total


def analyse(r: "RunReport", serial_item_s: float | None = None, threads: int | None = None) -> Analysis:
    wall = r.wall_s
    busy = r.busy_s
    waited = min(sum(min(c.waited_s, c.busy_s) for c in r.chunks), busy)
    used = max(r.workers, 1)
    moving = transport_s(r)
    idle = max(0.0, used * wall - busy - moving)
    speedup = (busy - waited) / wall
    measured = None
    n_done = sum(c.count for c in r.chunks)
    if serial_item_s and n_done:
        measured = serial_item_s * n_done / wall
    a = Analysis(wall, busy, waited, moving, idle, used, r.cores, speedup, speedup / used, measured,
                 busy_share=busy / (used * wall))
    if r.status in ("running", "cancelled") or not r.chunks:  # (cancelled: the stopped items' time is unknown)
        return a
    a.findings = _findings(r, a, n_done, threads)
    return a


def _findings(r: "RunReport", a: Analysis, n_done: int, threads: int | None) -> list[Finding]:
    out: list[Finding] = []
    gain = a.measured if a.measured is not None else a.speedup
    paid = a.efficiency >= GOOD_EFFICIENCY and gain >= 1
    if paid:
        return out
    per_item = (a.busy_s - a.waited_s) / max(n_done, 1)
    contended = a.waited_s > 0.2 * a.busy_s
    if gain < 1 and not contended:  # with CPUs contended, a loop would have waited too
        out.append(Finding(
            "slower",
            f"slower than a plain loop would have been: the items took {_s(a.busy_s)} of work in all, "
            f"the map {_s(a.wall_s)}",
        ))
    if per_item < SMALL_ITEM_S:
        out.append(Finding(
            "small_items",
            f"items take {_s(per_item)} each: overhead dominates; run it serially, vectorise, "
            f"or batch several items into one",
        ))
    total = r.items if r.items is not None else n_done
    if total < r.pool_size:
        out.append(Finding(
            "few_items",
            f"{total} item{'s' if total != 1 else ''} for {r.pool_size} workers: at most {total} can work "
            f"at once; split the work into more, smaller items",
        ))
    if n_done > 1:
        i_max, t_max = _slowest_item(r)
        if t_max >= 0.5 * a.wall_s and t_max > 3 * per_item:
            out.append(Finding(
                "straggler",
                f"item {i_max} took {_s(t_max)} of the {_s(a.wall_s)} wall (one item held the map); "
                f"split it, or start the slow items first",
            ))
    share = f"workers waited for a CPU {a.waited_s / max(a.busy_s, 1e-9):.0%} of their time"
    if a.workers > a.cores:
        out.append(Finding(
            "oversubscribed",
            f"{a.workers} workers on {a.cores} core{'s' if a.cores != 1 else ''}"
            + (f" ({share})" if a.waited_s else "")
            + f": CPU-bound work cannot run more than {a.cores}× faster; more workers only help work "
            f"that waits (I/O, sleep)",
        ))
    elif contended:
        out.append(Finding(
            "contended",
            f"{share}: other processes are using the cores; the figures above count only the time "
            f"workers ran",
        ))
    share = a.transport_s / max(a.workers * a.wall_s, 1e-9)
    nbytes = sum(c.nbytes for c in r.chunks) / max(n_done, 1)
    if share > 0.3 and nbytes >= BIG_RESULT:
        out.append(Finding(
            "transport",
            f"moving items and results took {share:.0%} of the workers' time (each result is "
            f"~{_bytes(nbytes)}); return less, or write big results to files",
        ))
    if threads and threads > 1 and a.workers * threads > a.cores:
        out.append(Finding(
            "threads",
            f"each worker may run {threads} native threads (BLAS, OpenMP): {a.workers * threads} threads "
            f"on {a.cores} cores; try --threads 1",
        ))
    return out


def _slowest_item(r: "RunReport") -> tuple[int, float]:
    """(index, seconds) of the slowest item, from the chunks (per-item times where measured)."""
    best, t_best = 0, -1.0
    for c in r.chunks:
        if c.item_times:
            k = max(range(len(c.item_times)), key=c.item_times.__getitem__)
            i, t = c.start + k, c.item_times[k]
        else:
            i, t = c.start, c.busy_s / max(c.count, 1)
        if c.waited_s and c.busy_s > 0:  # an item that waited for a CPU was not slow itself
            t *= max(0.0, 1 - c.waited_s / c.busy_s)
        if t > t_best:
            best, t_best = i, t
    return best, t_best


def _s(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GB"
