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


def call_name(name: str) -> str:
    """``work()``; a name that already reads as a call (``partial(scale, ...)``) as it is."""
    return name if name.endswith(")") else f"{name}()"


def _fmt_s(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def _counts(r: "RunReport") -> str:
    """The same counts on the card, the bar and the text: items ran of total, ok and failed."""
    total = r.items if r.items is not None else len(r.results)
    failed = len(r.errors)
    ran = r.done + failed
    if not failed and ran >= total and r.status != "running":
        return f"{total:,} item{'s' if total != 1 else ''}"
    head = f"{ran:,}/{total:,} items" if ran < total else f"{total:,} items"
    return head + (f" ({r.done:,} ok, {failed:,} failed)" if failed else "")


def _status_words(r: "RunReport") -> str:
    parts = []
    if r.resumed:
        parts.append(f"resumed: {r.resumed[0]:,} kept, {r.resumed[1]:,} run")
    if r.retried:
        parts.append(f"{r.retried:,} retried")
    if r.status == "cancelled":
        parts.append("interrupted")
    elif r.status == "running":
        parts.append("running" if r.chunks else "workers starting")
    elif r.status == "failed" or (r.errors and r.status != "running"):
        parts.append("failed")
    return " · ".join(parts)


# Colours come from the notebook's theme (JupyterLab's --jp-* variables, then
# VS Code's), with fallbacks that read on light and dark backgrounds alike.
# Text takes the theme's content colour: contrast is the theme's.
_TEXT = "var(--jp-content-font-color1,var(--vscode-editor-foreground,inherit))"
_FONT = ("font-family:var(--jp-ui-font-family,system-ui,sans-serif);font-size:var(--jp-code-font-size,13px);"
         f"color:{_TEXT}")
_TRACK = "var(--jp-layout-color3,rgba(127,127,127,.28))"
_GOOD = "var(--jp-success-color1,#2e9e4f)"
_WARN = "var(--jp-warn-color1,#d98a00)"
_BAD = "var(--jp-error-color1,#d84040)"
_BLUE = "var(--jp-brand-color1,#3b82f6)"
_GREY = "var(--jp-layout-color4,#9ca3af)"


def speedup_words(r: "RunReport", a: "Analysis") -> str:
    """The one speedup figure, with how far to trust it; "" where none is honest."""
    if not r.chunks or r.status != "done" or r.errors:
        return ""  # running, interrupted or failed: the unrun items' time is unknown, so is the gain
    if a.failed:
        return f"speedup unknown ({a.failed})"
    flags = []
    if a.threads:
        flags.append(f"range: workers had {_plural(a.threads[0], 'native thread')} each, a loop here "
                     f"{a.threads[1]}; the low end if they would have sped the loop up")
    if a.contended:
        flags.append(f"host contended: other processes held the CPUs, a loop here would have had "
                     f"{a.loop_share:.0%} of one")
    tail = f" ({'; '.join(flags)})" if flags else ""
    if a.speedup_high < 1 and not a.contended:
        return f"slower than a plain loop (speedup {a.speedup_text}){tail}"
    return f"speedup {a.speedup_text}{tail}"


def summary_text(r: "RunReport") -> str:
    """``poolmagic: work() · 10,000 items in 0.84 s · 2 workers · 2 cores available · speedup ≈1.93×``

    A line per finding when parallelism did not pay and it changes what to do (diagnose.py).
    """
    return _summary(r, with_html=False)["text/plain"]


def summary_html(r: "RunReport") -> str:
    return summary_bundle(r)["text/html"]


def _bar(frac: float, width: int, color: str, label: str) -> str:
    """A labelled bar: ``label`` is read by screen readers and shown on hover; callers print it too."""
    frac = min(max(frac, 0.0), 1.0)
    return _BAR % (html.escape(label), html.escape(label), round(frac * 100), width, _TRACK, frac * width, color)


_BAR = ('<span role="progressbar" aria-label="%s" title="%s" aria-valuenow="%d" aria-valuemin="0" '
        'aria-valuemax="100" style="display:inline-block;width:%dpx;height:8px;background:%s;border-radius:4px;'
        'vertical-align:middle;margin:0 4px"><span style="display:block;height:8px;width:%.0fpx;'
        'background:%s;border-radius:4px"></span></span>')
_CARD = f'<div class="poolmagic-summary" style="{_FONT};border-left:3px solid %s;padding:1px 8px">'


def summary_bundle(r: "RunReport", progress: "Progress | None" = None) -> dict[str, str]:
    """The card as text and HTML, from one pass over the report (on every cell's path).

    While the map runs (``progress`` given) it is the live bar; at the end the
    same display is updated to the summary: one card per map.
    """
    if progress is not None and progress.status == "running":
        return _running(r, progress)
    return _summary(r, with_html=True)


def _head(r: "RunReport") -> str:
    return f"<b>poolmagic</b> <code>{html.escape(call_name(r.func_name))}</code>"


def _running(r: "RunReport", p: "Progress") -> dict[str, str]:
    cores = _plural(r.cores, "core")
    text = progress_text(p, r.func_name) + " · running"
    body = progress_body(p)
    return {"text/plain": text,
            "text/html": f"{_CARD % _BLUE}{_head(r)} · {body} · {_plural(r.pool_size, 'worker')} / {cores}</div>"}


def _summary(r: "RunReport", with_html: bool) -> dict[str, str]:
    """The text form, and the HTML one (its timeline picture included) only when asked."""
    a = r.analysis()
    items = _counts(r)
    workers = r.workers
    if r.status == "cancelled":  # the stopped chunks were never recorded: count the workers they ran on
        workers = max(workers, min(r.pool_size, r.items if r.items is not None else r.pool_size))
    cores = f"{r.cores} core{'s' if r.cores != 1 else ''}"
    words = speedup_words(r, a)
    extra = _status_words(r)
    ok_map = r.status == "done" and not r.errors

    text = [f"poolmagic: {call_name(r.func_name)} · {items} in {_fmt_s(r.wall_s)}", _plural(workers, "worker"),
            f"{cores} available"]
    cells = [_head(r), f"{html.escape(items)} in {_fmt_s(r.wall_s)}", f"{_plural(workers, 'worker')} / {cores}"]
    if words:
        text.append(words)
        good = a.efficiency >= 0.7 and a.speedup >= 1 and not a.failed
        label = f"workers busy {a.busy_share:.0%}"
        cells.append(f"{label}{_bar(a.busy_share, 60, _GOOD if good else _WARN, label)}{html.escape(words)}")
    if extra:
        text.append(extra)
        cells.append(f"<b>{html.escape(extra)}</b>")
    lines = [" · ".join(text)]
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"  why: {f.text}" for f in a.findings]
    if not with_html:  # a terminal's repr: no HTML, no timeline picture
        return {"text/plain": "\n".join(lines)}

    edge = _BAD if not ok_map else (_GOOD if not a.findings and not a.failed else _WARN)
    parts = [_CARD % edge, " · ".join(cells)]
    if r.chunks and ok_map:
        parts.append(
            f'<div>time: function {_fmt_s(a.busy_s)} · transport {_fmt_s(a.transport_s)}'
            f" · idle {_fmt_s(a.idle_s)} (over {_plural(a.workers, 'worker')})</div>"
        )
    parts += [f"<div>note: {html.escape(n)}</div>" for n in r.notes]
    if a.findings:
        parts.append('<ul style="margin:2px 0 0 0;padding-left:18px">'
                     + "".join(f"<li>{html.escape(f.text)}</li>" for f in a.findings) + "</ul>")
    if len(r.chunks) > 1:  # one chunk is no picture
        from .timeline import Timeline

        parts.append(f"<details><summary>timeline</summary>{timeline_html(Timeline(r))}</details>")
    parts.append("</div>")
    return {"text/plain": "\n".join(lines), "text/html": "".join(parts)}


def progress_text(p: "Progress", func_name: str | None = None) -> str:
    """tqdm's meter: ``poolmagic work() 37%|███▋      | 3,700/10,000 [00:04<00:07, 812 it/s]``."""
    from tqdm import tqdm

    who = f"poolmagic {call_name(func_name)}" if func_name else "poolmagic"
    if p.waiting and not p.finished:
        return f"{who}: {p.waiting} · {_fmt_s(p.elapsed)}"
    if p.starting:
        return f"{who}: workers starting · {_fmt_s(p.elapsed)}"
    meter = tqdm.format_meter(p.finished, p.total, p.elapsed, ncols=80, unit=" items", unit_scale=False)
    failed = f" · {p.failed:,} failed" if p.failed else ""
    return f"{who} {meter}{failed}" + (f" · {p.waiting}" if p.waiting else "")


def progress_body(p: "Progress") -> str:
    """The live bar's HTML, labelled, with its counts (failures as they happen)."""
    if p.waiting and not p.finished:
        return f"{html.escape(p.waiting)} · {_fmt_s(p.elapsed)}"
    if p.starting:
        return f"workers starting · {_fmt_s(p.elapsed)}"
    frac = p.finished / p.total if p.total else 0.0
    eta = f" · ETA {_fmt_s(p.eta)}" if p.eta is not None else ""
    of = f"/{p.total:,}" if p.total is not None else ""
    bar = (f"progress {frac:.0%}" + _bar(frac, 160, _BAD if p.failed else _BLUE, f"progress {frac:.0%}")) if p.total else ""
    body = f"{bar} {p.finished:,}{of} items · {_fmt_s(p.elapsed)} · {p.rate:,.1f} items/s{eta}"
    if p.failed:
        body += f" · <b>{p.failed:,} failed</b>"
    if p.waiting:
        body += f" · {html.escape(p.waiting)}"
    return body


def progress_html(p: "Progress") -> str:
    return f'<div class="poolmagic-progress" style="{_FONT}"><b>poolmagic</b> {progress_body(p)}</div>'


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
    slow = t.slowest(5)
    return ", ".join(f"item {i} {_fmt_s(s)}" for i, s in slow)


def timeline_text(t: "Timeline", width: int = 60) -> str:
    """One line per worker: ``█`` ran, ``×`` failed, ``·`` idle; an axis; the slowest items."""
    if not t.rows:
        return "(no chunks)"
    span = max(t.wall_s, max(r.end for r in t.rows), 1e-9)
    lines = [f"timeline: {len(t.rows):,} chunks over {_fmt_s(span)} (█ chunk ran · × chunk failed · · idle)"]
    for w in t.workers():
        cells = ["·"] * width
        for r in (r for r in t.rows if r.worker == w):
            a, b = int(r.start / span * width), max(int(r.start / span * width) + 1, int(r.end / span * width))
            for k in range(max(a, 0), min(b, width)):
                cells[k] = "×" if r.status != "done" else "█"
        lines.append(f"  worker {w:>3} |{''.join(cells)}|")
    lines.append(f"{'':13}0{_fmt_s(span):>{width + 1}}")
    lines.append(f"  slowest: {_slowest_words(t)}")
    return "\n".join(lines)


MAX_RECTS = 4000  # an SVG of at most ~200 KB, whatever the number of chunks
_HATCH = ('<defs><pattern id="poolmagic-failed" width="6" height="6" patternUnits="userSpaceOnUse" '
          f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{_BAD}"/>'
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
        out.append(f'<rect x="{label_w}" y="{y}" width="{width}" height="{row_h}" fill="{_TRACK}"/>')
        rows = [r for r in t.rows if r.worker == w]
        if detailed:
            for r in rows:
                x = label_w + r.start / span * width
                wd = max((r.end - r.start) / span * width, 1.0)
                fill = _FAILED_FILL if r.status != "done" else _GOOD
                tip = (f"items {r.first_item}–{r.last_item} ({r.items}) · {_fmt_s(r.end - r.start)}"
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
        for status, fill in (("done", _GOOD), ("failed", _FAILED_FILL)):
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
                    f'text-anchor="{anchor}">{_fmt_s(tick) if tick else "0"}</text>')
    ly = height + 30
    failed = any(r.status != "done" for r in t.rows)
    legend = (f'<rect x="{label_w}" y="{ly - 9}" width="14" height="10" fill="{_GOOD}"/>'
              f'<text x="{label_w + 18}" y="{ly}" font-size="11" fill="currentColor">chunk ran</text>'
              f'<rect x="{label_w + 90}" y="{ly - 9}" width="14" height="10" fill="{_FAILED_FILL}"/>'
              f'<text x="{label_w + 108}" y="{ly}" font-size="11" fill="currentColor">chunk with a failed item'
              f'{"" if failed else " (none)"}</text>'
              f'<rect x="{label_w + 290}" y="{ly - 9}" width="14" height="10" fill="{_TRACK}"/>'
              f'<text x="{label_w + 308}" y="{ly}" font-size="11" fill="currentColor">idle · time since the map started</text>')
    return (f'<svg class="poolmagic-timeline" width="{label_w + width + 4}" height="{ly + 6}" role="img" '
            f'aria-label="chunks per worker over time" style="{_FONT}">' + "".join(out) + "".join(axis) + legend
            + "</svg>")


def timeline_html(t: "Timeline") -> str:
    """The SVG and, under it, the slowest items (as mpire's insights list them)."""
    if not t.rows:
        return ""
    return (timeline_svg(t)
            + f'<div class="poolmagic-slowest" style="{_FONT}">slowest: {html.escape(_slowest_words(t))}</div>')


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


_URL = __import__("re").compile(r"https?://[^\s<>\"')]+")


def status_html(text: str) -> str:
    """``%poolsize``'s lines as HTML: theme colours, and links (a dask dashboard) as links."""
    out = []
    for line in text.splitlines():
        parts, last = [], 0
        for m in _URL.finditer(line):
            url = m.group(0)
            parts += [html.escape(line[last:m.start()]),
                      f'<a href="{html.escape(url)}" target="_blank" rel="noopener" '
                      f'style="color:var(--jp-content-link-color,inherit);text-decoration:underline">{html.escape(url)}</a>']
            last = m.end()
        parts.append(html.escape(line[last:]))
        out.append("".join(parts))
    return f'<div class="poolmagic-status" style="{_FONT}">' + "<br>".join(out) + "</div>"


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
        color = _GOOD if r.workers == t.chosen and not t.kept else _GREY
        y = 4 + 22 * k
        lo, hi = 60 + r.low * scale, 60 + r.high * scale
        bars.append(
            f'<text x="0" y="{y + 13}" font-size="11" fill="currentColor">{_plural(r.workers, "worker")}</text>'
            f'<rect x="60" y="{y}" width="{w:.0f}" height="16" fill="{color}"><title>median of {len(r.walls)} samples'
            f'</title></rect>'
            f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{y + 8}" y2="{y + 8}" stroke="currentColor" stroke-width="1.5"/>'
            f'<line x1="{lo:.1f}" x2="{lo:.1f}" y1="{y + 3}" y2="{y + 13}" stroke="currentColor"/>'
            f'<line x1="{hi:.1f}" x2="{hi:.1f}" y1="{y + 3}" y2="{y + 13}" stroke="currentColor"/>'
            f'<text x="{max(w, hi - 60) + 66:.0f}" y="{y + 13}" font-size="11" fill="currentColor">'
            f"{r.throughput:,.0f}/s</text>"
        )
    svg = (f'<svg width="380" height="{8 + 22 * len(t.rows)}" role="img" aria-label="items per second per pool size" '
           f'style="color:{_TEXT}">' + "".join(bars) + "</svg>")
    rows = "".join(
        f"<tr><td>{r.workers}</td><td>{r.threads}</td><td>{r.items:,}</td><td>{r.throughput:,.1f}</td>"
        f"<td>{r.low:,.1f}–{r.high:,.1f}</td><td>{r.speedup_text}</td>"
        f"<td>{'host busy' if r.contended else ''}</td></tr>"
        for r in t.rows
    )
    verb = "pool size kept at" if t.kept else "pool size set to"
    return (
        f'<div class="poolmagic-tune" style="{_FONT}">'
        f"<b>poolmagic --tune</b> <code>{html.escape(call_name(t.func_name))}</code> · {t.cores} cores available · "
        f"{len(t.rows[0].walls)} samples per size (bar: median, line: range)<br>"
        f'{svg}<table><tr><th>workers</th><th>native threads each</th><th>items per sample</th>'
        f"<th>items/s (median)</th><th>range</th><th>speedup</th><th></th></tr>{rows}</table>"
        f"<b>{verb} {t.chosen}</b>: {html.escape(t.reason)}</div>"
    )
