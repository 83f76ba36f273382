"""The charts: a map's timeline (text, SVG, HTML) and ``%poolsize --tune``'s chart.

Plain data in (a Timeline, a TuneResult), text or HTML out; nothing here
publishes or imports IPython. They load only when a chart is drawn: the
summary card (display.py) draws the timeline for maps of more than one chunk.
"""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

from .style import BAD, FONT, GOOD, GREY, TEXT, TRACK, call_name, fmt_s, plural

if TYPE_CHECKING:
    from .timeline import Timeline
    from .tune import TuneResult


def _ticks(span: float, n: int = 5) -> list[float]:
    """Round tick positions (1, 2, 5 × 10^k apart) from 0 to ``span``."""
    import math

    raw = span / n
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 5, 10):
        if m * step >= raw:
            step *= m
            break
    return [k * step for k in range(int(span / step + 1e-9) + 1)]


def _slowest_words(t: "Timeline") -> str:
    """``item 1 1.20 s, ...``; an item that spent much of its time waiting for a CPU says so, so that
    the figure matches its chunk's in the picture (which is measured, the wait in)."""
    words = []
    for i, run, measured in t.slowest_measured(5):
        waited = measured - run
        if waited >= 1e-6 and waited >= 0.1 * measured:
            words.append(f"item {i} {fmt_s(run)} running, {fmt_s(measured)} with its wait for a CPU")
        else:
            words.append(f"item {i} {fmt_s(run)}")
    return ", ".join(words)


def timeline_text(t: "Timeline", width: int = 60) -> str:
    """One line per worker: ``█`` ran, ``×`` failed, ``·`` idle; an axis; the slowest items."""
    if not t.rows:
        return "(no chunks)"
    span = max(t.wall_s, max(r.end for r in t.rows), 1e-9)
    lines = [f"timeline: {len(t.rows):,} chunks over {fmt_s(span)} (█ chunk ran · × chunk failed · · idle)"]
    for w in t.workers():
        cells = ["·"] * width
        for r in (r for r in t.rows if r.worker == w):
            a, b = int(r.start / span * width), max(int(r.start / span * width) + 1, int(r.end / span * width))
            for k in range(max(a, 0), min(b, width)):
                cells[k] = "×" if r.status != "done" else "█"
        lines.append(f"  worker {w:>3} |{''.join(cells)}|")
    lines.append(f"{'':13}0{fmt_s(span):>{width + 1}}")
    lines.append(f"  slowest: {_slowest_words(t)}")
    return "\n".join(lines)


MAX_RECTS = 4000  # an SVG of at most ~200 KB, whatever the number of chunks
_HATCH = ('<defs><pattern id="poolmagic-failed" width="6" height="6" patternUnits="userSpaceOnUse" '
          f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{BAD}"/>'
          '<rect width="2.5" height="6" fill="currentColor" opacity=".55"/></pattern></defs>')
_FAILED_FILL = "url(#poolmagic-failed)"  # failed chunks: hatched as well as red, told apart without colour


def timeline_svg(t: "Timeline", width: int = 600) -> str:
    """Per-worker rows of chunks as inline SVG, with a time axis, a legend and the slowest items.

    Aggregated where bars would be thinner than a pixel.
    """
    if not t.rows:
        return ""
    workers = t.workers()
    span = max(t.wall_s, max(r.end for r in t.rows), 1e-9)
    row_h, label_w = 14, 70
    detailed = len(t.rows) <= 400
    bucket = max(1.0, len(workers) * width / MAX_RECTS)
    out = [_HATCH]
    for k, w in enumerate(workers):
        y = 4 + k * (row_h + 4)
        out.append(f'<text x="0" y="{y + 11}" font-size="11" fill="currentColor">worker {w}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{width}" height="{row_h}" fill="{TRACK}"/>')
        rows = [r for r in t.rows if r.worker == w]
        if detailed:
            for r in rows:
                x = label_w + r.start / span * width
                wd = max((r.end - r.start) / span * width, 1.0)
                fill = _FAILED_FILL if r.status != "done" else GOOD
                tip = (f"items {r.first_item}–{r.last_item} ({r.items}) · {fmt_s(r.end - r.start)}"
                       f" · pid {r.pid}" + (" · failed" if r.status != "done" else ""))
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{wd:.1f}" height="{row_h}" fill="{fill}">'
                           f"<title>{html.escape(tip)}</title></rect>")
            continue
        cols: dict[int, str] = {}
        for r in rows:
            a = int(r.start / span * width / bucket)
            b = int(r.end / span * width / bucket)
            for c in range(a, b + 1):
                if cols.get(c) != "failed":
                    cols[c] = r.status
        # one path per row and status: a few bytes per bar instead of a <rect> each
        for status, fill in (("done", GOOD), ("failed", _FAILED_FILL)):
            d = "".join(f"M{label_w + c * bucket:.0f} {y}h{bucket:.0f}v{row_h}h-{bucket:.0f}z"
                        for c in sorted(cols) if (cols[c] == "done") == (status == "done"))
            if d:
                out.append(f'<path fill="{fill}" d="{d}"/>')
    height = 8 + len(workers) * (row_h + 4)
    axis = [f'<line x1="{label_w}" x2="{label_w + width}" y1="{height}" y2="{height}" stroke="currentColor" '
            f'stroke-width=".5"/>']
    for tick in _ticks(span):
        x = label_w + tick / span * width
        anchor = "end" if x > label_w + width - 20 else "middle" if tick else "start"
        axis.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{height}" y2="{height + 4}" stroke="currentColor"/>'
                    f'<text x="{x:.1f}" y="{height + 14}" font-size="10" fill="currentColor" '
                    f'text-anchor="{anchor}">{fmt_s(tick) if tick else "0"}</text>')
    ly = height + 30
    failed = any(r.status != "done" for r in t.rows)
    legend = (f'<rect x="{label_w}" y="{ly - 9}" width="14" height="10" fill="{GOOD}"/>'
              f'<text x="{label_w + 18}" y="{ly}" font-size="11" fill="currentColor">chunk ran</text>'
              f'<rect x="{label_w + 90}" y="{ly - 9}" width="14" height="10" fill="{_FAILED_FILL}"/>'
              f'<text x="{label_w + 108}" y="{ly}" font-size="11" fill="currentColor">chunk with a failed item'
              f'{"" if failed else " (none)"}</text>'
              f'<rect x="{label_w + 290}" y="{ly - 9}" width="14" height="10" fill="{TRACK}"/>'
              f'<text x="{label_w + 308}" y="{ly}" font-size="11" fill="currentColor">idle · time since the map started</text>')
    return (f'<svg class="poolmagic-timeline" width="{label_w + width + 4}" height="{ly + 6}" role="img" '
            f'aria-label="chunks per worker over time" style="{FONT}">' + "".join(out) + "".join(axis) + legend
            + "</svg>")


def timeline_html(t: "Timeline") -> str:
    """The SVG and, under it, the slowest items (as mpire's insights list them)."""
    if not t.rows:
        return ""
    return (timeline_svg(t)
            + f'<div class="poolmagic-slowest" style="{FONT}">slowest: {html.escape(_slowest_words(t))}</div>')


def tune_text(t: "TuneResult") -> str:
    """One line per size: median items/s, the samples' range, threads, speedup; then the verdict."""
    top = max(r.high for r in t.rows)
    lines = [f"poolmagic --tune {call_name(t.func_name)}: {t.cores} cores available, "
             f"{len(t.rows[0].walls)} samples per size"]
    for r in t.rows:
        bar = "█" * max(1, round(24 * r.throughput / top))
        mark = "  ← chosen" if r.workers == t.chosen and not t.kept else ""
        noun = "worker " if r.workers == 1 else "workers"
        busy = " (host busy)" if r.contended else ""
        lines.append(f"  {r.workers:>3} {noun} × {r.threads} thr  {r.throughput:>10.1f} items/s "
                     f"[{r.low:,.1f}–{r.high:,.1f}]  speedup {r.speedup_text:>11}  {bar}{mark}{busy}")
    verb = "pool size kept at" if t.kept else "pool size set to"
    lines.append(f"{verb} {t.chosen}: {t.reason}")
    return "\n".join(lines)


def tune_html(t: "TuneResult") -> str:
    """A bar per size (median), a whisker for its samples' range, and a table; theme colours throughout."""
    top = max(r.high for r in t.rows)
    bars = []
    scale = 220 / top
    for k, r in enumerate(t.rows):
        w = r.throughput * scale
        color = GOOD if r.workers == t.chosen and not t.kept else GREY
        y = 4 + 22 * k
        lo, hi = 60 + r.low * scale, 60 + r.high * scale
        bars.append(
            f'<text x="0" y="{y + 13}" font-size="11" fill="currentColor">{plural(r.workers, "worker")}</text>'
            f'<rect x="60" y="{y}" width="{w:.0f}" height="16" fill="{color}"><title>median of {len(r.walls)} samples'
            f'</title></rect>'
            f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + 8}" y2="{y + 8}" stroke="currentColor" stroke-width="1.5"/>'
            f'<line x1="{lo:.1f}" x2="{lo:.1f}" y1="{y + 3}" y2="{y + 13}" stroke="currentColor"/>'
            f'<line x1="{hi:.1f}" x2="{hi:.1f}" y1="{y + 3}" y2="{y + 13}" stroke="currentColor"/>'
            f'<text x="{max(w, hi - 60) + 66:.0f}" y="{y + 13}" font-size="11" fill="currentColor">'
            f"{r.throughput:,.0f}/s</text>"
        )
    svg = (f'<svg width="380" height="{8 + 22 * len(t.rows)}" role="img" aria-label="items per second per pool size" '
           f'style="color:{TEXT}">' + "".join(bars) + "</svg>")
    rows = "".join(
        f"<tr><td>{r.workers}</td><td>{r.threads}</td><td>{r.items:,}</td><td>{r.throughput:,.1f}</td>"
        f"<td>{r.low:,.1f}–{r.high:,.1f}</td><td>{r.speedup_text}</td>"
        f"<td>{'host busy' if r.contended else ''}</td></tr>"
        for r in t.rows
    )
    verb = "pool size kept at" if t.kept else "pool size set to"
    return (
        f'<div class="poolmagic-tune" style="{FONT}">'
        f"<b>poolmagic --tune</b> <code>{html.escape(call_name(t.func_name))}</code> · {t.cores} cores available · "
        f"{len(t.rows[0].walls)} samples per size (bar: median, line: range)<br>"
        f'{svg}<table><tr><th>workers</th><th>native threads each</th><th>items per sample</th>'
        f"<th>items/s (median)</th><th>range</th><th>speedup</th><th></th></tr>{rows}</table>"
        f"<b>{verb} {t.chosen}</b>: {html.escape(t.reason)}</div>"
    )
