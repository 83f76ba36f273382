"""The options are documented from one table: the site, README.md and ``%%poolmap?`` cannot drift.

The site's option sections (docs/magics.md) are generated from
``poolmagic.options`` by docs/hooks/options.py at build time. README.md shows
the most used options: each of its rows must be the generated row for that
option (the failure message shows what to paste).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from poolmagic.magics import PoolMagics
from poolmagic.options import MAP_OPTIONS, POOLMAP_OPTIONS, POOLSIZE_OPTIONS, markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAGICS_PAGE = ROOT / "docs" / "magics.md"
HOOK = ROOT / "docs" / "hooks" / "options.py"


def options_section() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Options\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "README.md has no '## Options' section"
    return m.group(1)


def table_rows(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.startswith("| `")]


def test_readme_rows_are_the_generated_ones():
    generated = set(table_rows(markdown_table(POOLMAP_OPTIONS)))
    rows = table_rows(options_section())
    assert len(rows) >= 8, "README.md's Options table lost its rows"
    for row in rows:
        assert row in generated, (
            f"README.md's option row drifted from poolmagic.options:\n  {row}\nthe generated rows are:\n"
            + markdown_table(POOLMAP_OPTIONS)
        )


def _hook():
    if not HOOK.is_file():
        pytest.skip(f"{HOOK} is not here (not shipped in this distribution)")
    spec = importlib.util.spec_from_file_location("options_hook", HOOK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("which, table", [("poolmap", POOLMAP_OPTIONS), ("poolsize", POOLSIZE_OPTIONS)])
def test_the_site_has_a_section_per_option(which, table):
    page = MAGICS_PAGE.read_text(encoding="utf-8")
    assert f"<!-- options: {which} -->" in page
    rendered = _hook().on_page_markdown(page, None, None, None)
    for o in table:
        left = ", ".join(o.names) + (f" {o.metavar}" if o.metavar else "")
        assert f"#### `{left}` {{#{which}-{o.names[-1].lstrip('-')}}}" in rendered, left


def test_every_map_option_is_in_the_magic_table():
    names = {n for o in POOLMAP_OPTIONS for n in o.names}
    for o in MAP_OPTIONS:
        assert set(o.names) <= names


def test_option_names_are_unique():
    for table in (POOLMAP_OPTIONS, POOLSIZE_OPTIONS):
        names = [n for o in table for n in o.names]
        assert len(names) == len(set(names)), names
        dests = [o.dest for o in table]
        assert len(dests) == len(set(dests)), dests


def test_poolmap_help_lists_every_option():
    doc = PoolMagics.poolmap.__doc__
    assert doc, "%%poolmap? shows nothing"
    for o in POOLMAP_OPTIONS:
        for name in o.names:
            assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", doc, re.M), f"{name} missing from %%poolmap?"
        assert o.help in doc, f"the help of {o.names[-1]} is missing from %%poolmap?"


def test_poolsize_help_lists_every_option():
    doc = PoolMagics.poolsize.__doc__
    for o in POOLSIZE_OPTIONS:
        for name in o.names:
            assert name in doc, f"{name} missing from %poolsize?"
