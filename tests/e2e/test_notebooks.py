"""The example notebooks, executed top to bottom in a real kernel.

Each notebook runs once per module (nbclient, the kernel being this test
process's own Python, see conftest.py); the tests then read its outputs the
way a reader would see them. ``examples/quickstart.ipynb`` is also run as
``python -m poolmagic.demo examples/quickstart.ipynb``, README's demo command.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from nbclient import NotebookClient

import poolmagic
from e2e_helpers import EXAMPLES, new_kernel_manager, strip_ansi
from e2e_helpers import kernel_spec_manager  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(120)

NOTEBOOKS = ("quickstart", "errors", "tutorial")
PROBE = "import sys, poolmagic\nprint(sys.executable)\nprint(poolmagic.__file__)"
SUMMARY = re.compile(r"poolmagic: .+? · [\d,/]+ items? in [\d.]+ (µs|ms|s) · \d+ workers? · \d+ cores? available · (speedup|slower than a plain loop \(speedup) (≈[\d.–]+|<0\.01)×[^\n]*(\n  why: [^\n]*)*")


class Executed:
    """An executed notebook and how to find things in it."""

    def __init__(self, nb, seconds: float):
        self.nb = nb
        self.seconds = seconds
        self.probe = nb.cells.pop()  # appended by execute()

    def cell(self, snippet: str):
        """The one code cell whose source contains ``snippet``."""
        found = [c for c in self.nb.cells if c.cell_type == "code" and snippet in c.source]
        assert len(found) == 1, f"{len(found)} cells contain {snippet!r}"
        return found[0]

    def code_cells(self):
        return [c for c in self.nb.cells if c.cell_type == "code"]


def outputs(cell, kind: str) -> list:
    return [o for o in cell.outputs if o.output_type == kind]


def stream(cell, name: str = "stdout") -> str:
    return "".join(o.text for o in outputs(cell, "stream") if o.name == name)


def value(cell) -> str | None:
    got = outputs(cell, "execute_result")
    return got[0].data["text/plain"] if got else None


def summaries(cell, mime: str = "text/html") -> list[str]:
    """The poolmagic summaries the cell displayed."""
    return [o.data[mime] for o in outputs(cell, "display_data") if o.data.get("text/plain", "").startswith("poolmagic:")]


def progress_bars(cell, mime: str = "text/html") -> list[str]:
    """The progress displays the cell left (their final, static form)."""
    return [o.data[mime] for o in outputs(cell, "display_data") if o.data.get("text/plain", "").startswith("poolmagic ")]


def error(cell):
    got = outputs(cell, "error")
    assert len(got) == 1, f"expected one error in {cell.source.splitlines()[0]!r}, got {cell.outputs}"
    return got[0]


def execute(name: str, ksm) -> Executed:
    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    km = new_kernel_manager(ksm, AsyncKernelManager)
    client = NotebookClient(nb, km=km, timeout=60, resources={"metadata": {"path": str(EXAMPLES)}})
    t0 = time.monotonic()
    client.execute()  # raises CellExecutionError at a cell that fails without the raises-exception tag
    return Executed(nb, time.monotonic() - t0)


@pytest.fixture(scope="module")
def executed(kernel_spec_manager):
    cache: dict[str, Executed] = {}

    def get(name: str) -> Executed:
        if name not in cache:
            cache[name] = execute(name, kernel_spec_manager)
        return cache[name]

    return get


# --------------------------------------------------------------------------- as saved


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_clean(name):
    """nbformat v4, valid, no outputs or counts saved, the python3 kernel."""
    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, c.source


# --------------------------------------------------------------------------- executed


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_in_this_interpreter_quickly(executed, name):
    run = executed(name)
    exe, path = stream(run.probe).split()
    assert Path(exe) == Path(sys.executable)
    assert Path(path).resolve() == Path(poolmagic.__file__).resolve()
    # how long it takes is bench.py's to measure; a hang fails NotebookClient's 60 s per cell


def test_quickstart(executed):
    run = executed("quickstart")

    size = stream(run.cell("%poolsize"))
    m = re.fullmatch(r"poolmagic: (\d+) workers? · local processes \(forkserver\) · (\d+) cores? available · (\d+) native threads? per worker · pool (warm|starting)\n", size)
    assert m, size
    workers, cores = int(m[1]), int(m[2])

    # every map shows exactly one summary, as HTML in a notebook
    maps = [c for c in run.code_cells() if "%poolmap" in c.source]
    assert len(maps) == 5
    for c in maps:
        html = summaries(c)
        assert len(html) == 1 and 'class="poolmagic-summary"' in html[0], c.source
        # a map longer than 0.5 s showed a live bar that became this summary in
        # place: one card, no widget a saved notebook could not display
        assert progress_bars(c) == [] and not any("application/vnd.jupyter.widget" in str(o.data)
                                                       for o in outputs(c, "display_data"))
        assert SUMMARY.fullmatch(summaries(c, "text/plain")[0]), summaries(c, "text/plain")

    # a constant and a helper from earlier cells, used by the mapped function
    c = run.cell("def shifted_square")
    assert value(c) == repr([x * x + 100 for x in range(8)])
    assert "<code>shifted_square()</code>" in summaries(c)[0] and "8 items" in summaries(c)[0]

    # a class from an earlier cell; print() in the function, in item order, in its own cell
    c = run.cell("def point_norm")
    expected = "".join(f"item {i}: Point({i}, {2 * i}).norm2() = {5 * i * i}\n" for i in range(5))
    assert stream(c) == expected and value(c) is None  # -o: no cell value
    assert all("Point(" not in stream(other) for other in run.code_cells() if other is not c)
    assert stream(run.cell("print(norms)")) == "[0, 5, 20, 45, 80]\n"

    assert stream(run.cell("print(totals)")) == "[29.97, 45.0, 12.0]\n"  # --star over zip(a, b)
    report = stream(run.cell("print(_poolmap.results)"))
    assert report.startswith("[29.97, 45.0, 12.0]\n")
    assert re.search(rf"ms on [12] workers?, {cores} cores? available, speedup [\d.]+×", report), report

    # the CPU-bound map agrees with the plain loop and runs in parallel
    out = stream(run.cell("assert parallel == serial"))
    speedup = float(re.search(r"speedup ([\d.]+)×", out)[1])
    pool_s, loop_s = (float(x) for x in re.search(r"pool: ([\d.]+) s .*\(the plain loop took ([\d.]+) s", out).groups())
    # .speedup (the card's figure) agrees with what the user measured, loop ÷ map, loaded host or not
    assert abs(speedup - loop_s / pool_s) <= 0.35 * (loop_s / pool_s), out

    c = run.cell("partial(scale, factor=3)")
    assert stream(c) == "[0, 3, 6, 9, 12]\n"
    assert "partial(scale, ...)" in summaries(c)[0]


def test_quickstart_in_a_terminal(tmp_path):
    """README's demo command runs every cell, each cell's code before its output."""
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    proc = subprocess.run(  # its timeout only catches a hang
        [sys.executable, "-m", "poolmagic.demo", "--no-color", str(EXAMPLES / "quickstart.ipynb")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Error:" not in out, out
    assert "item 4: Point(4, 8).norm2() = 80" in proc.stdout
    assert re.search(r"^poolmagic: \w+\(\) · 16 items in .* speedup", proc.stdout, re.M), proc.stdout
    assert "\n[0, 3, 6, 9, 12]\n" in proc.stdout, proc.stdout  # the last code cell ran
    # each cell's code comes before its output
    code = proc.stdout.index("In [4]: %%poolmap range(8)")
    assert code < proc.stdout.index("Out[4]: [100, 101, 104"), proc.stdout


def test_errors(executed):
    run = executed("errors")

    # only the cells tagged raises-exception fail, and each of them does
    for c in run.code_cells():
        failed = bool(outputs(c, "error")) or "UsageError" in stream(c, "stderr")
        assert failed == ("raises-exception" in c.metadata.get("tags", [])), c.source

    # an exception keeps its type: except ValueError catches it; a note names the item
    c = run.cell("squares = %poolmap -f check range(20)")
    assert stream(c) == "caught ValueError: 7 is not allowed\npoolmagic: item 7 (value 7) failed.\n"
    summary = summaries(c)[0]
    # how many items finish before item 7 fails depends on timing: at least 1, never 20
    done = re.search(r"(\d+)/20 items", summary)
    assert done and 1 <= int(done[1]) <= 19 and "1 failed" in summary, summary

    # results that finished are kept, the rest are NOT_DONE; the error is in .errors
    out = stream(run.cell("finished = {i: r"))
    m = re.match(r"(\d+) of 20 items finished: (\{.*\})\nerrors: \{7: ValueError\('7 is not allowed'\)\}\n$", out)
    assert m, out
    finished = ast.literal_eval(m[2])
    assert int(m[1]) == len(finished) >= 1 and 7 not in finished
    assert all(r == i * i for i, r in finished.items()), finished

    # uncaught: the traceback shows the cell's own line, under the cell's own number
    c = run.cell("def check_again")
    e = error(c)
    assert (e.ename, e.evalue) == ("ValueError", "7 is not allowed")
    tb = strip_ansi("\n".join(e.traceback))
    assert 'raise ValueError(f"{x} is not allowed")' in tb and "poolmagic: item 7 (value 7) failed." in tb, tb
    assert set(re.findall(r"Cell In\[(\d+)\]", tb)) == {str(c.execution_count)}, tb

    # bad input: one plain sentence, no traceback
    for snippet, message in (
        ("def add_offset", "UsageError: add_offset() uses the name 'OFSET', which is not defined\n"),
        ("%poolmap -f check 42", "UsageError: ITERABLE is an int, which is not iterable\n"),
    ):
        c = run.cell(snippet)
        assert stream(c, "stderr") == message and not outputs(c, "error"), c.outputs

    # a worker that exits: named item and exit code; the next map works
    e = error(run.cell("def fragile"))
    assert e.ename == "WorkerCrashedError"
    assert "item 3 (3)" in e.evalue and "exit code 1" in e.evalue, e.evalue
    assert value(run.cell("def times_ten")) == "[0, 10, 20, 30]"

    # --keep-going: every item ran; one error lists the failures
    e = error(run.cell("--keep-going"))
    assert e.ename == "MapFailedError"
    assert e.evalue.startswith("2 of 10 items failed:") and "item 3: ValueError" in e.evalue and "item 7: ValueError" in e.evalue
    out = stream(run.cell("print({i: repr(e)"))
    assert out.splitlines()[0] == "[0, 1, 2, NOT_DONE, 4, 5, 6, NOT_DONE, 8, 9]", out

    # --timeout: an ItemTimeoutError, which is a TimeoutError; the pool is whole again
    out = stream(run.cell("--timeout 0.5"))
    assert out.startswith("caught ItemTimeoutError: item 2 (5.0) ran longer than the 0.5 s timeout"), out
    assert stream(run.code_cells()[-1]).endswith("pool warm\n")


def test_bad_input_shows_only_the_sentence(executed):
    run = executed("errors")
    for snippet in ("def add_offset", "%poolmap -f check 42"):
        c = run.cell(snippet)
        assert summaries(c) == [], f"{snippet!r} displayed {summaries(c, 'text/plain')}"


def test_crash_traceback_shows_no_engine_internals(executed):
    tb = strip_ansi("\n".join(error(executed("errors").cell("def fragile")).traceback))
    assert "EOFError" not in tb and "During handling" not in tb, tb


def test_tutorial(executed):
    """Every idiom of the multiprocessing tutorial, as the tutorial notebook shows it."""
    run = executed("tutorial")
    assert "cores available" in stream(run.cell("%load_ext"))
    (show,) = [c for c in run.code_cells() if c.source == "squares"]
    assert value(show) == str([x * x for x in range(10)])
    # map_async: the next cell ran while the map was still running, .get() gave the results
    assert "the kernel is free while the map runs: False" in stream(run.cell("handle.ready()"))
    assert value(run.cell("handle.get(")) == str([x * x for x in range(6)])
    assert summaries(run.cell("--async -o handle"))  # the live display
    assert "pi ≈ 3.1" in stream(run.cell("pi = 4 *"))
    assert value(run.cell("--star zip(bases, exponents)")) == str([2**10, 3**5, 4**3])
    assert value(run.cell("partial(scale, factor=10)")) == str([0, 10, 20, 30, 40])
    assert value(run.cell("--kw factor=100")) == str([0, 100, 200, 300, 400])
    assert value(run.cell("math.factorial range(8)")) == str([1, 1, 2, 6, 24, 120, 720, 5040])
    tune = run.cell("--tune")
    html = [o.data["text/html"] for o in outputs(tune, "execute_result")]
    assert html and "<svg" in html[0]
    # a size chosen, or (other processes held the CPUs) the size kept, saying so
    assert "pool size set to" in html[0] or ("pool size kept at" in html[0] and "no conclusion" in html[0]), html[0]
    assert "shut down" in stream(run.cell("--shutdown"))
    assert value(run.cell("abs [-1, -2]")) == "[1, 2]"
