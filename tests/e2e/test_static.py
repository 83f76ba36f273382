"""What a saved, executed notebook shows without a kernel: nbconvert's HTML.

``examples/quickstart.ipynb`` runs in a real kernel (nbclient, this test
process's own Python, see e2e_helpers.py), with one more cell whose map runs
well over LiveProgress.DELAY_S so that a progress bar is certain to show. The
executed notebook is rendered to HTML as nbconvert (and GitHub, and any other
static viewer) does, and must hold only static forms: one card per map (the
live bar became the summary in place), no ipywidgets output or widget state
that a viewer without a kernel would show as "Error displaying widget" — with
ipywidgets installed (the test extra has it), as users have it — and an
``--async`` map's card in its final state once a later cell's ``.get()`` returned.

The HTML export needs nbconvert (``pip install -e .[browser]``); skipped, saying so, without it.
"""
from __future__ import annotations

import os
import re
import time

import e2e_helpers
import nbformat
import psutil
import pytest
from e2e_helpers import (
    EXAMPLES,
    KERNEL_ARGS,
    alive,
    describe,
    kill_all,
    new_kernel_manager,
)
from jupyter_client import AsyncKernelManager
from nbclient import NotebookClient

kernel_spec_manager = e2e_helpers.kernel_spec_manager  # the fixture, used by this module


WIDGET = "application/vnd.jupyter.widget-view+json"
# Sure to run > 0.5 s, so sure to show a progress bar: 6 items of 0.4 s, one per chunk.
SLOW = "%%poolmap -c 1 range(6)\nimport time\n\n\ndef slow_double(x):\n    time.sleep(0.4)\n    return 2 * x"
ASYNC = ("%%poolmap --async -o later -c 1 range(6)\nimport time\n\n\ndef later_double(x):\n"
         "    time.sleep(0.3)\n    return 2 * x")
GET = "print(later.get(60))"
WALL = re.compile(r"^poolmagic: .+? · [\d,/]+ items?(?: \([^)]*\))? in ([\d.]+) (µs|ms|s|min)\b")
UNIT_S = {"µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def _descendants() -> set[psutil.Process]:
    return {p for p in psutil.Process().children(recursive=True) if alive(p)}


@pytest.fixture(scope="module")
def executed(kernel_spec_manager):
    """quickstart.ipynb plus the slow cell, executed; no process of it left behind."""
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(c) for c in (SLOW, ASYNC, GET)]
    before = _descendants()
    km = new_kernel_manager(kernel_spec_manager, AsyncKernelManager)
    client = NotebookClient(nb, km=km, timeout=60, extra_arguments=KERNEL_ARGS,
                            resources={"metadata": {"path": str(EXAMPLES)}})
    try:
        client.execute(cleanup_kc=True)  # given a km, nbclient leaves its kernel running unless told
    finally:
        deadline = time.monotonic() + 15
        while (left := _descendants() - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_all(left)
    assert not left, f"left running after the notebook's kernel shut down: {describe(left)}"
    return nb


def _displays(nb) -> list[tuple[int, dict]]:
    """(cell index, output) of every display in the notebook."""
    return [(k, o) for k, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.outputs if o.output_type in ("display_data", "execute_result")]


@pytest.mark.timeout(120)
def test_executed_notebook_holds_only_static_forms(executed):
    import ipywidgets  # noqa: F401  (installed: tqdm.auto and widget bars would have used it)

    nb = executed
    maps = [k for k, c in enumerate(nb.cells) if c.cell_type == "code" and "%poolmap" in c.source]
    assert len(maps) >= 7, [nb.cells[k].source.splitlines()[0] for k in maps]
    widgets = [(k, o) for k, o in _displays(nb) if WIDGET in o.get("data", {})]
    assert not widgets, f"widget outputs saved: {widgets}"
    assert not nb.metadata.get("widgets"), nb.metadata.get("widgets")
    assert "application/vnd.jupyter.widget-state+json" not in str(nb.metadata)

    long_maps = 0
    for k in maps:
        outs = [o for o in nb.cells[k].outputs if o.output_type == "display_data"]
        cards = [o for o in outs if o.data.get("text/plain", "").startswith("poolmagic")]
        assert len(cards) == 1, ("one card per map", nb.cells[k].source, outs)  # no bar and summary
        card = cards[0].data
        assert 'class="poolmagic-summary"' in card["text/html"]
        assert "ETA" not in card["text/html"] and "running" not in card["text/plain"], card
        m = WALL.match(card["text/plain"])
        assert m, card["text/plain"]
        if float(m[1]) * UNIT_S[m[2]] >= 0.85:  # (sleeps never end early: these two take >= 0.9 s)
            long_maps += 1
    assert long_maps >= 2  # the slow cell (6 x 0.4 s on 2 workers) and the async one (6 x 0.3 s)
    later = [k for k in maps if "--async" in nb.cells[k].source][-1]
    final = nb.cells[later].outputs[0].data["text/plain"]
    assert final.startswith("poolmagic: later_double() · 6 items in") and "running" not in final, final


@pytest.mark.timeout(120)
def test_html_export_shows_one_card_per_map_and_loads_nothing(executed, tmp_path):
    pytest.importorskip("nbconvert", reason="the static HTML test needs nbconvert: pip install -e .[browser]")
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(executed)
    (tmp_path / "quickstart.html").write_text(body, encoding="utf-8")

    maps = sum(1 for c in executed.cells if c.cell_type == "code" and "%poolmap" in c.source)
    assert body.count('class="poolmagic-summary"') == maps
    assert 'class="poolmagic-progress"' not in body  # the bars became the cards
    assert "html-manager" not in body and "jupyter-widgets" not in body  # no widget manager from a CDN
    # in a summary's <details>, for every map that ran more than one chunk
    # (nbconvert may write an element's attributes in another order: find the class among them)
    assert 1 <= len(re.findall(r'<svg [^>]*class="poolmagic-timeline"', body)) <= maps
    assert re.search(r'<details><summary>timeline</summary><svg [^>]*class="poolmagic-timeline"', body)
    assert "speedup" in body
    assert WIDGET not in body and "Error displaying widget" not in body
    assert os.path.getsize(tmp_path / "quickstart.html") < 2_000_000
