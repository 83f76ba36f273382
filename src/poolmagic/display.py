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
    from .diagnose import Analysis
    from .live import Progress
    from .report import RunReport
    from .timeline import Timeline
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
    if r.resumed:
        parts.append(f"resumed: {r.resumed[0]:,} kept, {r.resumed[1]:,} run")
    if r.retried:
        parts.append(f"{r.retried:,} retried")
    if r.errors:
        parts.append(f"{len(r.errors):,} failed")
    if r.status == "cancelled":
        parts.append("interrupted")
    elif r.status == "running":
        parts.append("running")
    return " · ".join(parts)


# Colours come from the notebook's theme (JupyterLab's --jp-* variables, then
# VS Code's), with fallbacks that read on light and dark backgrounds alike.
# Text keeps the output area's own colour: contrast is the theme's.
_FONT = "font-family:var(--jp-ui-font-family,system-ui,sans-serif);font-size:var(--jp-code-font-size,13px)"
_TRACK = "var(--jp-layout-color3,rgba(127,127,127,.28))"
_GOOD = "var(--jp-success-color1,#2e9e4f)"
_WARN = "var(--jp-warn-color1,#d98a00)"
_BAD = "var(--jp-error-color1,#d84040)"
_BLUE = "var(--jp-brand-color1,#3b82f6)"


def _speedup_words(r: "RunReport", a: "Analysis") -> str:
    if r.status == "running" and not r.chunks:
        return "workers starting"
    if not r.chunks or r.status == "cancelled":
        return ""  # interrupted: the stopped items' time is unknown, so is the gain
    busy = f"workers busy {a.busy_share:.0%}"
    if a.waited_s > 0.2 * a.busy_s:
        busy += f", {a.waited_s / a.busy_s:.0%} of it waiting for a CPU"
    if a.measured is not None:
        return f"speedup {a.measured:.2f}× measured against one worker ({busy})"
    if a.speedup < 1 and r.status != "running" and a.waited_s <= 0.2 * a.busy_s:
        return f"slower than a plain loop (speedup ≈{a.speedup:.2f}×)"
    return f"speedup ≈{a.speedup:.2f}× ({busy})"


def summary_text(r: "RunReport") -> str:
    """``poolmagic: 10,000 items in 0.84 s · 2 workers · 2 cores available · speedup ≈1.93× (...)``

    A second line per finding when parallelism did not pay (diagnose.py).
    """
    return _summary(r, with_html=False)["text/plain"]


def summary_html(r: "RunReport") -> str:
    return summary_bundle(r)["text/html"]


def _bar(frac: float, width: int, color: str, title: str = "") -> str:
    frac = min(max(frac, 0.0), 1.0)
    t = f' title="{html.escape(title)}"' if title else ""
    return _BAR % (t, width, _TRACK, frac * width, color)


_BAR = ('<span%s style="display:inline-block;width:%dpx;height:8px;background:%s;border-radius:4px;'
        'vertical-align:middle;margin:0 4px"><span style="display:block;height:8px;width:%.0fpx;'
        'background:%s;border-radius:4px"></span></span>')
_CARD = f'<div class="poolmagic-summary" style="{_FONT};color:inherit;border-left:3px solid %s;padding:1px 8px">'


def summary_bundle(r: "RunReport") -> dict[str, str]:
    """The summary as text and HTML, from one pass over the report (on every cell's path)."""
    return _summary(r, with_html=True)


def _summary(r: "RunReport", with_html: bool) -> dict[str, str]:
    """The text form, and the HTML one (its timeline picture included) only when asked."""
    a = r.analysis()
    items = _items(r)
    workers = r.workers
    if r.status == "cancelled":  # the stopped chunks were never recorded: count the workers they ran on
        workers = max(workers, min(r.pool_size, r.items if r.items is not None else r.pool_size))
    cores = f"{r.cores} core{'s' if r.cores != 1 else ''}"
    words = _speedup_words(r, a)
    extra = _status_words(r)
    running = r.status == "running"

    text = [f"poolmagic: {items} in {_fmt_s(r.wall_s)}", _plural(workers, "worker"), f"{cores} available"]
    cells = [f"<b>poolmagic</b> <code>{html.escape(r.func_name)}</code>", html.escape(items), _fmt_s(r.wall_s),
             f"{_plural(workers, 'worker')} / {cores}"]
    if running:
        total = r.items
        frac = r.done / total if total else 0.0
        cells.insert(2, _bar(frac, 120, _BLUE) + (f"{frac:.0%}" if total else f"{r.done:,} done"))
    if words:
        text.append(words)
        if r.chunks:
            ok = a.efficiency >= 0.7 and (a.measured or a.speedup) >= 1
            cells.append(_bar(a.busy_share, 60, _GOOD if ok else _WARN, f"workers busy {a.busy_share:.0%}")
                         + html.escape(words))
        else:
            cells.append(html.escape(words))
    if extra:
        text.append(extra)
        cells.append(f"<b>{html.escape(extra)}</b>")
    lines = [" · ".join(text)]
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"  why: {f.text}" for f in a.findings]
    if not with_html:  # a terminal's repr: no HTML, no timeline picture
        return {"text/plain": "\n".join(lines)}

    edge = _BAD if r.errors or r.status == "cancelled" else (_GOOD if not a.findings else _WARN)
    parts = [_CARD % edge, " · ".join(cells)]
    if r.chunks and not running:
        parts.append(
            f'<div style="opacity:.85">time: function {_fmt_s(a.busy_s)} · transport {_fmt_s(a.transport_s)}'
            f" · idle {_fmt_s(a.idle_s)} (over {_plural(a.workers, 'worker')})</div>"
        )
    parts += [f"<div>note: {html.escape(n)}</div>" for n in r.notes]
    if a.findings:
        parts.append('<ul style="margin:2px 0 0 0;padding-left:18px">'
                     + "".join(f"<li>{html.escape(f.text)}</li>" for f in a.findings) + "</ul>")
    if len(r.chunks) > 1 and not running:  # one chunk is no picture
        from .timeline import Timeline

        parts.append(f"<details><summary>timeline</summary>{timeline_svg(Timeline(r))}</details>")
    parts.append("</div>")
    return {"text/plain": "\n".join(lines), "text/html": "".join(parts)}


def progress_text(p: "Progress") -> str:
    """tqdm's meter: ``37%|███▋      | 3,700/10,000 [00:04<00:07, 812 it/s]``."""
    from tqdm import tqdm

    if p.waiting and not p.finished:
        return f"poolmagic: {p.waiting} · {_fmt_s(p.elapsed)}"
    if p.starting:
        return f"poolmagic: workers starting · {_fmt_s(p.elapsed)}"
    meter = tqdm.format_meter(p.finished, p.total, p.elapsed, ncols=80, unit=" items", unit_scale=False)
    return f"poolmagic {meter}" + (f" · {p.waiting}" if p.waiting else "")


def progress_html(p: "Progress") -> str:
    if p.waiting and not p.finished:
        body = f"{html.escape(p.waiting)} · {_fmt_s(p.elapsed)}"
    elif p.starting:
        body = f"workers starting · {_fmt_s(p.elapsed)}"
    else:
        frac = p.finished / p.total if p.total else 0.0
        eta = f" · ETA {_fmt_s(p.eta)}" if p.eta is not None else ""
        of = f"/{p.total:,}" if p.total is not None else ""
        bar = _bar(frac, 160, _BLUE) if p.total else ""
        body = f"{bar}{p.finished:,}{of} items · {_fmt_s(p.elapsed)} · {p.rate:,.1f} items/s{eta}"
        if p.failed:
            body += f" · {p.failed:,} failed"
        if p.waiting:
            body += f" · {html.escape(p.waiting)}"
    return f'<div class="poolmagic-progress" style="{_FONT};color:inherit"><b>poolmagic</b> {body}</div>'


def progress_final(p: "Progress") -> tuple[str, str]:
    """The completed bar, (text, html): what a saved notebook shows for good."""
    of = f"/{p.total:,}" if p.total is not None else ""
    stats = f"{p.finished:,}{of} items · {_fmt_s(p.elapsed)} · {p.rate:,.1f} items/s"
    if p.status == "done":
        mark, word, color = "✔", "", _GOOD
    elif p.status == "cancelled":
        mark, word, color = "■", f" · interrupted at {p.finished:,}", _WARN
    else:
        mark, word, color = "✖", f" · stopped: {type(p.error).__name__ if p.error else 'failed'}", _BAD
    frac = p.finished / p.total if p.total else 1.0
    text = f"poolmagic {mark} {stats}{word}"
    h = (
        f'<div class="poolmagic-progress" style="{_FONT};color:inherit"><b>poolmagic</b> {mark}'
        f"{_bar(frac, 160, color)}{html.escape(stats + word)}</div>"
    )
    return text, h


def timeline_text(t: "Timeline", width: int = 60) -> str:
    """One line per worker: ``█`` busy, ``×`` failed, ``·`` idle."""
    if not t.rows:
        return "(no chunks)"
    span = max(t.wall_s, max(r.end for r in t.rows), 1e-9)
    lines = [f"timeline: {len(t.rows):,} chunks over {_fmt_s(span)}"]
    for w in t.workers():
        cells = ["·"] * width
        for r in (r for r in t.rows if r.worker == w):
            a, b = int(r.start / span * width), max(int(r.start / span * width) + 1, int(r.end / span * width))
            for k in range(max(a, 0), min(b, width)):
                cells[k] = "×" if r.status != "done" else "█"
        lines.append(f"  worker {w:>3} |{''.join(cells)}|")
    return "\n".join(lines)


MAX_RECTS = 4000  # an SVG of at most ~200 KB, whatever the number of chunks


def timeline_svg(t: "Timeline", width: int = 600) -> str:
    """Per-worker rows of chunks as inline SVG; aggregated where bars would be thinner than a pixel."""
    if not t.rows:
        return ""
    workers = t.workers()
    span = max(t.wall_s, max(r.end for r in t.rows), 1e-9)
    row_h, label_w = 14, 70
    detailed = len(t.rows) <= 400
    bucket = max(1.0, len(workers) * width / MAX_RECTS)
    out = []
    for k, w in enumerate(workers):
        y = 4 + k * (row_h + 4)
        out.append(f'<text x="0" y="{y + 11}" font-size="11" fill="currentColor">worker {w}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{width}" height="{row_h}" fill="{_TRACK}"/>')
        rows = [r for r in t.rows if r.worker == w]
        if detailed:
            for r in rows:
                x = label_w + r.start / span * width
                wd = max((r.end - r.start) / span * width, 1.0)
                color = _BAD if r.status != "done" else _GOOD
                tip = (f"items {r.first_item}–{r.last_item} ({r.items}) · {_fmt_s(r.end - r.start)}"
                       f" · pid {r.pid}" + (" · failed" if r.status != "done" else ""))
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{wd:.1f}" height="{row_h}" fill="{color}">'
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
        for status, color in (("done", _GOOD), ("failed", _BAD)):
            d = "".join(f"M{label_w + c * bucket:.0f} {y}h{bucket:.0f}v{row_h}h-{bucket:.0f}z"
                        for c in sorted(cols) if (cols[c] == "done") == (status == "done"))
            if d:
                out.append(f'<path fill="{color}" d="{d}"/>')
    height = 8 + len(workers) * (row_h + 4)
    axis = (f'<text x="{label_w}" y="{height + 10}" font-size="10" fill="currentColor">0</text>'
            f'<text x="{label_w + width}" y="{height + 10}" font-size="10" fill="currentColor" '
            f'text-anchor="end">{_fmt_s(span)}</text>')
    return (f'<svg class="poolmagic-timeline" width="{label_w + width + 4}" height="{height + 14}" '
            f'style="{_FONT}">' + "".join(out) + axis + "</svg>")


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
        noun = "worker " if r.workers == 1 else "workers"
        lines.append(f"  {r.workers:>3} {noun}  {r.throughput:>10.1f} items/s  {bar}{mark}")
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
