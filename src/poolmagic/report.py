"""RunReport: what one map produced and where its time went.

Bound to ``_poolmap`` after every ``%%poolmap`` and carried by every error a map
raises, so that nothing a map computed is ever lost. It records a line per
chunk (worker id, first item, count, start/end on the system-wide monotonic
clock, per-item times when items are slow enough to time cheaply): enough for
a per-worker timeline, progress and efficiency diagnosis, from any backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .diagnose import Analysis
    from .timeline import Timeline


from .engine.events import ChunkRecord  # noqa: F401  (re-exported)
from .sentinel import NOT_DONE  # noqa: F401  (re-exported: results hold it)

FAILED_KEPT = 100  # failed items whose values a report keeps, for rerun() of stream items


@dataclass
class RunReport:
    """Results in input order, errors by index, and timing of one map."""

    func_name: str = "?"
    items: int | None = None
    results: list = field(default_factory=list)
    errors: dict[int, BaseException] = field(default_factory=dict)
    chunks: list[ChunkRecord] = field(default_factory=list)
    outputs: list[tuple[int, str, str]] = field(default_factory=list)
    cores: int = 1
    pool_size: int = 1
    backend: str = "local"
    status: str = "running"
    t_start: float = field(default_factory=time.perf_counter)
    t_end: float | None = None
    done: int = 0
    threads: int | None = None  # native threads per worker
    retried: int = 0  # attempts run again (--retries)
    attempts: dict[int, list[BaseException]] = field(default_factory=dict)  # index -> each attempt's error
    resumed: tuple[int, int] | None = None  # (kept, run) when this run resumed an earlier one
    notes: list[str] = field(default_factory=list)  # said under the summary
    failed_items: dict[int, Any] = field(default_factory=dict, repr=False)  # the first FAILED_KEPT failed items
    replay: Any = field(default=None, repr=False)  # (function, options, items or None) for rerun()
    serial_item_s: float | None = None  # one worker's measured time per item (--tune), if known

    # ---------------------------------------------------------------- figures
    @property
    def wall_s(self) -> float:
        end = self.t_end if self.t_end is not None else time.perf_counter()
        return max(end - self.t_start, 1e-9)

    @property
    def busy_s(self) -> float:
        """Seconds spent inside the function, summed over workers."""
        return sum(c.t1 - c.t0 for c in self.chunks)

    @property
    def speedup(self) -> float:
        """Estimated gain over a plain loop: the serial time of the items ÷ the wall time.

        The one figure the summary and ``--tune`` show (diagnose.py says how it is
        estimated): per-chunk time in the function less time waiting for a CPU;
        the low end when native threads make it a range; ``nan`` when the
        estimate failed (it would exceed the cores for CPU-bound work).
        """
        return self.analysis().speedup

    def analysis(self, all_findings: bool = False) -> "Analysis":
        """Where the time went and, when parallelism did not pay, why (diagnose.py).

        Computed once for a finished map (its summary shows it as text and HTML).
        Maps under 0.1 s get no findings unless ``all_findings``.
        """
        cached = self.__dict__.get("_analysis")
        if cached is not None and not all_findings:
            return cached
        from .diagnose import analyse

        a = analyse(self, self.serial_item_s, self.threads, all_findings=all_findings)
        if self.status != "running" and not all_findings:
            self.__dict__["_analysis"] = a
        return a

    @property
    def timeline(self) -> "Timeline":
        """The chunks per worker: ``.rows``, ``.to_frame()``; text bars or SVG when shown."""
        from .timeline import Timeline

        return Timeline(self)

    @property
    def workers(self) -> int:
        """Distinct workers that ran at least one chunk."""
        return len({c.worker for c in self.chunks})

    @property
    def failed(self) -> int:
        return len(self.errors)

    def item_times(self) -> list[float | None]:
        """Seconds per item: measured when timed, else the chunk's average."""
        n = len(self.results)
        out: list[float | None] = [None] * n
        for c in self.chunks:
            if c.item_times is not None:
                out[c.start : c.start + len(c.item_times)] = c.item_times
            elif c.count:
                out[c.start : c.start + c.count] = [(c.t1 - c.t0) / c.count] * c.count
        return out

    def rerun(self, index: int | None = None) -> Any:
        """Run one item again here, in this process: the first failed one, or ``index``.

        Same function version, item, keyword constants and seed as in the map;
        an exception is raised here, where a debugger can inspect it
        (``%pooldebug`` does exactly that).
        """
        __tracebackhide__ = True
        from .errors import BadInputError

        if self.replay is None:
            raise BadInputError("this report has nothing to re-run (it was not made by a map)")
        func, options, items = self.replay
        if index is None:
            if not self.errors:
                raise BadInputError("the last map had no failure: give an item's index to re-run it")
            index = min(self.errors)
        n = self.items if self.items is not None else len(self.results)
        if not isinstance(index, int) or not 0 <= index < n:
            raise BadInputError(f"there is no item {index!r}: the map had {n:,} items (0–{n - 1:,})")
        if index in self.failed_items:
            value = self.failed_items[index]
        elif items is not None:
            value = items[index]
        else:
            raise BadInputError(
                f"item {index} is no longer available: the ITERABLE was a stream, consumed by the map. "
                f"The values of the first {FAILED_KEPT} failed items are kept; re-run the map over a list to get any item."
            )
        if options.seed is not None:
            from .engine.chunk import _seed_item

            _seed_item(options.seed, index)
        return func(*value) if options.star else func(value)

    # ---------------------------------------------------------------- display
    def summary(self) -> str:
        from .display import summary_text

        return summary_text(self)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.summary())

    def _repr_html_(self) -> str:
        from .display import summary_html

        return summary_html(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from .display import summary_bundle

        return summary_bundle(self)
