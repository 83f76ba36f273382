"""What every rendering shares: the notebook theme's colours, the font, a labelled
bar, and the words for durations, counts and calls.

The summary card and the live bar (display.py) and the timeline and ``--tune``
charts (charts.py) are drawn from these, so a colour or a duration reads the
same everywhere. Plain string formatting, on the per-cell hot path.
"""
from __future__ import annotations

import html


def call_name(name: str) -> str:
    """``work()``; a name that already reads as a call (``partial(scale, ...)``) as it is."""
    return name if name.endswith(")") else f"{name}()"


def fmt_s(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


# Colours come from the notebook's theme (JupyterLab's --jp-* variables, then
# VS Code's), with fallbacks that read on light and dark backgrounds alike.
# Text takes the theme's content colour: contrast is the theme's.
TEXT = "var(--jp-content-font-color1,var(--vscode-editor-foreground,inherit))"
FONT = ("font-family:var(--jp-ui-font-family,system-ui,sans-serif);font-size:var(--jp-code-font-size,13px);"
        f"color:{TEXT}")
TRACK = "var(--jp-layout-color3,rgba(127,127,127,.28))"
GOOD = "var(--jp-success-color1,#2e9e4f)"
WARN = "var(--jp-warn-color1,#d98a00)"
BAD = "var(--jp-error-color1,#d84040)"
BLUE = "var(--jp-brand-color1,#3b82f6)"
GREY = "var(--jp-layout-color4,#9ca3af)"


def labelled_bar(frac: float, width: int, color: str, label: str) -> str:
    """A labelled bar: ``label`` is read by screen readers and shown on hover; callers print it too."""
    frac = min(max(frac, 0.0), 1.0)
    label = html.escape(label)
    return _BAR % (label, label, round(frac * 100), width, TRACK, frac * width, color)


_BAR = ('<span role="progressbar" aria-label="%s" title="%s" aria-valuenow="%d" aria-valuemin="0" '
        'aria-valuemax="100" style="display:inline-block;width:%dpx;height:8px;background:%s;border-radius:4px;'
        'vertical-align:middle;margin:0 4px"><span style="display:block;height:8px;width:%.0fpx;'
        'background:%s;border-radius:4px"></span></span>')
