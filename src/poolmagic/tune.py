"""%poolsize --tune: measure throughput at 1, 2, 4, ... workers and keep the best.

The tutorial's advice is "benchmark to find the optimal number of processes";
this does it on the user's own function and items, within a time budget, so
that its answer can be trusted and repeated:

* every size runs with the same native-thread budget per core: ``cores ÷ n``
  BLAS/OpenMP threads per worker (one above the cores), so 1 worker with 2
  threads and 2 with 1 each compare the same use of the CPUs;
* each size is sampled SAMPLES times (the same items each time), the sizes
  in turn (1, 2, 4, 1, 2, 4, ...) so that load that comes and goes hits them
  alike; the chart shows the spread, and a larger size is chosen only when it
  *beats the noise*: its slowest sample faster than the current choice's
  fastest, by BETTER at least (``decide``, a pure function of the samples);
  CPU-bound work is never given more workers than cores (it cannot gain from
  them: a sample saying otherwise is noise);
* the verdict names what was measured, from the samples' own reports (CPU
  time per running time: CPU-bound or waiting-bound; CPU-bound work that
  does not scale: memory-bound), and when other processes held the CPUs it
  says so and keeps the pool's size instead of concluding.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import BadInputError, PoolmapError, safe_str

if TYPE_CHECKING:
    from .api import Pool

SAMPLES = 3
BETTER = 1.05  # a larger size must beat the noise, and by 5 %: workers that add nothing cost memory
MAX_SAMPLE = 1_000_000
READY_TIMEOUT_S = 60.0  # for the largest size's workers to start


@dataclass
class TuneRow:
    workers: int
    items: int  #: per sample
    walls: list[float] = field(default_factory=list)  #: seconds, one per sample
    threads: int = 1  #: native threads per worker
    speedups: list[float] = field(default_factory=list)  #: each sample's speedup (the card's definition)
    highs: list[float] = field(default_factory=list)  #: its high end (native threads make it a range)
    cpu_share: float | None = None  #: CPU time ÷ running time in the function (≈1 CPU-bound, ≈0 waiting)
    busy_samples: int = 0  #: samples that found other processes holding the CPUs

    @property
    def contended(self) -> bool:
        """Most samples found other processes holding the CPUs (one is an outlier the noise rule handles)."""
        return 2 * self.busy_samples > len(self.walls)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.walls)

    @property
    def throughput(self) -> float:
        """Median items per second over the samples."""
        return self.items / self.wall_s

    @property
    def low(self) -> float:
        return self.items / max(self.walls)

    @property
    def high(self) -> float:
        return self.items / min(self.walls)

    @property
    def speedup(self) -> float:
        ok = [s for s in self.speedups if s == s]  # (nan: that sample's estimate failed)
        return statistics.median(ok) if ok else float("nan")

    @property
    def speedup_high(self) -> float:
        ok = [s for s in self.highs if s == s]
        return statistics.median(ok) if ok else self.speedup

    @property
    def speedup_text(self) -> str:
        """The card's words for it: ``≈1.82×``, ``≈0.81–1.62×``, ``unknown``."""
        lo, hi = self.speedup, self.speedup_high
        if lo != lo:
            return "unknown"
        return f"≈{lo:.2f}–{hi:.2f}×" if hi > 1.05 * lo else f"≈{lo:.2f}×"


@dataclass
class TuneResult:
    func_name: str
    cores: int
    rows: list[TuneRow] = field(default_factory=list)
    chosen: int = 1
    reason: str = ""
    kept: bool = False  #: no conclusion (contended): the pool's size was kept

    def best(self) -> TuneRow:
        return max(self.rows, key=lambda r: r.throughput)

    def row(self, workers: int) -> TuneRow:
        return next(r for r in self.rows if r.workers == workers)

    def text(self) -> str:
        from .charts import tune_text

        return tune_text(self)

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.text())

    def _repr_html_(self) -> str:
        from .charts import tune_html

        return tune_html(self)


def candidate_sizes(cores: int) -> list[int]:
    """1, 2, 4, ... up to the cores, then one step beyond."""
    sizes = [1]
    while sizes[-1] < cores:
        sizes.append(min(sizes[-1] * 2, cores))
    sizes.append(sizes[-1] * 2 if sizes[-1] > 1 else 2)
    return sizes


def threads_for(workers: int, cores: int) -> int:
    """The same native-thread budget per core for every size: cores ÷ workers, at least one."""
    return max(1, cores // workers)


def beats(a: TuneRow, b: TuneRow) -> bool:
    """``a`` is faster than ``b`` beyond the noise: its slowest sample beats ``b``'s fastest, by BETTER."""
    return a.low > b.high and a.throughput >= BETTER * b.throughput


def decide(rows: list[TuneRow], cores: int | None = None) -> int:
    """The size to keep: the smallest that no larger size beats beyond the noise.

    With ``cores``, CPU-bound sizes (CPU time ≥ half the running time) above the
    cores are not candidates: CPU-bound work cannot gain from them. (Unmeasured
    CPU time, a dask cluster's, leaves them candidates: the samples decide.)
    """
    chosen = rows[0]
    for r in rows[1:]:
        if cores is not None and r.workers > cores and r.cpu_share is not None and r.cpu_share >= 0.5:
            continue
        if beats(r, chosen):
            chosen = r
    return chosen.workers


def _reason(result: TuneResult) -> str:
    chosen = result.row(result.chosen)
    one = result.rows[0]
    gain = chosen.speedup
    cpu = [r.cpu_share for r in result.rows if r.cpu_share is not None]
    share = statistics.median(cpu) if cpu else None
    kind = ("waiting-bound (I/O, sleeps: CPU time is {:.0%} of the time in the function)".format(share)
            if share is not None and share < 0.5 else "CPU-bound" if share is not None else "")
    est = f"speedup {chosen.speedup_text} over a loop" if gain == gain else "speedup unknown"
    if result.chosen == 1:
        if share is not None and share >= 0.5 and len(result.rows) > 1:
            scale = result.rows[1].throughput / one.throughput
            return (f"memory-bound or limited by something shared: CPU-bound, yet {result.rows[1].workers} "
                    f"workers gave {scale:.2f}× the throughput of 1, within the noise or below")
        return f"{kind + ': ' if kind else ''}no larger size beat 1 worker beyond the noise ({est})"
    noise = f"beyond the noise of {SAMPLES} samples each"
    if share is not None and share < 0.5:
        return f"{kind}: {result.chosen} workers, {chosen.throughput / one.throughput:.1f}× the throughput of 1 ({noise})"
    if share is None:  # (CPU time not measured: a dask cluster) what the sizes did tells
        if result.chosen > result.cores:
            return (f"waiting-bound (I/O, sleeps): more workers than cores still help, {result.chosen} workers give "
                    f"{chosen.throughput / one.throughput:.1f}× the throughput of 1 ({noise})")
        return f"{result.chosen} workers, {chosen.throughput / one.throughput:.1f}× the throughput of 1 ({noise})"
    if result.chosen <= result.cores:
        return f"CPU-bound: {result.chosen} workers, {est} ({noise})"
    return f"{kind or 'measured'}: {result.chosen} workers, {est} ({noise})"


def tune(pool: "Pool", budget: float = 10.0) -> TuneResult:
    """Time the pool's last mapped function at several sizes; resize to the best (see the module)."""
    job = pool.last_job
    if job is None or job.func is None:
        raise BadInputError("nothing to tune yet: run a %%poolmap first; --tune times the last mapped function")
    report = job.report
    if report.status != "done":
        what = "was interrupted" if report.status == "cancelled" else "failed"
        if report.errors:
            i = min(report.errors)
            e = report.errors[i]
            what += f" (item {i}: {type(e).__name__}: {safe_str(e)})"
        raise BadInputError(
            f"the last map {what}: --tune times the last mapped function, so run a map that "
            f"finishes first (fix the function, or map items it handles), then --tune again"
        )
    items = job.source.items_for_sampling()
    if not len(items):
        raise BadInputError("the last map had no items to time")
    per_item = (report.busy_s / max(report.done, 1)) if report.chunks else None
    sizes = candidate_sizes(pool.cores)
    func, star = job.func, job.options.star
    result = TuneResult(report.func_name, pool.cores)
    saved = pool.last_job, pool.last_report
    size_before = pool.size
    # Every size is timed on workers that already run: a dask LocalCluster takes a
    # second per worker to grow, and a remote cluster cannot be grown by us at all.
    pool.resize(max(sizes), warn=False)
    have = pool.backend.wait_workers(max(sizes), READY_TIMEOUT_S)
    sizes = [n for n in sizes if n <= have] or [1]
    share = budget / (len(sizes) * SAMPLES + 1)  # one share for the warm-up
    t_start = time.perf_counter()
    chosen = False
    try:
        warm = pool.run(func, items[: max(sizes)], star=star, workers=max(sizes))  # ship it, start workers
        if per_item is None:
            per_item = warm.busy_s / max(warm.done, 1)
        rows = []
        for n in sizes:
            want = int(0.8 * share * n / max(per_item, 1e-7))
            m = max(2 * n, min(want, MAX_SAMPLE))  # cycles through the items if needed
            sample = [items[i % len(items)] for i in range(m)] if m > len(items) else items[:m]
            rows.append((TuneRow(n, m, threads=threads_for(n, pool.cores)), sample, [0.0, 0.0]))
        for k in range(SAMPLES):  # the sizes in turn: load that comes and goes hits them alike
            for row, sample, cpu_ran in rows:
                if len(row.walls) < k:
                    continue  # (out of budget: this size stopped early)
                t = time.perf_counter()
                r = pool.run(func, sample, star=star, workers=row.workers, threads=row.threads)
                row.walls.append(time.perf_counter() - t)
                a = r.analysis()
                row.speedups.append(a.speedup)
                row.highs.append(a.speedup_high)
                row.busy_samples += a.contended
                if a.cpu_s is not None:
                    cpu_ran[0] += a.cpu_s
                    cpu_ran[1] += a.busy_s - a.waited_s
            if time.perf_counter() - t_start > budget and k >= 1:
                break
        for row, _, (cpu, ran) in rows:
            row.cpu_share = cpu / ran if ran > 0 else None
            if row.walls:
                result.rows.append(row)
    except PoolmapError as exc:
        raise BadInputError(f"--tune stopped: timing {report.func_name}() failed: {safe_str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise BadInputError(
            f"--tune stopped: {report.func_name}() raised {type(exc).__name__}: {safe_str(exc)} while being timed"
        ) from None
    else:
        chosen = True
    finally:
        pool.last_job, pool.last_report = saved
        if not chosen:
            pool.resize(size_before, warn=False)
    # (waiting-bound work waits for a CPU only to wake up: every size alike, the noise rule copes)
    busy_host = [r.workers for r in result.rows if r.contended and (r.cpu_share is None or r.cpu_share >= 0.5)]
    if busy_host:
        result.chosen, result.kept = size_before, True
        result.reason = (
            f"no conclusion: other processes held the CPUs while {_plural_workers(busy_host)} ran (a loop "
            f"would have had less than 80 % of a CPU), so the sizes were not compared fairly; the pool "
            f"keeps {size_before} worker{'s' if size_before != 1 else ''}. Run --tune again when the machine is quieter"
        )
        pool.resize(size_before, warn=False)
        return result
    result.chosen = decide(result.rows, pool.cores)
    result.reason = _reason(result)
    pool.resize(result.chosen)
    return result


def _plural_workers(sizes: list[int]) -> str:
    return ", ".join(str(n) for n in sizes) + (" worker" if sizes == [1] else " workers")
