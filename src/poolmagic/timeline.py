"""``_poolmap.timeline``: one row per chunk, as each worker ran it.

Raw rows for analysis (``.rows``, ``.to_frame()``), text bars in a terminal,
an inline SVG (charts.py) in a notebook: busy vs idle per worker, failed
chunks marked. Large maps are aggregated when drawn, so the notebook stays
light whatever the number of chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import RunReport


@dataclass(frozen=True)
class Row:
    worker: int
    pid: int
    start: float  #: seconds since the map started
    end: float
    first_item: int
    last_item: int
    items: int
    status: str  #: "done" or "failed"


class Timeline:
    """The chunks of one map, per worker, in time order."""

    def __init__(self, report: "RunReport"):
        t = report.t_start
        self._report = report
        self.wall_s = report.wall_s
        self.rows = [
            Row(c.worker, c.pid, c.t0 - t, c.t1 - t, c.start, c.start + c.count - 1, c.count, c.status)
            for c in sorted(report.chunks, key=lambda c: (c.worker, c.t0))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]

    def workers(self) -> list[int]:
        return sorted({r.worker for r in self.rows})

    def slowest(self, n: int = 5) -> list[tuple[int, float]]:
        """The ``n`` slowest items, (index, seconds): measured per item where timed, else
        their chunk's average; time waiting for a CPU left out (it was not the item's)."""
        return [(i, run) for i, run, _ in self.slowest_measured(n)]

    def slowest_measured(self, n: int = 5) -> list[tuple[int, float, float]]:
        """As ``slowest``, with each item's time as measured (its wait for a CPU in, as the
        timeline's chunks show it): (index, seconds running, seconds measured)."""
        import heapq

        def times():
            for c in self._report.chunks:
                ran = 1 - min(c.waited_s, c.busy_s) / c.busy_s if c.busy_s > 0 else 1.0
                if c.item_times:
                    yield from ((c.start + k, t * ran, t) for k, t in enumerate(c.item_times))
                elif c.count:
                    t = c.busy_s / c.count  # (one per chunk: they are all alike)
                    yield c.start, t * ran, t

        return heapq.nlargest(n, times(), key=lambda it: (it[1], it[2]))

    def to_frame(self) -> Any:
        """The rows as a pandas DataFrame."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Timeline.to_frame() needs pandas: pip install pandas") from None
        return pd.DataFrame([r.__dict__ for r in self.rows])

    def text(self, width: int = 60) -> str:
        from .charts import timeline_text

        return timeline_text(self, width)

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def _repr_html_(self) -> str:
        from .charts import timeline_html

        return timeline_html(self)
