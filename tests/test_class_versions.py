"""A notebook class redefined with another method: --resume and --checkpoint say so (versions.class_key).

A class the notebook defines travels whole. It was keyed by its name alone, so
after the cell that defines it ran again with another method, a resumed map or
a checkpoint kept the results of the earlier version without a word, whether
the function used the class as a global (``Model(x).score()``) or the items
were its instances (``p.score()``).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from poolmagic import MapFailedError
from poolmagic.versions import class_key

CLASS = '''
import dataclasses

@dataclasses.dataclass
class {name}:
    a: int

    def score(self):
        return self.a * {factor}
'''


def define(ip, name: str, factor: int) -> None:
    assert ip.run_cell(CLASS.format(name=name, factor=factor)).success


def test_a_redefined_class_with_the_same_code_is_the_same_key(ip):
    define(ip, "SameCls", 2)
    before = class_key(ip.user_ns["SameCls"])
    define(ip, "SameCls", 2)
    assert class_key(ip.user_ns["SameCls"]) == before
    define(ip, "SameCls", 3)
    assert class_key(ip.user_ns["SameCls"]) != before


def test_a_method_using_super_is_the_same_key_in_every_kernel(tmp_path):
    """A method's __class__ cell was keyed by the class's pickle, whose id is drawn in each kernel."""
    script = tmp_path / "k.py"
    script.write_text(
        "import dataclasses\nfrom poolmagic.versions import code_key\n"
        "class Base:\n    def score(self):\n        return 1\n"
        "@dataclasses.dataclass\nclass P(Base):\n    a: int = 3\n"
        "    def score(self):\n        return super().score() + self.a\n"
        "def f(x):\n    return P(x).score()\nprint(code_key(f))\n")
    keys = {subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                           timeout=60).stdout for _ in range(2)}
    assert len(keys) == 1, keys


def test_resume_says_when_a_class_the_function_uses_changed(ip):
    define(ip, "ModelG", 2)
    assert ip.run_cell("def use_model(x):\n    if x == 2 and os.environ.get('_FAIL_MODEL'):\n        raise ValueError(x)\n"
                       "    return ModelG(x).score()\nimport os\nos.environ['_FAIL_MODEL'] = '1'").success
    with pytest.raises(MapFailedError):
        ip.run_line_magic("poolmap", "-q --keep-going use_model range(4)")
    define(ip, "ModelG", 3)
    ip.run_cell("os.environ.pop('_FAIL_MODEL')")
    ip.run_line_magic("poolmap", "-q --resume use_model range(4)")
    r = ip.user_ns["_poolmap"]
    assert r.results == [0, 2, 6, 6]
    assert any("the function changed" in n and "3 results" in n for n in r.notes), r.notes


def resume_after_redefining(ip, cls: str, factor: int):
    """Items of the notebook class ``cls`` (score: a * 2); item 2 fails the first map; the class cell
    runs again with ``score`` a * ``factor`` and the map is resumed: its report."""
    define(ip, cls, 2)
    flag = f"_FAIL_{cls.upper()}"
    assert ip.run_cell(f"items_{cls} = [{cls}(i) for i in range(4)]\nimport os\nos.environ['{flag}'] = '1'").success
    body = (f"def score_{cls}(p):\n    if p.a == 2 and os.environ.get('{flag}'):\n        raise ValueError(p)\n"
            f"    return p.score()\n")
    with pytest.raises(MapFailedError):
        ip.run_cell_magic("poolmap", f"-q --keep-going items_{cls}", body)
    define(ip, cls, factor)
    assert ip.run_cell(f"items_{cls} = [{cls}(i) for i in range(4)]\nos.environ.pop('{flag}')").success
    ip.run_cell_magic("poolmap", f"-q --resume items_{cls}", body)
    return ip.user_ns["_poolmap"]


def test_resume_says_when_the_items_class_changed(ip):
    r = resume_after_redefining(ip, "ItemP", 3)
    assert r.results == [0, 2, 6, 6]
    assert any("class ItemP changed" in n and "3 results" in n for n in r.notes), r.notes


def test_the_same_class_cell_run_again_is_no_change(ip):
    assert resume_after_redefining(ip, "ItemQ", 2).notes == []


def test_a_checkpoint_says_when_a_class_the_function_uses_changed(ip, tmp_path):
    ck = tmp_path / "c.ck"
    define(ip, "ModelC", 2)
    assert ip.run_cell("def use_c(x):\n    if x == 2 and os.environ.get('_FAIL_C'):\n        raise ValueError(x)\n"
                       "    return ModelC(x).score()\nimport os\nos.environ['_FAIL_C'] = '1'").success
    with pytest.raises(MapFailedError):
        ip.run_line_magic("poolmap", f"-q --keep-going --checkpoint {ck} use_c range(4)")
    define(ip, "ModelC", 3)
    ip.run_cell("os.environ.pop('_FAIL_C')")
    ip.run_line_magic("poolmap", f"-q --checkpoint {ck} use_c range(4)")
    r = ip.user_ns["_poolmap"]
    assert r.results == [0, 2, 6, 6]
    assert any("the function changed" in n for n in r.notes), r.notes


_ITEM_CLASS_SCRIPT = '''
import sys
from dataclasses import dataclass
from poolmagic import Pool, PoolmapError

@dataclass
class Item:  # defined in __main__, as in a notebook
    a: int

    def score(self):
        return self.a * FACTOR

FACTOR = 1  # read by the class, not by the function: only the class's code says it

def score(p):
    if p.a == 2 and sys.argv[3] == "fail":
        raise ValueError(p)
    return p.score()

if __name__ == "__main__":
    if sys.argv[2] == "3":
        exec("def _score(self):\\n    return self.a * 3\\n")
        Item.score = _score  # this kernel's Item does something else
        Item.score.__qualname__ = "Item.score"
    with Pool(1) as pool:
        try:
            r = pool.run(score, [Item(i) for i in range(4)], checkpoint=sys.argv[1], keep_going=True)
        except PoolmapError as exc:
            r = exc.report
    print(repr((r.results[:2] + r.results[3:], r.notes)))
'''


@pytest.mark.timeout(120)
def test_a_checkpoint_says_when_the_items_class_changed_in_a_new_kernel(tmp_path):
    """Each run is a new kernel: the items' class keys must be the same in every kernel, and differ
    when the class's method does."""
    script = tmp_path / "nb.py"
    script.write_text(_ITEM_CLASS_SCRIPT)

    def kernel(ck: str, version: str, mode: str):
        out = subprocess.run([sys.executable, str(script), str(tmp_path / ck), version, mode], capture_output=True,
                             text=True, timeout=100, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        return eval(out.stdout.strip().splitlines()[-1])

    kernel("same.ck", "1", "fail")
    results, notes = kernel("same.ck", "1", "ok")  # a new kernel, the same class: nothing to say
    assert notes == [] and results == [0, 1, 3]
    kernel("changed.ck", "1", "fail")
    results, notes = kernel("changed.ck", "3", "ok")
    assert any("the items' class Item changed" in n and "3 results" in n for n in notes), notes
