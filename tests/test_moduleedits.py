"""A local module edited or reloaded during the session: every map runs the kernel's copy, or is refused.

The plain loop runs the copy of ``mylib`` the kernel imported. A worker
imports the file. Before this, a file edited without a reload made a map
return the new file's answers beside a loop's old ones (local workers are
replaced when the file changes), and a reload left a dask worker on the old
copy: both without a word.
"""
from __future__ import annotations

import importlib
import itertools
import os
import sys
import time
import uuid

import pytest

import poolmagic
from poolmagic import moduleedits
from poolmagic.errors import BadInputError

_clock = itertools.count(1)


def write(path, text: str) -> None:
    """Write a module's file with an mtime later than any before (so an import sees a new version)."""
    path.write_text(text)
    t = time.time() + 3 * next(_clock)
    os.utime(path, (t, t))


@pytest.fixture
def lib(tmp_path, monkeypatch):
    """A fresh local module's name and file, importable here and by the workers (sys.path travels)."""
    name = f"mylib_{uuid.uuid4().hex[:8]}"
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / f"{name}.py"
    yield name, path
    sys.modules.pop(name, None)


def load(name: str, path, text: str):
    write(path, text)
    importlib.invalidate_caches()
    return importlib.import_module(name)


V1 = "SCALE = 1\n\nclass Box:\n    def size(self):\n        return 1\n\ndef f(x):\n    return x + SCALE\n"


# ------------------------------------------------------------------ what differs, unit by unit
def test_an_unchanged_file_is_not_behind(lib):
    name, path = lib
    mod = load(name, path, V1)
    assert moduleedits.behind(mod) is None


def test_comments_and_moved_lines_are_not_a_change(lib):
    name, path = lib
    mod = load(name, path, V1)
    write(path, "# a comment\n\n\n" + V1.replace("def f(x):", "# why\ndef f(x):"))
    assert moduleedits.behind(mod) is None


@pytest.mark.parametrize("edited, says", [
    (V1.replace("x + SCALE", "x - SCALE"), "f() in the file differs"),
    (V1.replace("return 1", "return 2"), "Box.size() in the file differs"),
    (V1.replace("SCALE = 1", "SCALE = 2"), "SCALE is 2 in the file, 1 in this kernel"),
    (V1 + "\ndef g(x):\n    return x\n", "the file defines g"),
])
def test_what_the_kernel_runs_differs_from_the_file(lib, edited, says):
    name, path = lib
    mod = load(name, path, V1)
    write(path, edited)
    assert says in moduleedits.behind(mod)
    importlib.reload(mod)
    assert moduleedits.behind(mod) is None, "a reloaded module is the file's"


def test_a_helper_the_file_deletes_is_not_a_difference(lib):
    name, path = lib
    mod = load(name, path, "def _helper():\n    return 1\nX = _helper()\ndel _helper\n")
    write(path, "def _helper():\n    return 1\nX = _helper()\ndel _helper\n# edited\n")
    assert moduleedits.behind(mod) is None


def test_a_file_older_than_the_kernel_is_not_compiled(lib, monkeypatch):
    name, path = lib
    mod = load(name, path, V1)
    os.utime(path, (moduleedits.STARTED - 60, moduleedits.STARTED - 60))
    monkeypatch.setattr(moduleedits, "_compare", lambda *a: pytest.fail("compiled a file older than the kernel"))
    assert moduleedits.behind(mod) is None


def test_a_module_an_import_hook_loaded_is_not_compared(monkeypatch):
    """pytest rewrites a test module's asserts: compiling its file gives other code, and every map
    that used a test module written less than 2 s before the run was refused."""
    monkeypatch.setattr(moduleedits, "STARTED", 0.0)  # as if this file had been edited since
    this = sys.modules[__name__]
    assert type(this.__spec__.loader).__name__ == "AssertionRewritingHook"
    assert moduleedits.behind(this, this.__file__) is None


# ------------------------------------------------------------------ the local backend
def test_a_map_after_an_edit_without_reload_is_refused_before_any_work(local_pool, lib, tmp_path):
    name, path = lib
    mod = load(name, path, V1)
    ran = tmp_path / "ran"
    ran.mkdir()

    def g(x):
        open(os.path.join(str(ran), str(x)), "w").close()
        return mod.f(x)

    assert local_pool.map(g, range(4)) == [g(x) for x in range(4)] == [1, 2, 3, 4]
    for p in ran.iterdir():
        p.unlink()
    write(path, V1.replace("x + SCALE", "x + 100"))
    with pytest.raises(BadInputError, match=rf"the module {name} .* f\(\) in the file differs .*reload"):
        local_pool.map(g, range(4))
    assert list(ran.iterdir()) == [], "items ran before the refusal"
    importlib.reload(mod)
    assert local_pool.map(g, range(4)) == [g(x) for x in range(4)] == [100, 101, 102, 103]


def test_a_map_that_does_not_use_the_edited_module_runs(local_pool, lib):
    name, path = lib
    mod = load(name, path, V1)
    assert local_pool.map(lambda x: mod.f(x), range(2)) == [1, 2]
    write(path, V1.replace("x + SCALE", "x + 100"))
    assert local_pool.map(lambda x: x * 2, range(2)) == [0, 2]


def test_a_worker_importing_a_file_edited_before_the_first_map_is_said(lib):
    name, path = lib
    mod = load(name, path, V1)
    write(path, V1.replace("x + SCALE", "x + 100"))
    with poolmagic.Pool(2) as pool:  # a fresh pool: no worker imported the module before the edit
        report = pool.run(lambda x: mod.f(x), range(2))
        assert any(f"imported the module {name} from its file" in n and "differ from a loop" in n
                   for n in report.notes), report.notes
        with pytest.raises(BadInputError, match=f"the module {name}"):
            pool.run(lambda x: mod.f(x), range(2))  # now that a worker has it, refused before work


def test_autoreload_in_a_shell_reaches_the_workers(ip, lib):
    name, path = lib
    load(name, path, V1)
    ip.run_line_magic("load_ext", "autoreload")
    ip.run_line_magic("autoreload", "2")
    try:
        ip.run_cell(f"import {name} as _lib_under_test")
        ip.run_cell_magic("poolmap", "-q range(3)", "def _g(x):\n    return _lib_under_test.f(x)\n")
        assert list(ip.user_ns["_poolmap"].results) == [1, 2, 3]
        write(path, V1.replace("x + SCALE", "x * 10"))
        ip.run_cell("_loop = [_g(x) for x in range(3)]")  # autoreload reloads before the cell
        ip.run_cell_magic("poolmap", "-q range(3)", "def _g(x):\n    return _lib_under_test.f(x)\n")
        assert list(ip.user_ns["_poolmap"].results) == ip.user_ns["_loop"] == [0, 10, 20]
    finally:
        ip.run_line_magic("autoreload", "0")


# ------------------------------------------------------------------ a dask LocalCluster keeps what it imported
def test_a_reloaded_module_reaches_dask_workers_by_value(dask_pool, lib):
    name, path = lib
    mod = load(name, path, V1)

    def g(x):
        return mod.f(x), type(mod.Box()).__name__

    assert dask_pool.map(g, range(3)) == [g(x) for x in range(3)]
    write(path, V1.replace("x + SCALE", "x + 100"))
    with pytest.raises(BadInputError, match=f"the module {name}"):
        dask_pool.map(g, range(3))
    importlib.reload(mod)
    report = dask_pool.run(g, range(3))
    assert report.results == [g(x) for x in range(3)] == [(100, "Box"), (101, "Box"), (102, "Box")]
    assert any(f"the module {name} was reloaded" in n for n in report.notes), report.notes


@pytest.mark.parametrize("source", [
    "try:\n    import json\n    HAS_IT = True\nexcept ImportError:\n    HAS_IT = False\n",
    "import sys\nif sys.maxsize > 1:\n    WIDE = 64\nelse:\n    WIDE = 32\n",
    "MODE = 'slow'\ndef fast():\n    global MODE\n    MODE = 'fast'\nfast()\n",
])
def test_a_constant_the_file_sets_twice_or_from_a_function_is_not_compared(lib, source):
    """The kernel's value is not the file's last literal: once the file was edited, every map that
    used it was refused, even after a reload ('HAS_IT is False in the file, True in this kernel')."""
    name, path = lib
    mod = load(name, path, source)
    write(path, source + "# edited\n")
    assert moduleedits.behind(mod) is None
    importlib.reload(mod)
    assert moduleedits.behind(mod) is None


# ------------------------------------------------------------------ a module attribute set in the notebook
CONFIG = "THRESHOLD = 0.5\n\ndef above(x):\n    return x > THRESHOLD\n"


def test_a_module_constant_set_in_the_notebook_is_refused_before_any_work(pool_of_each, lib):
    """``mylib.THRESHOLD = 0.7`` in a cell: a loop reads 0.7, a worker imports the file and read 0.5,
    and the map answered [False] where the loop answers [True], without a word."""
    name, path = lib
    mod = load(name, path, CONFIG)

    def uses_module(x):
        return x > mod.THRESHOLD

    assert pool_of_each.map(uses_module, [0.6]) == [True]
    mod.THRESHOLD = 0.55
    try:
        for fn in (uses_module, mod.above):  # the module read by the function, or the function's own
            assert [fn(0.52)] == [False]
            with pytest.raises(BadInputError, match=rf"{name}\.THRESHOLD is 0\.55 in this kernel and 0\.5 in"):
                pool_of_each.map(fn, [0.52])
    finally:
        mod.THRESHOLD = 0.5
    assert pool_of_each.map(mod.above, [0.52]) == [True]


def test_on_threads_the_notebooks_value_is_read_as_in_a_loop(lib):
    name, path = lib
    mod = load(name, path, CONFIG)
    mod.THRESHOLD = 0.55
    with poolmagic.Pool(2, backend="threads") as pool:
        assert pool.map(mod.above, [0.52]) == [mod.above(0.52)] == [False]


def test_module_constants_the_file_computes_are_not_compared(lib):
    name, path = lib
    mod = load(name, path, "import os\nCORES = os.cpu_count()\nTRY = 1\ntry:\n    import json\n    TRY = 2\n"
                           "except ImportError:\n    pass\n\ndef f(x):\n    return x + CORES + TRY\n")
    assert moduleedits.set_in_notebook(mod) is None and moduleedits.modules_read(mod.f) == [mod]
