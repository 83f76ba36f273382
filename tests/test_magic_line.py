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


def test_quoted_values_keep_their_spaces(ip, tmp_path):
    """A --kw string with a space was cut at the space (``--kw sep=', '``: 'unterminated string
    literal'), and a quoted --checkpoint path made a file whose name had the quotes in it."""
    body = "def joined(v, sep):\n    return sep.join([str(v), str(v)])\n"
    assert cell(ip, "-q --kw sep=', ' range(2)", body) == ["0, 0", "1, 1"]
    assert cell(ip, '-q --kw sep=" - " --seed 1 range(1)', body) == ["0 - 0"]
    assert cell(ip, "-q --kw sep='it\\'s' range(1)", body) == ["0it's0"]
    sq = "def sq(v):\n    return v * v\n"
    assert cell(ip, f"-q --checkpoint '{tmp_path}/run 1.ck' range(3)", sq) == [0, 1, 4]
    assert cell(ip, f'-q --checkpoint "{tmp_path}/b.ck" range(3)', sq) == [0, 1, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.ck", "run 1.ck"]
    with pytest.raises(UsageError, match="the value of --kw has an unclosed quote"):
        cell(ip, "-q --kw sep=', range(2)", body)


# ------------------------------------------------------------------ 2. str / bytes ITERABLE


def test_a_path_string_is_refused_with_the_fixes(ip, marks):
    with pytest.raises(UsageError) as info:
        cell(ip, '-q "data.csv"', MARKING.format(name="mark1", args="x"))
    msg = str(info.value)
    assert 'ITERABLE `"data.csv"` is a str' in msg and "8 characters" in msg, msg
    assert 'looks like a file path' in msg and 'open("data.csv")' in msg, msg
    assert 'list("data.csv")' in msg and '["data.csv"]' in msg, msg
    assert marked(marks) == []


def test_a_text_variable_is_refused_in_the_magic_and_line_form(ip, marks):
    ip.run_cell(MARKING.format(name="mark1", args="x") + "word = 'abc'\nraw = b'ab'\nbuf = bytearray(b'ab')\n")
    with pytest.raises(UsageError, match=r"ITERABLE `word` is a str \('abc'\).*list\(word\)") as info:
        cell(ip, "-q word", MARKING.format(name="mark1", args="x"))
    assert "file path" not in str(info.value)
    with pytest.raises(UsageError, match=r"`raw` is a bytes .*2 bytes \(as ints\).*list\(raw\)"):
        ip.run_line_magic("poolmap", "-q mark1 raw")
    with pytest.raises(UsageError, match=r"`buf` is a bytearray"):
        ip.run_line_magic("poolmap", "-q -f mark1 buf")
    assert marked(marks) == []


def test_the_api_refuses_text_before_work(ip, marks):
    ip.run_cell(MARKING.format(name="mark1", args="x"))
    f = ip.user_ns["mark1"]
    pool = poolmagic.get_pool()
    for bad in ("abc", b"abc", bytearray(b"abc"), "results/out.txt"):
        with pytest.raises(BadInputError, match="the ITERABLE is a"):
            pmap(f, bad)
        with pytest.raises(BadInputError, match="the ITERABLE is a"):
            pool.run(f, bad)
        with pytest.raises(BadInputError, match="the ITERABLE is a"):
            pool.map_async(f, bad)
    assert marked(marks) == []
    # what a loop over them would have meant still works, written out
    assert pmap(f, list("ab")) == [1, 1]
    assert pmap(f, memoryview(b"ab")) == [1, 1]  # a memoryview is made on purpose: its elements
    assert sorted(marked(marks)) == sorted([repr(("a",)), repr(("b",)), repr((97,)), repr((98,))])


# ------------------------------------------------------------------ 3. which function is mapped


def test_main_calling_a_helper_defined_after_it_maps_main(ip):
    body = "def main(x):\n    return helper(x) + 1\ndef helper(x):\n    return x * 10\n"
    assert cell(ip, "-q range(3)", body) == [1, 11, 21]
    assert ip.user_ns["_poolmap"].func_name == "main"
    assert cell(ip, "-q -f helper range(3)", body) == [0, 10, 20]  # -f still chooses


@pytest.mark.parametrize("body, expected", [
    # decorators: a decorator the cell defines is used by the function it decorates
    ("import functools\n"
     "def twice(fn):\n    @functools.wraps(fn)\n    def inner(x):\n        return 2 * fn(x)\n    return inner\n"
     "@twice\ndef work(x):\n    return x + 1\n", [2, 4, 6]),
    # a default argument is a use too
    ("def work(x, g=None):\n    return (g or step)(x) * 10\ndef step(x):\n    return x + 1\n", [10, 20, 30]),
    # a class's method calling a function counts as a use; the class is not mapped
    ("def work(x):\n    return Box(x).grow() * 10\nclass Box:\n    def __init__(self, v): self.v = v\n"
     "    def grow(self): return bump(self.v)\ndef bump(v):\n    return v + 1\n", [10, 20, 30]),
    # lambdas: one calling another, in either order
    ("inc = lambda x: x + 1\nwork = lambda x: inc(x) * 10\n", [10, 20, 30]),
    ("work = lambda x: inc(x) * 10\ninc = lambda x: x + 1\n", [10, 20, 30]),
    # a nested def's calls belong to its enclosing function
    ("def work(x):\n    def inner(y):\n        return leaf(y) * 10\n    return inner(x)\n"
     "def leaf(y):\n    return y + 1\n", [10, 20, 30]),
    # a function calling itself is not thereby used; a quick check at top level is no use either
    ("def count(x):\n    return 0 if x <= 0 else count(x - 1) + 1\ncount(3)\n", [0, 1, 2]),
    ("def count(x):\n    return 0 if x <= 0 else count(x - 1) + 1\ndef work(x):\n    return count(x) * 10\n",
     [0, 10, 20]),
])
def test_the_function_no_other_calls_is_mapped(ip, body, expected):
    assert cell(ip, "-q [0, 1, 2]", body) == expected


def test_several_candidates_are_refused_before_the_cell_runs(ip, marks):
    body = "RAN = True\n" + MARKING.format(name="alpha", args="x") + MARKING.format(name="beta", args="x")
    ip.user_ns.pop("RAN", None)
    with pytest.raises(UsageError) as info:
        cell(ip, "range(2)", body)
    msg = str(info.value)
    assert "2 functions" in msg and "(alpha, beta)" in msg and "-f NAME" in msg, msg
    assert "%%poolmap -f beta range(2)" in msg, msg
    assert "RAN" not in ip.user_ns and marked(marks) == []


def test_mutual_recursion_leaves_no_candidate_and_is_refused(ip, marks):
    body = ("RAN = True\n"
            "def even(n):\n    return True if n == 0 else odd(n - 1)\n"
            "def odd(n):\n    return False if n == 0 else even(n - 1)\n")
    ip.user_ns.pop("RAN", None)
    with pytest.raises(UsageError, match=r"every function the cell defines is called by another .*\(even, odd\).*-f NAME"):
        cell(ip, "range(4)", body)
    assert "RAN" not in ip.user_ns
    assert cell(ip, "-q -f even range(4)", body) == [True, False, True, False]


# ------------------------------------------------------------------ 5. arity, before work


def test_repeat_with_a_one_argument_function_is_refused(ip, marks):
    with pytest.raises(UsageError, match=r"--repeat N calls the function with no argument, but it is `mark1\(x\)`"):
        cell(ip, "-q --repeat 3", MARKING.format(name="mark1", args="x"))
    with pytest.raises(UsageError, match=r"--repeat N .* it is `lambda x`"):
        ip.run_line_magic("poolmap", "-q --repeat 3 (lambda x: x)")
    assert marked(marks) == []
    assert cell(ip, "-q --repeat 2", "def once():\n    return 5\n") == [5, 5]


def test_wrong_arity_for_a_plain_map_and_for_star(ip, marks):
    ip.run_cell(MARKING.format(name="mark2", args="x, y")
                + "def mark0():\n    open(os.path.join(MARKS, 'none'), 'w').close()\n")
    with pytest.raises(UsageError, match=r"`mark2\(x, y\)` needs more than one argument.*--star"):
        ip.run_line_magic("poolmap", "-q mark2 [(1, 2)]")
    with pytest.raises(UsageError, match=r"`mark0\(\)` takes no argument.*--repeat N"):
        ip.run_line_magic("poolmap", "-q mark0 range(2)")
    with pytest.raises(UsageError, match=r"--star .* item 0 \(1, 2\) holds 2 values and `lambda x` does not take them"):
        cell(ip, "-q --star [(1, 2), (3, 4)]", "work = lambda x: open(os.path.join(MARKS, str(x)), 'w')\n")
    with pytest.raises(UsageError, match=r"item 0 \(1, 2, 3\) holds 3 values and `mark2\(x, y\)`"):
        ip.run_line_magic("poolmap", "-q --star mark2 iter([(1, 2, 3)])")
    assert marked(marks) == []
    # what fits still runs: --kw fills a parameter, and a stream keeps its first item
    assert ip.run_line_magic("poolmap", "-q --star mark2 iter([(1, 2), (3, 4)])") == [1, 1]
    assert ip.run_line_magic("poolmap", "-q --kw y=0 mark2 range(2)") == [1, 1]
    assert len(marked(marks)) == 4


def test_functions_without_a_readable_signature_are_not_refused(ip):
    assert ip.run_line_magic("poolmap", "-q str range(2)") == ["0", "1"]
    assert ip.run_line_magic("poolmap", "-q --star max [(1, 2), (4, 3)]") == [2, 4]
    ip.run_cell("from functools import partial\ndef power(x, y):\n    return x ** y\n")
    assert ip.run_line_magic("poolmap", "-q -f partial(power, y=2) range(3)") == [0, 1, 4]
    # a decorator may call what it wraps with other arguments than it takes itself
    body = ("import functools\n"
            "def with_base(fn):\n    @functools.wraps(fn)\n    def inner(x):\n        return fn(100, x)\n    return inner\n"
            "@with_base\ndef work(base, x):\n    return base + x\n")
    assert cell(ip, "-q range(2)", body) == [100, 101]


def test_api_arity_checks_before_work(ip, marks):
    ip.run_cell(MARKING.format(name="mark1", args="x") + MARKING.format(name="mark2", args="x, y"))
    one, two = ip.user_ns["mark1"], ip.user_ns["mark2"]
    with pytest.raises(BadInputError, match="--repeat"):
        pmap(one, repeat=2)
    with pytest.raises(BadInputError, match="needs more than one argument") as info:
        pmap(two, [(1, 2)])
    assert isinstance(info.value, TypeError)  # what the loop's own call would raise
    with pytest.raises(BadInputError, match="holds 1 value and `mark2"):
        poolmagic.get_pool().run(two, [(1,)], star=True)
    with pytest.raises(BadInputError, match=r"cannot be called with one item as its argument \(with --kw z\)"):
        pmap(one, [1], kwargs={"z": 1})
    assert marked(marks) == []


def test_f_followed_by_an_unbracketed_lambda_is_refused_before_the_cell_runs(ip, marks):
    ip.user_ns.pop("RAN", None)
    with pytest.raises(UsageError, match=r"-f takes one expression .* -f \(lambda x: x \+ 1\) range\(3\)"):
        cell(ip, "-f lambda x: x + 1 range(3)", "RAN = True\n" + MARKING.format(name="mark1", args="x"))
    assert "RAN" not in ip.user_ns
    with pytest.raises(UsageError, match=r"-f takes one expression"):
        ip.run_line_magic("poolmap", "-f lambda x: x + 1 range(3)")
    assert ip.run_line_magic("poolmap", "-q -f (lambda x: x + 1) range(3)") == [1, 2, 3]
    assert ip.run_line_magic("poolmap", "-q lambda x: x + 1 range(3)") == [1, 2, 3]
    assert marked(marks) == []


def test_options_after_the_iterable_are_named_with_the_line_to_write(ip, marks):
    """Options come first; one written after the ITERABLE is read as part of it. The error
    must say so (it said only 'invalid syntax', or ``range(3) -q`` raised TypeError)."""
    body = MARKING.format(name="mark2", args="x")
    ip.user_ns["q"] = 1
    with pytest.raises(UsageError, match=r"--timeout follows it here; write %%poolmap -n 2 --timeout 3 range\(3\)"):
        cell(ip, "-n 2 range(3) --timeout 3", body)
    with pytest.raises(UsageError, match=r"TypeError.*-q follows it here; write %%poolmap -q range\(3\)"):
        cell(ip, "range(3) -q", body)
    with pytest.raises(UsageError, match=r"--tiemout is no option of this magic, and options come before"):
        cell(ip, "range(3) --tiemout 3", body)
    with pytest.raises(UsageError, match=r"-q follows it here; write %poolmap -q mark2 range\(3\)"):
        ip.run_line_magic("poolmap", "mark2 range(3) -q")
    with pytest.raises(UsageError, match=r"--timeout follows it here; write %poolmap --timeout 3 mark2 range\(3\)"):
        ip.run_line_magic("poolmap", "mark2 range(3) --timeout 3")
    assert marked(marks) == []
    # a minus inside the ITERABLE is Python, and an ITERABLE that fails without one gets no hint
    assert cell(ip, "-q [x -q for x in range(2)]", "def ident(v):\n    return v\n") == [-1, 0]
    for line in ("range(N_UNDEFINED - 1)", "range(N_UNDEFINED)  # -q later"):
        with pytest.raises(UsageError) as e:
            cell(ip, line, body)
        assert "options come" not in str(e.value) and "no option" not in str(e.value), line


# ------------------------------------------------------------------ 5. while an --async map runs

GATED = (
    "import os, time\n"
    "def gated(x):\n"
    "    deadline = time.monotonic() + 30\n"
    "    while not os.path.exists(GATE) and time.monotonic() < deadline:\n"
    "        time.sleep(0.01)\n"
    "    return x * 10\n"
)


@pytest.fixture
def running_async(ip, tmp_path):
    """An --async map held running until the test opens its gate; yields (handle, open_gate)."""
    gate = tmp_path / "gate"
    ip.user_ns["GATE"] = str(gate)
    assert cell(ip, "-q --async -o held range(4)", GATED) is None
    handle = ip.user_ns["held"]
    yield handle, gate.touch
    gate.touch()
    handle.wait(30)


def test_a_quiet_async_maps_handle_shows_no_card_while_it_runs(ip, tmp_path):
    """``%%poolmap -q --async`` without -o: the handle, the cell's value, was shown as a summary
    card (frozen at 'workers starting'), where -q shows neither progress nor summary."""
    gate = tmp_path / "gate"
    ip.user_ns["GATE"] = str(gate)
    handle = cell(ip, "-q --async range(2)", GATED)
    try:
        shown = ip.display_formatter.format(handle)[0]
        assert shown["text/plain"] == "<MapHandle: gated() runs in the background; .get() waits for the results>"
        assert "items" not in shown["text/html"], shown
    finally:
        gate.touch()
    assert handle.get(30) == [0, 10]
    assert ip.display_formatter.format(handle)[0]["text/plain"].startswith("poolmagic: gated() · 2 items in")


def test_tune_while_an_async_map_runs_says_so(ip, running_async):
    handle, open_gate = running_async
    size = poolmagic.get_pool().size
    with pytest.raises(UsageError, match=r"a map is still running in the background \(gated\(\), 0 of 4 items done\): "
                                         r"--tune would time .*handle\.cancel\(\)"):
        ip.run_line_magic("poolsize", "--tune")
    assert poolmagic.get_pool().size == size
    open_gate()
    assert handle.get(30) == [0, 10, 20, 30]


def test_pooldebug_while_an_async_map_runs_says_so(ip, running_async):
    """It said 'the last map had no failure' of a map whose items had not finished."""
    handle, open_gate = running_async
    with pytest.raises(UsageError, match=r"the last map, gated\(\), is still running in the background: "
                                         r"wait for it \(handle.wait\(\)\), then %pooldebug"):
        ip.run_line_magic("pooldebug", "")
    open_gate()
    assert handle.get(30) == [0, 10, 20, 30]


def test_backend_switch_while_an_async_map_runs_is_refused_and_the_map_finishes(ip, running_async):
    pytest.importorskip("distributed")
    handle, open_gate = running_async
    pool = poolmagic.get_pool()
    with pytest.raises(UsageError, match=r"still running in the background .*a backend switch would shut its pool down"):
        ip.run_line_magic("poolsize", "--backend dask")
    assert poolmagic.get_pool() is pool
    ip.run_line_magic("poolsize", "--backend local")  # already local: nothing to switch, nothing refused
    assert poolmagic.get_pool() is pool
    open_gate()
    assert handle.get(30) == [0, 10, 20, 30]


# ------------------------------------------------------------------ 5. POOLMAGIC_START_METHOD


@pytest.mark.parametrize("value", ["fork", "forksever", "SPAWN"])
def test_an_unknown_start_method_is_an_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("POOLMAGIC_START_METHOD", value)
    with pytest.raises(BadInputError, match=rf"POOLMAGIC_START_METHOD is '{value}'.*'spawn'"):
        poolmagic.Pool(1)


def test_loading_the_extension_with_an_unknown_start_method_names_it_and_starts_nothing():
    import os
    import subprocess
    import sys

    code = (
        "import psutil\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "try:\n"
        "    ip.extension_manager.load_extension('poolmagic')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "print('children', len(psutil.Process().children(recursive=True)))\n"
    )
    env = {**os.environ, "POOLMAGIC_START_METHOD": "fork"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "BadInputError POOLMAGIC_START_METHOD is 'fork' ('fork' would fork a multi-threaded kernel)" in out, out
    assert "children 0" in out, out


def test_repeat_zero_is_refused_as_a_count(ip):
    """``--repeat 0`` was read as no --repeat: "give an ITERABLE after the options"."""
    with pytest.raises(UsageError, match=r"repeat must be a whole number, at least 1, not 0"):
        cell(ip, "-q --repeat 0", "def once():\n    return 5\n")


def test_a_kw_value_that_cannot_be_sent_is_named_as_written(ip):
    """``--kw y=<a generator>`` said "partial(f, ...)() ... captures keyword argument 'y' of the
    partial": a partial the user never wrote."""
    with pytest.raises(UsageError) as info:
        cell(ip, "-q --kw y=(i for i in range(3)) range(2)", "def kw_gen(x, y):\n    return x\n")
    msg = str(info.value)
    assert "kw_gen() cannot be sent" in msg and "--kw y=" in msg and "a generator" in msg, msg
    assert "partial" not in msg, msg
