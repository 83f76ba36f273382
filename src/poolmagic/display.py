"""Render a RunReport: one text line for terminals, a compact HTML card for notebooks.

Rendering is on the per-cell hot path, so both forms are plain string
formatting: no templates, no imports beyond the stdlib ``html`` escape.
"""
from __future__ import annotations

import html
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import RunReport


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


def _streams_idle() -> bool:
    """True when ipykernel's stdout/stderr hold no text waiting to be sent."""
    for stream in (sys.stdout, sys.stderr):
        buffers = getattr(stream, "_buffers", None)
        if buffers is None:
            return False
        if any(buf.tell() for buf in list(buffers.values())):
            return False
    return True


def show(obj: Any, shell: Any) -> None:
    """Display a report: straight to the display publisher, flushing streams only if needed.

    ``display()`` runs every formatter and ipykernel flushes stdout and stderr
    before publishing, each flush a synchronous round trip to its I/O thread:
    together ~0.8 ms of a 4-item cell. The report's bundle is known, and the
    flushes only keep printed text ahead of the display, so they are skipped
    when no text is waiting.
    """
    pub = getattr(shell, "display_pub", None)
    bundle = getattr(obj, "_repr_mimebundle_", None)
    if pub is None or bundle is None:
        from IPython.display import display

        display(obj)
        return
    data = bundle()
    if not hasattr(pub, "_flush_streams") or not _streams_idle():
        pub.publish(data=data, metadata={})
        return
    pub._flush_streams = _no_flush
    try:
        pub.publish(data=data, metadata={})
    finally:
        del pub._flush_streams


def _no_flush() -> None:
    pass
