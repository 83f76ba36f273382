"""The documentation's gallery notebooks, executed in a real kernel as the site build does.

Each notebook asserts its own results against a plain loop; here it must run
top to bottom (a cell tagged ``raises-exception`` may fail, as the site shows),
be saved without outputs, and show one poolmagic summary per map.
"""
from __future__ import annotations

import importlib.util

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from nbclient import NotebookClient

from e2e_helpers import REPO, new_kernel_manager
from e2e_helpers import kernel_spec_manager  # noqa: F401  (a fixture)

GALLERY = REPO / "docs" / "gallery"
NOTEBOOKS = sorted(p.stem for p in GALLERY.glob("*.ipynb")) if GALLERY.is_dir() else []
NEEDS = {"multistart": "scipy", "pandas_groupby": "pandas"}

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not NOTEBOOKS, reason=f"no gallery notebooks in {GALLERY} (not shipped here)"),
]


def test_the_gallery_has_the_six_workloads():
    assert set(NOTEBOOKS) == {"checkpoint", "image_tiles", "monte_carlo", "multistart", "pandas_groupby", "waiting"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_gallery_notebook_runs(name, kernel_spec_manager, tmp_path):  # noqa: F811
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{name}.ipynb needs {NEEDS[name]}, not installed here (the docs extra has it)")
    path = GALLERY / f"{name}.ipynb"
    saved = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(saved)
    assert all(c.outputs == [] for c in saved.cells if c.cell_type == "code"), "saved with outputs"

    nb = nbformat.read(path, as_version=4)
    km = new_kernel_manager(kernel_spec_manager, AsyncKernelManager)
    NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()

    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.startswith("%%poolmap"):
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert bool(errors) == ("raises-exception" in cell.metadata.get("tags", [])), cell.source
        if "-q" not in cell.source.split("\n")[0].split():
            shown = [o for o in cell.outputs if o.output_type == "display_data"
                     and o.data.get("text/plain", "").startswith("poolmagic:")]
            assert len(shown) == 1, (cell.source, cell.outputs)
