"""``--checkpoint`` against the plain loop: the same map again, in this process and in a new
one, and after the process writing the file was killed mid-map.

Items that finished are kept and never run again (their attempt files say so);
what is missing runs; the results are the loop's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
from hypothesis import assume, given

import model as M
from conftest import wait_dead, wait_for
from poolmagic import NOT_DONE
from test_properties import known_bug, markers, needs

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(M.TEST_TIMEOUT)
HERE = Path(__file__).parent


@M.budget(8)
@given(case=M.cases(slow=False, options={"keep_going": True}))
def test_checkpoint_keeps_what_finished(backend, case):
    assume(known_bug(case, backend) is None)
    needs(backend, case)
    with markers() as mk:
        path = os.path.join(mk, "ck")
        outcomes = M.expect(case, mk)
        first = M.run_case(backend.pool, case, mk, checkpoint=path)
        M.check_run(case, outcomes, first, mk)
        kept = {i: v for i, v in enumerate(first.report.results) if v is not NOT_DONE}
        ran_before = {i: M.attempts(mk, x) for i, x in enumerate(case.items)}
        outcomes = M.expect(case, mk)
        got = M.run_case(backend.pool, case, mk, checkpoint=path)
        M.check_run(case, outcomes, got, None, kept=kept)
        missing = len(case.items) - len(kept)
        if kept:
            assert got.report.resumed == (len(kept), missing), got.report.resumed
        for i in kept:
            assert M.attempts(mk, case.items[i]) == ran_before[i], f"kept item {i} ran again"


# ---------------------------------------------------------------- a new process

SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
import model as M
from poolmagic import Pool, NOT_DONE
items = {items}
plans = {{M.key(x): p for x, p in {plans}}}
with Pool(2{backend}) as pool:
    try:
        r = pool.run(M.work, items, checkpoint={path!r}, keep_going=True, chunksize=2,
                     kwargs={{"plans": plans, "markers": {mk!r}}})
    except Exception as exc:
        r = exc.poolmap_report
    ok = [M.same(v, M.compute(x)) for v, x in zip(r.results, items)]
    print(json.dumps({{"done": [v is not NOT_DONE for v in r.results], "ok": ok, "resumed": r.resumed,
                      "notes": r.notes}}))
"""

ITEMS = {  # (the ITERABLE's source, in the script; a list of its values here, for the loop)
    "ints": "list(range(12))",
    "tuples": "[(i, str(i)) for i in range(12)]",
    "arrays": "[__import__('numpy').arange(i) for i in range(12)]",
    "dataclasses": "[M.Point(i, 'p') for i in range(12)]",
    "namedtuples": "[M.Pair(i, 'p') for i in range(12)]",
    "itertuples": "list(__import__('pandas').DataFrame({'a': range(12)}).itertuples())",
    "frozensets of str": "[frozenset({'a' + str(i), 'b', 'c'}) for i in range(12)]",
}


def _script(tmp: Path, source: str, failing: list, backend: str) -> Path:
    s = tmp / f"map-{len(list(tmp.glob('map-*')))}.py"
    plans = f"[(x, ('raise_once', 'ValueError')) for i, x in enumerate(items) if i in {failing!r}]"
    s.write_text(textwrap.dedent(SCRIPT).format(
        here=str(HERE), items=source, plans=plans, path=str(tmp / "ck"), mk=str(tmp / "mk"),
        backend=f', backend="{backend}"' if backend != "local" else ""))
    return s


def _run(script: Path, timeout: float = 180) -> dict:
    # each process its own string hash seed, as two kernels have: a set's order differs
    env = dict(os.environ, PYTHONHASHSEED=str(len(list(script.parent.glob("map-*")))))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", list(ITEMS))
def test_checkpoint_resumes_in_a_new_process(kind, tmp_path):
    """Two items fail once; the same map in a new process keeps the rest and runs those two."""
    (tmp_path / "mk").mkdir()
    first = _run(_script(tmp_path, ITEMS[kind], [3, 8], "local"))
    assert first["done"] == [i not in (3, 8) for i in range(12)], first
    assert all(ok for ok, d in zip(first["ok"], first["done"]) if d)
    second = _run(_script(tmp_path, ITEMS[kind], [3, 8], "local"))
    assert second["done"] == [True] * 12 and all(second["ok"]), second
    assert second["resumed"] == [10, 2], second


def test_checkpoint_range_and_list_are_the_same_items(tmp_path):
    (tmp_path / "mk").mkdir()
    _run(_script(tmp_path, "range(12)", [3], "local"))
    second = _run(_script(tmp_path, "list(range(12))", [3], "local"))
    assert second["resumed"] == [11, 1], second


KILLED = """
import sys, time
sys.path.insert(0, {here!r})
from model import work
from poolmagic import Pool
def slow(x, plans, markers):
    time.sleep(0.05)
    return work(x, plans, markers)
import cloudpickle; cloudpickle.register_pickle_by_value(sys.modules[__name__])
with Pool(2{backend}) as pool:
    pool.run(slow, list(range({n})), checkpoint={path!r}, chunksize=2, kwargs={{"plans": {{}}, "markers": {mk!r}}})
"""


def test_checkpoint_after_the_writer_is_killed(backend, tmp_path):
    """SIGKILL the process writing the checkpoint mid-map; the same map here keeps its records."""
    mk, path, n = tmp_path / "mk", tmp_path / "ck", 60
    mk.mkdir()
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED).format(here=str(HERE), path=str(path), mk=str(mk), n=n,
                                                     backend=f', backend="{backend.name}"' if backend.name != "local" else ""))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        ran = lambda: len(list(mk.glob("attempt-*")))  # noqa: E731
        assert wait_for(lambda: ran() >= 16 or proc.poll() is not None, 120), "the map never got going"
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not wait_dead(family, 30), "processes of the killed map outlived it"
    before = {x: M.attempts(str(mk), x) for x in range(n)}
    assert sum(before.values()) < n, "the map finished before it was killed"
    report = backend.pool.run(M.work, list(range(n)), checkpoint=str(path), chunksize=2,
                              kwargs={"plans": {}, "markers": str(mk)})
    assert report.results == [M.compute(x) for x in range(n)]
    kept = report.resumed[0] if report.resumed else 0
    assert kept > 0, "no record of the killed map was kept"
    again = [x for x in range(n) if M.attempts(str(mk), x) > before[x]]
    assert len(again) == n - kept, (kept, again)
    for x in range(n):
        if x not in again:
            assert before[x] >= 1, f"item {x} is kept and never ran"
