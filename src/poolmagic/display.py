"""The map's card and the pool's status: plain data in, text or HTML out.

A run's summary (one text line for terminals, a compact HTML card for
notebooks), the live bar the same card shows while the map runs, and
``%poolsize``'s status line. The timeline and ``--tune`` charts are in
charts.py, the colours and words they share in style.py. Nothing here
publishes or imports IPython: showing things is the magics' job (publish.py).
Rendering is on the per-cell hot path, so every form is plain string
formatting: no templates, no imports beyond the stdlib ``html`` escape.
"""
from __future__ import annotations

import html
from functools import lru_cache
from typing import TYPE_CHECKING

from .style import BAD, BLUE, FONT, GOOD, WARN, call_name, fmt_s, labelled_bar, plural

if TYPE_CHECKING:
    from .diagnose import Analysis
    from .live import Progress
    from .report import RunReport


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


def speedup_words(r: "RunReport", a: "Analysis") -> str:
    """The one speedup figure, with how far to trust it; "" where none is honest."""
    if not r.chunks or r.status != "done" or r.errors:
        return ""  # running, interrupted or failed: the unrun items' time is unknown, so is the gain
    if a.failed:
        return f"speedup unknown ({a.failed})"
    flags = []
    if a.threads:
        flags.append(f"range: workers had {plural(a.threads[0], 'native thread')} each, a loop here "
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


#: a map shorter than this gets no timeline under its card: its chunks are slivers of transport,
#: and drawing them was most of the card's cost (~90 µs of ~130 for 4 chunks); _poolmap.timeline has it
TIMELINE_MIN_S = 0.05
_CARD = f'<div class="poolmagic-summary" style="{FONT};border-left:3px solid %s;padding:1px 8px">'


def summary_bundle(r: "RunReport", progress: "Progress | None" = None) -> dict[str, str]:
    """The card as text and HTML, from one pass over the report (on every cell's path).

    While the map runs (``progress`` given) it is the live bar; at the end the
    same display is updated to the summary: one card per map.
    """
    if progress is not None and progress.status == "running":
        return _running(r, progress)
    return _summary(r, with_html=True)


def _head(r: "RunReport") -> str:
    return _head_of(r.func_name)


@lru_cache(maxsize=256)
def _head_of(func_name: str) -> str:
    """The card's title: the same few functions are mapped cell after cell."""
    return f"<b>poolmagic</b> <code>{html.escape(call_name(func_name))}</code>"


def _running(r: "RunReport", p: "Progress") -> dict[str, str]:
    cores = plural(r.cores, "core")
    text = progress_text(p, r.func_name) + " · running"
    body = progress_body(p)
    return {"text/plain": text,
            "text/html": f"{_CARD % BLUE}{_head(r)} · {body} · {plural(r.pool_size, 'worker')} / {cores}</div>"}


def _summary(r: "RunReport", with_html: bool) -> dict[str, str]:
    """The text form, and the HTML one (its timeline picture included) only when asked.

    On every card's path: each figure is formatted once, and lists that are
    usually empty (notes, findings) are only walked when they are not.
    """
    a = r.analysis()
    items = _counts(r)
    workers = r.workers
    status = r.status
    if status == "cancelled":  # the stopped chunks were never recorded: count the workers they ran on
        workers = max(workers, min(r.pool_size, r.items if r.items is not None else r.pool_size))
    cores = f"{r.cores} core{'s' if r.cores != 1 else ''}"
    words = speedup_words(r, a)
    extra = _status_words(r)
    ok_map = status == "done" and not r.errors
    took = f"{items} in {fmt_s(r.wall_s)}"  # (items: digits and words, nothing to escape)
    used = plural(workers, "worker")
    notes, findings = r.notes, a.findings

    text = [f"poolmagic: {call_name(r.func_name)} · {took}", used, f"{cores} available"]
    cells = [_head(r), took, f"{used} / {cores}"]
    if words:
        text.append(words)
        good = a.efficiency >= 0.7 and a.speedup >= 1 and not a.failed
        label = f"workers busy {a.busy_share:.0%}"
        cells.append(f"{label}{labelled_bar(a.busy_share, 60, GOOD if good else WARN, label)}{html.escape(words)}")
    if extra:
        text.append(extra)
        cells.append(f"<b>{html.escape(extra)}</b>")
    plain = " · ".join(text)
    if notes or findings:
        plain = "\n".join([plain, *(f"  note: {n}" for n in notes), *(f"  why: {f.text}" for f in findings)])
    if not with_html:  # a terminal's repr: no HTML, no timeline picture
        return {"text/plain": plain}

    edge = BAD if not ok_map else (GOOD if not findings and not a.failed else WARN)
    parts = [_CARD % edge, " · ".join(cells)]
    if r.chunks and ok_map:
        parts.append(
            f'<div>time: function {fmt_s(a.busy_s)} · transport {fmt_s(a.transport_s)}'
            f" · idle {fmt_s(a.idle_s)} (over {plural(a.workers, 'worker')})</div>"
        )
    if notes:
        parts += [f"<div>note: {html.escape(n)}</div>" for n in notes]
    if findings:
        parts.append('<ul style="margin:2px 0 0 0;padding-left:18px">'
                     + "".join(f"<li>{html.escape(f.text)}</li>" for f in findings) + "</ul>")
    if len(r.chunks) > 1 and r.wall_s >= TIMELINE_MIN_S:  # one chunk, or a blink, is no picture
        from .charts import timeline_html
        from .timeline import Timeline

        parts.append(f"<details><summary>timeline</summary>{timeline_html(Timeline(r))}</details>")
    parts.append("</div>")
    return {"text/plain": plain, "text/html": "".join(parts)}


def progress_text(p: "Progress", func_name: str | None = None) -> str:
    """tqdm's meter: ``poolmagic work() 37%|███▋      | 3,700/10,000 [00:04<00:07, 812 it/s]``."""
    from tqdm import tqdm

    who = f"poolmagic {call_name(func_name)}" if func_name else "poolmagic"
    if p.waiting and not p.finished:
        return f"{who}: {p.waiting} · {fmt_s(p.elapsed)}"
    if p.starting:
        return f"{who}: workers starting · {fmt_s(p.elapsed)}"
    meter = tqdm.format_meter(p.finished, p.total, p.elapsed, ncols=80, unit=" items", unit_scale=False)
    failed = f" · {p.failed:,} failed" if p.failed else ""
    return f"{who} {meter}{failed}" + (f" · {p.waiting}" if p.waiting else "")


def progress_body(p: "Progress") -> str:
    """The live bar's HTML, labelled, with its counts (failures as they happen)."""
    if p.waiting and not p.finished:
        return f"{html.escape(p.waiting)} · {fmt_s(p.elapsed)}"
    if p.starting:
        return f"workers starting · {fmt_s(p.elapsed)}"
    frac = p.finished / p.total if p.total else 0.0
    eta = f" · ETA {fmt_s(p.eta)}" if p.eta is not None else ""
    of = f"/{p.total:,}" if p.total is not None else ""
    bar = (f"progress {frac:.0%}" + labelled_bar(frac, 160, BAD if p.failed else BLUE, f"progress {frac:.0%}")) if p.total else ""
    body = f"{bar} {p.finished:,}{of} items · {fmt_s(p.elapsed)} · {p.rate:,.1f} items/s{eta}"
    if p.failed:
        body += f" · <b>{p.failed:,} failed</b>"
    if p.waiting:
        body += f" · {html.escape(p.waiting)}"
    return body


def progress_html(p: "Progress") -> str:
    return f'<div class="poolmagic-progress" style="{FONT}"><b>poolmagic</b> {progress_body(p)}</div>'


def status_text(size: int, description: str, cores: int, threads: int, state: str,
                max_memory: int | None = None) -> str:
    """``%poolsize``'s line: workers, backend, cores, native threads, memory limit, warmth."""
    from .engine.memory import fmt_size

    warm = {"warm": "pool warm", "starting": "pool starting"}.get(state, "pool cold (starts on first use)")
    limit = f" · at most {fmt_size(max_memory)} per worker" if max_memory else ""
    return (
        f"poolmagic: {plural(size, 'worker')} · {description} · {cores} core{'s' if cores != 1 else ''} "
        f"available · {plural(threads, 'native thread')} per worker{limit} · {warm}"
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
    return f'<div class="poolmagic-status" style="{FONT}">' + "<br>".join(out) + "</div>"


