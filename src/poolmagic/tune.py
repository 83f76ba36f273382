"""%poolsize --tune: measure throughput at 1, 2, 4, ... workers and keep the best.

The tutorial's advice is "benchmark to find the optimal number of processes";
this does it on the user's own function and items, within a time budget. Each
size gets an equal share of the budget; the sample for a size is as many
items as should take that share, judged from the last run's time per item.
The chosen size is the smallest within 5% of the best throughput: workers
that add nothing only cost memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import BadInputError, PoolmapError, safe_str

if TYPE_CHECKING:
    from .api import Pool

GOOD_ENOUGH = 0.95
MAX_SAMPLE = 1_000_000
READY_TIMEOUT_S = 60.0  # for the largest size's workers to start


@dataclass
class TuneRow:
    workers: int
    items: int
    wall_s: float

    @property
    def throughput(self) -> float:
        return self.items / self.wall_s


@dataclass
class TuneResult:
    func_name: str
    cores: int
    rows: list[TuneRow] = field(default_factory=list)
    chosen: int = 1
    reason: str = ""

    def best(self) -> TuneRow:
        return max(self.rows, key=lambda r: r.throughput)

    def text(self) -> str:
        from .display import tune_text

        return tune_text(self)

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.text())

    def _repr_html_(self) -> str:
        from .display import tune_html

        return tune_html(self)


def candidate_sizes(cores: int) -> list[int]:
    """1, 2, 4, ... up to the cores, then one step beyond."""
    sizes = [1]
    while sizes[-1] < cores:
        sizes.append(min(sizes[-1] * 2, cores))
    sizes.append(sizes[-1] * 2 if sizes[-1] > 1 else 2)
    return sizes


def _reason(result: TuneResult) -> str:
    best = result.best()
    chosen = next(r for r in result.rows if r.workers == result.chosen)
    share = chosen.throughput / best.throughput
    one = result.rows[0].throughput
    scale = chosen.throughput / one if one else 0.0
    if result.chosen == 1:
        return "more workers did not help: the work is too short or bound by something shared (memory, I/O, a lock)"
    if result.chosen > result.cores:
        return (
            f"waiting-bound (I/O, sleeps): more workers than cores still help, "
            f"{scale:.1f}× the throughput of 1 worker with {result.chosen}"
        )
    if result.chosen == result.cores and scale >= 0.8 * result.chosen:
        return f"CPU-bound: {scale:.1f}× the throughput of 1 worker with {result.chosen} workers"
    if result.chosen < result.cores:
        return (
            f"memory- or I/O-bound: {result.chosen} workers give {share:.0%} of the best throughput; "
            f"more only add contention"
        )
    return f"{result.chosen} workers give {share:.0%} of the best throughput ({scale:.1f}× one worker)"


def tune(pool: "Pool", budget: float = 10.0) -> TuneResult:
    """Time the pool's last mapped function at several sizes; resize to the best."""
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
    share = budget / (len(sizes) + 1)  # one share for the warm-up
    t_start = time.perf_counter()
    chosen = False
    try:
        warm = pool.run(func, items[: max(sizes)], star=star, workers=max(sizes))  # ship it, start workers
        if per_item is None:
            per_item = warm.busy_s / max(warm.done, 1)
        for n in sizes:
            want = int(0.8 * share * n / max(per_item, 1e-7))
            m = max(2 * n, min(want, MAX_SAMPLE))  # cycles through the items if needed
            sample = [items[i % len(items)] for i in range(m)] if m > len(items) else items[:m]
            t = time.perf_counter()
            pool.run(func, sample, star=star, workers=n)
            result.rows.append(TuneRow(n, m, time.perf_counter() - t))
            if n == 1:  # one worker's speed: later maps of this version report a measured speedup
                pool.serial_item_s[job.payload.key] = result.rows[-1].wall_s / m
            if time.perf_counter() - t_start > budget:
                break
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
    top = result.best().throughput
    result.chosen = min(r.workers for r in result.rows if r.throughput >= GOOD_ENOUGH * top)
    result.reason = _reason(result)
    pool.resize(result.chosen)
    return result
