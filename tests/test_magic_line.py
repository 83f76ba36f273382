"""The magic line and what it names, checked before any work (issue 22).

* the line is Python code and paths: IPython must not expand ``{x}`` / ``$x`` in it;
* a str/bytes ITERABLE is refused, with the fix in the message;
* the mapped function is the one the cell's other functions do not call;
* arity mistakes (``--repeat``, ``--star``, ``-f lambda ...``) are caught before work.

Every refusal is checked to have run nothing: the mapped function writes a
marker file per item, and no marker may exist.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from IPython.core.error import UsageError

import poolmagic
from poolmagic import BadInputError, pmap

pytestmark = pytest.mark.timeout(60)


def cell(ip, line: str, body: str):
    return ip.run_cell_magic("poolmap", line, body)


@pytest.fixture
def marks(ip, tmp_path):
    """A folder the marking functions write one file per item into; bound as MARKS in the notebook."""
    folder = tmp_path / "marks"
    folder.mkdir()
    ip.user_ns["MARKS"] = str(folder)
    return folder


def marked(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# A cell body whose function leaves a marker file per item it runs.
MARKING = (
    "import os\n"
    "def {name}({args}):\n"
    "    open(os.path.join(MARKS, repr(({args},))), 'w').close()\n"
    "    return 1\n"
)


# ------------------------------------------------------------------ 1. no variable expansion


def test_braces_and_dollars_in_the_iterable_are_python_not_ipython(ip):
    ip.user_ns.update(x=7, y="Y")
    body = "def ident(v):\n    return v\n"
    assert cell(ip, "-q [f'{x}' for x in 'ab']", body) == ["a", "b"]
    assert cell(ip, "-q ['$x', '$$', '{x}', '${y}', '$y$']", body) == ["$x", "$$", "{x}", "${y}", "$y$"]
    assert cell(ip, "-q [{x} for _ in range(2)]", body) == [{7}, {7}]  # a set, as Python reads it
    # the line form too
    assert ip.run_line_magic("poolmap", "-q str ['$x', '{x}']") == ["$x", "{x}"]
    assert ip.run_line_magic("poolmap", "-q -f (lambda v: f'{v}{x}') ['a', 'b']") == ["a7", "b7"]


def test_kw_values_are_not_expanded(ip):
    ip.user_ns.update(x=7)
    out = cell(ip, "-q --kw tag='{x}$x' range(2)", "def tagged(v, tag):\n    return tag\n")
    assert out == ["{x}$x", "{x}$x"]


def test_checkpoint_path_stays_literal(ip, tmp_path):
    ip.user_ns.update(name="EXPANDED", HOME="/not/here")
    line = f"-q --checkpoint {tmp_path}/$name-{{name}}.ck range(3)"
    assert cell(ip, line, "def sq(v):\n    return v * v\n") == [0, 1, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["$name-{name}.ck"]
