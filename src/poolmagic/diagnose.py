"""Why a map paid or did not: where the time went, and what to do about it.

Computed from a RunReport's chunk records alone (any backend writes them):

* **busy**: time inside the function, summed over workers;
* **transport**: pickling, sending and receiving, per chunk the time between
  the worker being free and starting it, plus between finishing and the
  kernel having its results;
* **idle**: the rest of workers × wall (waiting for work, or for the slowest).

**Speedup** has one definition, used by the summary, ``_poolmap.speedup`` and
``--tune``: what a user would measure, the serial time of the items ÷ the
map's wall time. The serial time is estimated from the time each chunk spent
in the function in its worker, less the time it was runnable but waiting for
a CPU (Linux schedstat), at the share of a CPU a loop would have had: all of
one when the workers only waited for each other (6 workers on 2 cores do not
claim "≈5.5×"), the share the workers had together (at most one CPU) when
other processes held the cores. Two corrections are said rather than hidden:

* native threads: workers run BLAS/OpenMP with ``cores ÷ workers`` threads
  each; a loop in the kernel could use all the cores' threads. When the
  function uses a package with such thread pools (numpy, scipy, torch...) and
  the kernel's loop would have more threads, the gain is a range: from
  "numpy's threads would not have helped a loop" down to "they would have,
  fully" (``speedup`` is the low end: it never claims more than is sure);
* contention: when a loop would have had less than 80 % of a CPU, other
  processes held the cores: the figure is flagged ``contended``.

A figure above the number of cores for work that ran on a CPU (per-chunk CPU
time, measured in the worker) is impossible: the estimate failed, and the
card says so instead of showing it.
"""
from __future__ import annotations

import functools
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import RunReport

SMALL_ITEM_S = 100e-6
GOOD_EFFICIENCY = 0.7
BIG_RESULT = 64 << 10  # bytes per result above which moving results can be the cause
CONTENDED = 0.2  # share of the function's time spent waiting for a CPU that flags the host as contended
CPU_BOUND = 0.5  # CPU time ÷ running time above which work is CPU-bound (it cannot gain more than the cores)
FINDINGS_ABOVE_S = 0.1  # maps shorter than this get no findings unless asked: nothing there to act on
# packages whose native code runs its own thread pools (BLAS, OpenMP, intra-op threads)
NATIVE_THREADED = frozenset({"numpy", "scipy", "sklearn", "torch", "numexpr", "cv2", "jax", "tensorflow",
                             "xgboost", "lightgbm", "numba", "faiss", "polars"})


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
    speedup: float  #: serial time of the items ÷ wall (the low end of the range); nan when the estimate failed
    efficiency: float  #: speedup ÷ workers used
    measured: float | None = None  #: kept for compatibility: always None (one definition of speedup)
    busy_share: float = 0.0  #: busy ÷ (workers used × wall): how much of the time workers were in the function
    findings: list[Finding] = field(default_factory=list)
    serial_s: float = 0.0  #: estimated time a plain loop would take (one native thread per worker's share)
    speedup_high: float = 0.0  #: the high end when native threads make the gain a range, else = speedup
    cpu_s: float | None = None  #: CPU time the workers used (native threads included), when measured
    cpu_bound: bool | None = None  #: CPU time ≥ half the running time (None: not measured)
    contended: bool = False  #: other processes held the cores: a loop would have had < 80 % of a CPU
    loop_share: float = 1.0  #: the share of a CPU a loop would have had while the map ran
    failed: str | None = None  #: why no speedup can be given (the estimate is impossible)
    threads: tuple[int, int] | None = None  #: (per worker, a loop's) native threads when they make a range

    @property
    def speedup_text(self) -> str:
        """``≈1.93×``, ``≈1.00–1.97×`` (native threads), ``<0.01×``, or ``unknown``."""
        if self.failed or math.isnan(self.speedup):
            return "unknown"
        if self.speedup < 0.005:  # "≈0.00×" would read as "no speedup at all, exactly"
            return "<0.01×"
        if self.threads and self.speedup_high > self.speedup * 1.05:
            return f"≈{self.speedup:.2f}–{self.speedup_high:.2f}×"
        return f"≈{self.speedup:.2f}×"


def _t0(c: Any) -> float:
    return c.t0


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
        for c in sorted(chunks, key=_t0) if len(chunks) > 1 else chunks:
            moving += max(0.0, c.t0 - max(c.t_sent, free)) + max(0.0, c.t_recv - c.t1)
            busy += c.t1 - c.t0
            free = max(c.t1, c.t_recv)  # sending its results, the worker is not free yet
        # a result still on its way while the worker already runs its next chunk
        # overlaps busy time: a worker's time cannot exceed the wall
        total += min(moving, max(0.0, wall - busy))
    return total


def kept_results_s(r: "RunReport", serial: float) -> float:
    """What holding every result costs a loop beyond what the workers paid: page faults.

    A loop keeps all its results in one process, and touches fresh memory for them
    (a page fault each 4 KB page: ~10 ns per small int result, a fifth of the time of
    ``x * x``); a worker frees a chunk's results once they are sent and mostly reuses
    that memory. The kernel touched the memory a loop would have while it took in
    the results (``kept_faults``); the workers' own faults are already in their
    times. The difference, at the cost of a fault measured on this machine. 0 when
    not measured (not Linux; a dask or threads backend) or too small to matter.
    """
    kept = worker = 0
    for c in r.chunks:
        if c.kept_faults is None or c.faults is None:
            return 0.0
        kept += c.kept_faults
        worker += c.faults
    extra = kept - worker
    if extra < 16 or extra * 1e-7 < 0.001 * serial:  # under 0.1 % even at 0.1 µs a fault: not worth measuring
        return 0.0
    return extra * fault_cost_s()


_FAULT_COST: list[float] = []


def fault_cost_s() -> float:
    """Seconds a first touch of a fresh page costs here (measured once: 3 × 128 pages, ~1 ms)."""
    if not _FAULT_COST:
        import mmap
        import resource
        import statistics
        import time

        page = mmap.PAGESIZE
        costs = []
        for _ in range(3):
            m = mmap.mmap(-1, 128 * page)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            for i in range(0, 128 * page, page):
                m[i] = 1
            dt = time.perf_counter() - t
            n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            m.close()
            costs.append(dt / n if n > 0 else 0.0)
        _FAULT_COST.append(statistics.median(costs))
    return _FAULT_COST[0]


def analyse(r: "RunReport", serial_item_s: float | None = None, threads: int | None = None,
            all_findings: bool = False) -> Analysis:
    """Where the time of ``r`` went, its speedup (one definition, above), and findings.

    Findings are only made for maps of at least FINDINGS_ABOVE_S, unless ``all_findings``.
    """
    wall = r.wall_s
    busy = r.busy_s
    waited = min(sum(min(c.waited_s, c.busy_s) for c in r.chunks), busy)
    used = max(r.workers, 1)
    moving = transport_s(r)
    idle = max(0.0, used * wall - busy - moving)
    # What a loop here would have taken: the items' running time (in the function,
    # not waiting for a CPU) at the share of a CPU one thread would have had. The
    # workers ran ``f_w`` of their time, ``k`` of them (and the kernel moving data)
    # at once; when they waited only for each other (more workers than cores) a lone loop would have run
    # all the time; when other processes held the cores, it would have had the
    # share the workers had together, at most one CPU.
    run = busy - waited
    f_w = run / busy if busy > 0 else 1.0
    k = max(1.0, (busy + moving) / wall)  # the kernel moving items and results competes with them too
    loop_share = min(1.0, f_w * k)
    serial = run / loop_share if loop_share > 0 else busy
    serial += kept_results_s(r, serial)
    speedup = serial / wall
    timed = [c for c in r.chunks if c.cpu_s is not None]
    cpu = sum(c.cpu_s for c in timed) if timed else None
    ran = sum(max(c.busy_s - min(c.waited_s, c.busy_s), 0.0) for c in timed)
    cpu_bound = (cpu >= CPU_BOUND * ran) if cpu is not None and ran > 0 else None
    contended = loop_share < 1 - CONTENDED  # a loop would have had less than 80 % of a CPU
    a = Analysis(wall, busy, waited, moving, idle, used, r.cores, speedup, speedup / used, None,
                 busy_share=busy / (used * wall), serial_s=serial, speedup_high=speedup, cpu_s=cpu,
                 cpu_bound=cpu_bound, contended=contended, loop_share=loop_share)
    if cpu_bound and speedup > r.cores * 1.1:
        a.failed = (f"the function's times add up to {speedup:.1f}× the wall on {r.cores} "
                    f"core{'s' if r.cores != 1 else ''}, more than CPU-bound work can gain: the timing failed")
        a.speedup = a.speedup_high = a.efficiency = float("nan")
    else:
        pair = _native_threads(r, threads)
        if pair is not None:
            a.threads = pair
            a.speedup = speedup * pair[0] / pair[1]
            a.efficiency = a.speedup / used
    n_done = sum(c.count for c in r.chunks)
    if r.status in ("running", "cancelled") or not r.chunks:  # (cancelled: the stopped items' time is unknown)
        return a
    if any(isinstance(e, _STOPPED) for e in r.errors.values()):  # a killed item's time is unknown too
        return a
    if wall >= FINDINGS_ABOVE_S or all_findings:
        a.findings = _findings(r, a, n_done, threads)
    return a


def _stopped_types() -> tuple:
    from .errors import ItemTimeoutError, WorkerCrashedError, WorkerMemoryError

    return (ItemTimeoutError, WorkerCrashedError, WorkerMemoryError)


_STOPPED = _stopped_types()  # items whose worker was killed, or died, under them: no time recorded


def _native_threads(r: "RunReport", threads: int | None) -> tuple[int, int] | None:
    """(threads per worker, threads a loop here would use) when the function uses native thread
    pools and a loop would have more threads than each worker had; else None."""
    per_worker = threads or 1
    loop = r.cores
    if per_worker >= loop or r.replay is None:
        return None
    func = r.replay[0]
    if not _uses_native_threads(func):
        return None
    return per_worker, loop


def _uses_native_threads(func: Any, depth: int = 0) -> bool:
    """Does ``func``'s code name a module (or a function of one) from a natively threaded package?"""
    func = getattr(func, "__wrapped__", func)
    if isinstance(func, functools.partial):
        func = func.func
    code = getattr(func, "__code__", None)
    g = getattr(func, "__globals__", None)
    if code is None or g is None:
        mod = getattr(func, "__module__", None) or ""
        return mod.split(".")[0] in NATIVE_THREADED
    names: set[str] = set()
    stack = [code]
    while stack:
        co = stack.pop()
        names.update(co.co_names)
        stack.extend(c for c in co.co_consts if hasattr(c, "co_names"))
    if any(n.split(".")[0] in NATIVE_THREADED for n in names):  # ``import numpy`` inside the function
        return True
    for name in names:
        v = g.get(name)
        if v is None:
            continue
        mod = v.__name__ if isinstance(v, type(sys)) else getattr(v, "__module__", None)
        if isinstance(mod, str) and mod.split(".")[0] in NATIVE_THREADED:
            return True
        if depth < 2 and callable(v) and getattr(v, "__globals__", None) is g and v is not func:
            if _uses_native_threads(v, depth + 1):  # a helper defined in the same notebook
                return True
    return False


def _findings(r: "RunReport", a: Analysis, n_done: int, threads: int | None) -> list[Finding]:
    out: list[Finding] = []
    gain = a.speedup_high  # the causes below are worth naming only when even the best case did not pay
    paid = gain / a.workers >= GOOD_EFFICIENCY and gain >= 1
    if paid:
        return out
    per_item = (a.busy_s - a.waited_s) / max(n_done, 1)
    contended = a.contended
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
    big = share > 0.3 and nbytes >= BIG_RESULT
    if big:
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
    if gain < 1 and not contended and not out:  # the headline says "slower"; say why only if nothing else does
        out.append(Finding(
            "slower",
            f"slower than a plain loop would have been: the items took {_s(a.serial_s)} of work in all, "
            f"the map {_s(a.wall_s)}",
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
