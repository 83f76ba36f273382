"""The options are documented from one table: README.md and ``%%poolmap?`` cannot drift.

When an option is added or its help changes, paste ``markdown_table(...)``'s
output into README.md's "## Options" section (the failure message shows it).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from poolmagic.magics import PoolMagics
from poolmagic.options import MAP_OPTIONS, POOLMAP_OPTIONS, POOLSIZE_OPTIONS, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def options_section() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Options\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "README.md has no '## Options' section"
    return m.group(1)


def markdown_tables(text: str) -> list[str]:
    """Each run of consecutive lines starting with '|', as one string."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            tables.append("\n".join(current))
            current = []
    if current:
        tables.append("\n".join(current))
    return tables


def test_the_options_section_has_two_tables():
    assert len(markdown_tables(options_section())) == 2


@pytest.mark.parametrize("which, table", [(0, POOLMAP_OPTIONS), (1, POOLSIZE_OPTIONS)], ids=["poolmap", "poolsize"])
def test_readme_tables_match_the_generated_ones(which, table):
    tables = markdown_tables(options_section())
    expected = markdown_table(table)
    assert tables[which] == expected, (
        "README.md's option table drifted from poolmagic.options; replace it with:\n\n" + expected
    )


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
