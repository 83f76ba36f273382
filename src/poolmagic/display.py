"""Every rendering poolmagic does, in one place: plain data in, text or HTML out.

A run's summary (one text line for terminals, a compact HTML card for
notebooks), the pool's status line and the ``--tune`` chart. Nothing here
publishes or imports IPython: showing things is the magics' job (publish.py).
Rendering is on the per-cell hot path, so every form is plain string
formatting: no templates, no imports beyond the stdlib ``html`` escape.
"""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import RunReport
    from .tune import TuneResult


def _fmt_s(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def _items(r: "RunReport") -> str:
    total = r.items if r.items is not None else len(r.results)
    if r.status in ("running", "cancelled", "failed") and r.done < total:
        return f"{r.done:,}/{total:,} items"
    return f"{total:,} item{'s' if total != 1 else ''}"


def _status_words(r: "RunReport") -> str:
    parts = []
    if r.errors:
        parts.append(f"{len(r.errors):,} failed")
    if r.status == "cancelled":
        parts.append("interrupted")
    elif r.status == "running":
        parts.append("running")
    return " · ".join(parts)


def summary_text(r: "RunReport") -> str:
    """``poolmagic: 10,000 items in 0.84 s · 2 workers · 2 cores available · speedup 1.93×``"""
    line = (
        f"poolmagic: {_items(r)} in {_fmt_s(r.wall_s)} · {r.workers} worker"
        f"{'s' if r.workers != 1 else ''} · {r.cores} core{'s' if r.cores != 1 else ''} available"
        f" · speedup {r.speedup:.2f}×"
    )
    extra = _status_words(r)
    return f"{line} · {extra}" if extra else line


def summary_html(r: "RunReport") -> str:
    used = max(r.workers, 1)
    eff = min(r.speedup / used, 1.0)
    bar = (
        f'<span title="speedup {r.speedup:.2f}× on {used} workers" style="display:inline-block;'
        f"width:60px;height:8px;background:#e5e7eb;border-radius:4px;vertical-align:middle;"
        f'margin:0 4px"><span style="display:block;height:8px;width:{eff * 60:.0f}px;'
        f'background:{"#16a34a" if eff > 0.7 else "#d97706"};border-radius:4px"></span></span>'
    )
    if r.status == "running":
        total = r.items if r.items is not None else max(len(r.results), 1)
        frac = r.done / total if total else 1.0
        cells_progress = (
            f'<span style="display:inline-block;width:120px;height:8px;background:#e5e7eb;'
            f'border-radius:4px;vertical-align:middle"><span style="display:block;height:8px;'
            f'width:{120 * frac:.0f}px;background:#2563eb;border-radius:4px"></span></span> {frac:.0%}'
        )
    else:
        cells_progress = ""
    extra = _status_words(r)
    color = "#b91c1c" if r.errors or r.status == "cancelled" else "#374151"
    cells = [
        f"<b>poolmagic</b> <code>{html.escape(r.func_name)}</code>",
        html.escape(_items(r)),
        f"{_fmt_s(r.wall_s)}",
        f"{r.workers} worker{'s' if r.workers != 1 else ''}",
        f"{r.cores} core{'s' if r.cores != 1 else ''} available",
        f"speedup {bar}<b>{r.speedup:.2f}×</b>",
    ]
    if cells_progress:
        cells.insert(2, cells_progress)
    if extra:
        cells.append(f"<b>{html.escape(extra)}</b>")
    return (
        f'<div class="poolmagic-summary" style="font-family:system-ui,sans-serif;font-size:12px;'
        f'color:{color}">' + " · ".join(cells) + "</div>"
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def status_text(size: int, description: str, cores: int, threads: int, state: str,
                max_memory: int | None = None) -> str:
    """``%poolsize``'s line: workers, backend, cores, native threads, memory limit, warmth."""
    from .engine.memory import fmt_size

    warm = {"warm": "pool warm", "starting": "pool starting"}.get(state, "pool cold (starts on first use)")
    limit = f" · at most {fmt_size(max_memory)} per worker" if max_memory else ""
    return (
        f"poolmagic: {_plural(size, 'worker')} · {description} · {cores} core{'s' if cores != 1 else ''} "
        f"available · {_plural(threads, 'native thread')} per worker{limit} · {warm}"
    )


def tune_text(t: "TuneResult") -> str:
    top = t.best().throughput
    lines = [f"poolmagic --tune {t.func_name}: {t.cores} cores available"]
    for r in t.rows:
        bar = "█" * max(1, round(24 * r.throughput / top))
        mark = "  ← chosen" if r.workers == t.chosen else ""
        lines.append(f"  {r.workers:>3} workers  {r.throughput:>10.1f} items/s  {bar}{mark}")
    lines.append(f"pool size set to {t.chosen}: {t.reason}")
    return "\n".join(lines)


def tune_html(t: "TuneResult") -> str:
    top = t.best().throughput
    bars = []
    for k, r in enumerate(t.rows):
        w = 220 * r.throughput / top
        color = "#16a34a" if r.workers == t.chosen else "#9ca3af"
        y = 4 + 22 * k
        bars.append(
            f'<text x="0" y="{y + 13}" font-size="11">{r.workers} w</text>'
            f'<rect x="40" y="{y}" width="{w:.0f}" height="16" fill="{color}"/>'
            f'<text x="{44 + w:.0f}" y="{y + 13}" font-size="11">{r.throughput:,.0f}/s</text>'
        )
    svg = (
        f'<svg width="340" height="{8 + 22 * len(t.rows)}" style="font-family:system-ui">'
        + "".join(bars)
        + "</svg>"
    )
    rows = "".join(
        f"<tr><td>{r.workers}</td><td>{r.items:,}</td><td>{r.wall_s:.3f}</td>"
        f"<td>{r.throughput:,.1f}</td><td>{r.throughput / top:.0%}</td></tr>"
        for r in t.rows
    )
    return (
        f'<div class="poolmagic-tune" style="font-family:system-ui;font-size:12px">'
        f"<b>poolmagic --tune</b> <code>{html.escape(t.func_name)}</code> · {t.cores} cores available<br>"
        f"{svg}<table><tr><th>workers</th><th>items</th><th>wall s</th><th>items/s</th>"
        f"<th>of best</th></tr>{rows}</table>"
        f"<b>pool size set to {t.chosen}</b>: {html.escape(t.reason)}</div>"
    )
