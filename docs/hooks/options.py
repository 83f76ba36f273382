"""MkDocs hook: the option sections of docs/magics.md come from poolmagic.options.

A page writes ``<!-- options: poolmap -->`` (or ``poolsize``); the hook puts
there one section per option, from the same table that parses the magic line
and that ``%%poolmap?`` prints, so the site cannot drift from the code.
"""
from __future__ import annotations

import re

_MARK = re.compile(r"<!--\s*options:\s*(poolmap|poolsize)\s*-->")


def option_sections(which: str) -> str:
    """Markdown: a heading and the help sentence per option of ``%%poolmap`` or ``%poolsize``."""
    from poolmagic.options import POOLMAP_OPTIONS, POOLSIZE_OPTIONS

    table = POOLMAP_OPTIONS if which == "poolmap" else POOLSIZE_OPTIONS
    out = []
    for o in table:
        left = ", ".join(o.names) + (f" {o.metavar}" if o.metavar else "")
        anchor = f"{which}-{o.names[-1].lstrip('-')}"
        out.append(f"#### `{left}` {{#{anchor}}}\n\n{o.help[0].upper()}{o.help[1:]}.\n")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    return _MARK.sub(lambda m: option_sections(m.group(1)), markdown)
