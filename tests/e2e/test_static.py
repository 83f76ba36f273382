"""What a saved, executed notebook shows without a kernel: nbconvert's HTML.

``examples/quickstart.ipynb`` runs in a real kernel (nbclient, this test
process's own Python, see e2e_helpers.py), with one more cell whose map runs
well over LiveProgress.DELAY_S so that a progress bar is certain to show. The
executed notebook is rendered to HTML as nbconvert (and GitHub, and any other
static viewer) does, and must hold only static forms: every map's summary card,
every progress bar in its completed form (✔), no ipywidgets output that a
viewer without a kernel would show as "Error displaying widget".

Needs nbconvert (``pip install -e .[browser]``); skipped, saying so, without it.
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

nbconvert = pytest.importorskip("nbconvert", reason="the static HTML test needs nbconvert: pip install -e .[browser]")

WIDGET = "application/vnd.jupyter.widget-view+json"
# Sure to run > 0.5 s, so sure to show a progress bar: 6 items of 0.4 s, one per chunk.
SLOW = "%%poolmap -c 1 range(6)\nimport time\n\n\ndef slow_double(x):\n    time.sleep(0.4)\n    return 2 * x"
WALL = re.compile(r"^poolmagic: [\d,/]+ items? in ([\d.]+) (µs|ms|s|min)\b")
UNIT_S = {"µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def _descendants() -> set[psutil.Process]:
    return {p for p in psutil.Process().children(recursive=True) if alive(p)}


@pytest.fixture(scope="module")
def executed(kernel_spec_manager):
    """quickstart.ipynb plus the slow cell, executed; no process of it left behind."""
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(SLOW))
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
    nb = executed
    maps = [k for k, c in enumerate(nb.cells) if c.cell_type == "code" and "%poolmap" in c.source]
    assert len(maps) >= 6, [nb.cells[k].source.splitlines()[0] for k in maps]
    widgets = [(k, o) for k, o in _displays(nb) if WIDGET in o.get("data", {})]
    assert not widgets, f"widget outputs saved: {widgets}"
    assert not nb.metadata.get("widgets"), nb.metadata.get("widgets")

    long_maps = 0
    for k in maps:
        outs = [o for o in nb.cells[k].outputs if o.output_type == "display_data"]
        summaries = [o for o in outs if o.data.get("text/plain", "").startswith("poolmagic:")]
        bars = [o for o in outs if o.data.get("text/plain", "").startswith("poolmagic ")]
        assert len(summaries) == 1, (nb.cells[k].source, outs)
        assert 'class="poolmagic-summary"' in summaries[0].data["text/html"]
        for bar in bars:  # the completed form, never the live one
            assert bar.data["text/plain"].startswith("poolmagic ✔ "), bar.data
            assert re.match(r'<div class="poolmagic-progress"[^>]*><b>poolmagic</b> ✔', bar.data["text/html"]), bar.data
            assert "ETA" not in bar.data["text/html"] and "workers starting" not in bar.data["text/html"]
        m = WALL.match(summaries[0].data["text/plain"])
        assert m, summaries[0].data["text/plain"]
        # a map well over the 0.5 s delay showed a bar (its first redraw comes at a wait tick past it)
        if float(m[1]) * UNIT_S[m[2]] > 1.0:
            long_maps += 1
            assert len(bars) == 1, (nb.cells[k].source, summaries[0].data["text/plain"], outs)
    assert long_maps >= 1  # the slow cell at least


@pytest.mark.timeout(120)
def test_html_export_shows_summaries_and_completed_bars(executed, tmp_path):
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(executed)
    (tmp_path / "quickstart.html").write_text(body, encoding="utf-8")

    maps = sum(1 for c in executed.cells if c.cell_type == "code" and "%poolmap" in c.source)
    assert body.count('class="poolmagic-summary"') == maps
    bars = re.findall(r'<div class="poolmagic-progress"[^>]*>(.{0,40})', body)
    assert bars and all(b.startswith("<b>poolmagic</b> ✔") for b in bars), bars
    # in a summary's <details>, for every map that ran more than one chunk
    assert 1 <= body.count('<svg class="poolmagic-timeline"') <= maps
    assert re.search(r"<details><summary>timeline</summary><svg class=\"poolmagic-timeline\"", body)
    assert "speedup" in body and "items/s" in body
    assert WIDGET not in body and "Error displaying widget" not in body
    assert os.path.getsize(tmp_path / "quickstart.html") < 2_000_000
