"""Which modules a function needs, and packing the local ones with it (localmodules.py)."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest

from poolmagic.errors import BadInputError
from poolmagic.localmodules import check_size, is_local, modules_used, with_modules


def cell(source: str):
    """The last function a notebook cell defines (it lives in ``__main__``, as in a kernel)."""
    ns: dict = {"__name__": "__main__"}
    exec(textwrap.dedent(source), ns)
    return [v for v in ns.values() if callable(v) and getattr(v, "__module__", None) == "__main__"][-1]


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch):
    """A folder with helper modules, on sys.path as a notebook's folder is; forgotten after."""
    (tmp_path / "nbhelper.py").write_text(textwrap.dedent("""
        import json
        from nbhelper_two import base
        SCALE = 3
        def triple(x):
            return base(x) * SCALE
        class Box:
            def __init__(self, v):
                self.v = v
    """))
    (tmp_path / "nbhelper_two.py").write_text("def base(x):\n    return x + 0\n")
    pkg = tmp_path / "nbpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith(("nbhelper", "nbpkg"))]:
        del sys.modules[name]


def test_local_and_installed_modules_are_told_apart(notebook_dir):
    import json

    import nbhelper
    import numpy

    assert is_local(nbhelper)
    assert not is_local(json) and not is_local(numpy) and not is_local(sys)
    assert not is_local(importlib.import_module("poolmagic"))


def test_a_function_using_a_helper_module_needs_it_and_what_it_imports(notebook_dir):
    f = cell("""
        import nbhelper
        def f(x):
            return nbhelper.triple(x)
    """)
    use = modules_used(f)
    assert set(use.local) == {"nbhelper", "nbhelper_two"}
    assert set(use.imported) == {"nbhelper"}
    assert "json" in use.installed


def test_a_function_importing_a_helper_inside_its_body_needs_it(notebook_dir):
    f = cell("""
        def f(x):
            from nbpkg.sub import twice
            return twice(x)
    """)
    use = modules_used(f)
    assert set(use.local) == {"nbpkg"}
    assert set(use.imported) == {"nbpkg.sub"}


def test_an_item_of_a_local_class_needs_its_module(notebook_dir):
    import nbhelper

    use = modules_used(len, [nbhelper.Box(1)])
    assert set(use.local) == {"nbhelper", "nbhelper_two"} and not use.imported


def test_a_too_big_local_module_is_refused_naming_it(notebook_dir):
    import nbhelper

    with pytest.raises(BadInputError, match=r"local module 'nbhelper' .*too big .*install it in the workers"):
        check_size({"nbhelper": nbhelper}, limit=10)


def test_packed_modules_load_where_they_cannot_be_imported(notebook_dir, tmp_path_factory):
    """Unpickled in a Python that has no nbhelper on its path, the function still runs."""
    f = cell("""
        import nbhelper
        def f(x):
            import nbpkg.sub
            return nbhelper.triple(x) + nbpkg.sub.twice(x)
    """)
    use = modules_used(f)
    assert set(use.imported) == {"nbhelper", "nbpkg.sub"}
    for m in use.local.values():
        cloudpickle.register_pickle_by_value(m)
    try:
        blob = cloudpickle.dumps(with_modules(f, use.imported))
    finally:
        for m in use.local.values():
            cloudpickle.unregister_pickle_by_value(m)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "f.pkl").write_bytes(blob)
    code = "import pickle, sys; f = pickle.load(open('f.pkl', 'rb')); print(f(5))"
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "25"
