"""The threads backend's own parts: what it refuses, what it says, what only threads can do.

What it shares with every backend is tested in tests/backends/ (the
``backend`` fixture runs those on threads too). Here: options that need what
threads lack are refused before any work, ``%poolsize`` says GIL or
free-threaded (from the interpreter itself) and what threads cannot do, items
and results are never pickled, print() from threads running at once is filed
under each one's item, and a cancelled map's running items finish in the
background without holding up the next map.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import pytest
from conftest import in_thread, run_script, wait_for
from IPython.core.error import UsageError

import poolmagic
from poolmagic import NOT_DONE, BadInputError, Pool
from poolmagic.engine.events import ChunkFinished
from poolmagic.engine.threads import LACKS, ThreadsBackend, gil_enabled

pytestmark = pytest.mark.timeout(60)
SRC = str(Path(poolmagic.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def pool():
    p = Pool(2, backend="threads")
    yield p
    p.shutdown()


def touch(path):
    Path(path).write_text("ran")
    return path


# ---------------------------------------------------------------- refused before any work


@pytest.mark.parametrize("options,flag,capability", [
    ({"timeout": 1}, "--timeout", "kill-on-timeout"),
    ({"max_memory": "1GB"}, "--max-memory", "memory-limit"),
    ({"threads": 1}, "--threads", "native-thread-limit"),
])
def test_an_option_threads_cannot_honour_is_refused_before_any_work(pool, tmp_path, options, flag, capability):
    marker = tmp_path / "ran"
    with pytest.raises(BadInputError) as ei:
        pool.run(touch, [str(marker)], **options)
    msg = str(ei.value)
    assert msg.startswith(flag) and "threads backend" in msg and LACKS[capability] in msg, msg
    assert "--backend local" in msg, msg
    assert not marker.exists(), "an item ran"


def test_the_pools_own_memory_limit_is_refused_too(pool, tmp_path):
    pool.max_memory = 10**9
    try:
        with pytest.raises(BadInputError, match="--max-memory"):
            pool.run(touch, [str(tmp_path / "ran")])
    finally:
        pool.max_memory = None
    assert not (tmp_path / "ran").exists()
    assert pool.map(len, ["ab"]) == [2]


def test_dask_only_arguments_are_refused():
    with pytest.raises(BadInputError, match="address="):
        Pool(backend="threads", address="tcp://127.0.0.1:8786")
    with pytest.raises(BadInputError, match="dashboard="):
        Pool(backend="threads", dashboard=True)


def test_an_initializer_is_refused_not_ignored():
    with pytest.raises(BadInputError, match="initializer= and maxtasksperchild="):
        Pool(2, backend="threads", initializer=print)
    with pytest.raises(BadInputError, match="initializer= and maxtasksperchild="):
        Pool(2, backend="threads", maxtasksperchild=5)


def test_many_threads_are_not_warned_about(recwarn):
    Pool(64, backend="threads").shutdown()
    assert not [w for w in recwarn if "workers on" in str(w.message)]


def test_the_magic_does_not_warn_about_many_threads_either(ip, capsys):
    """%poolsize 64 --backend threads: no 'more processes than cores' note (it is what threads are for)."""
    try:
        ip.run_line_magic("poolsize", "64 --backend threads")
        out = capsys.readouterr().out
        assert "64 workers · threads in this process" in out and "workers on" not in out, out
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the note is printed once, not also warned from switch.py
            ip.run_line_magic("poolsize", "64 --backend local")
        assert capsys.readouterr().out.count("more processes than cores") == 1
    finally:
        poolmagic.shutdown_pool()


def test_the_magic_refuses_timeout_on_threads(ip, capsys):
    ip.run_line_magic("poolsize", "2 --backend threads")
    try:
        out = capsys.readouterr().out
        assert "2 workers · threads in this process" in out, out
        with pytest.raises(UsageError, match="--timeout"):
            ip.run_cell_magic("poolmap", "--timeout 1 range(3)", "def f(x):\n    return x\n")
        assert ip.run_cell_magic("poolmap", "-q range(3)", "def f(x):\n    return x + 1\n") == [1, 2, 3]
        ip.run_line_magic("poolsize", "--backend local")
        assert "local processes" in capsys.readouterr().out
        assert ip.run_cell_magic("poolmap", "-q --timeout 5 range(3)", "def f(x):\n    return x + 1\n") == [1, 2, 3]
    finally:
        poolmagic.shutdown_pool()


# ---------------------------------------------------------------- what it says


def test_status_says_gil_or_free_threaded_and_what_threads_cannot_do(pool):
    text = pool.status()
    mode = "GIL" if gil_enabled() else "free-threaded"
    assert f"2 workers · threads in this process ({mode})" in text, text
    assert ("CPU-bound Python items take turns" in text) == gil_enabled(), text
    for why in LACKS.values():
        assert why in text, text
    assert pool.last_report is None or pool.last_report.backend == pool.backend.description


def test_gil_detection_is_the_interpreters_own():
    """No mock: what this interpreter says of itself, and a fresh one's status line agrees."""
    expected = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    assert gil_enabled() is expected
    if not sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert gil_enabled(), "a build with the GIL cannot run without it"
    out, err, code = run_script("import poolmagic\nprint(poolmagic.Pool(1, backend='threads').status())")
    assert code == 0, err
    assert ("(GIL)" in out) is expected and ("(free-threaded)" in out) is (not expected), out


def _free_threaded_python() -> str | None:
    for name in ("python3.14t", "python3.13t"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


@pytest.mark.skipif(_free_threaded_python() is None, reason="no free-threaded Python (3.13t/3.14t) on PATH")
def test_a_free_threaded_python_is_said_to_be_one():
    """The same check on a real free-threaded build, with the GIL off and forced back on."""
    exe = _free_threaded_python()
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from poolmagic.engine.threads import gil_enabled; "
             "print(gil_enabled())")
    for gil, want in (("0", "False"), ("1", "True")):
        env = dict(os.environ, PYTHON_GIL=gil)
        got = subprocess.run([exe, "-c", probe, SRC], capture_output=True, text=True, env=env, timeout=60)
        if got.returncode != 0:
            pytest.skip(f"poolmagic does not import on {exe}: {got.stderr[-300:]}")
        assert got.stdout.strip() == want, (gil, got.stdout, got.stderr)


# ---------------------------------------------------------------- only on threads


def lock_of(x):
    return threading.Lock(), x  # a result no process could send back


def test_items_and_results_are_never_pickled(pool):
    locks = [threading.Lock() for _ in range(3)]
    got = pool.map(id, locks)
    assert got == [id(lk) for lk in locks]  # the very objects, not copies
    results = pool.map(lock_of, range(3))
    assert [x for _, x in results] == [0, 1, 2]
    assert all(type(lk) is type(threading.Lock()) for lk, _ in results)
    assert pool.map(lambda _: os.getpid(), range(2)) == [os.getpid()] * 2


SAID = threading.Event()


def interleaved(x):
    """Item 0 prints, waits until item 1 has printed (on the other thread), prints again."""
    if x == 0:
        print("0 first")
        assert SAID.wait(30), "item 1 never printed"
        print("0 second")
    else:
        print("1 only")
        SAID.set()
    return x


def test_print_from_threads_running_at_once_lands_under_each_item(pool, capsys):
    SAID.clear()
    r = pool.run(interleaved, range(2), chunksize=1)
    assert r.results == [0, 1]
    assert capsys.readouterr().out == "0 first\n0 second\n1 only\n"
    assert [o[0] for o in r.outputs] == [0, 1]


GATE = threading.Event()
STARTED = threading.Semaphore(0)


def held(x):
    STARTED.release()
    assert GATE.wait(30), "the gate never opened"
    return 10 * x


def test_a_cancelled_maps_running_items_finish_in_the_background_and_the_next_map_runs(pool):
    GATE.clear()
    handle = pool.map_async(held, range(4), chunksize=1)
    for _ in range(2):  # both threads hold an item
        assert STARTED.acquire(timeout=30)
    handle.cancel()
    assert handle.ready() and handle.report.status == "cancelled"
    with pytest.raises(poolmagic.errors.MapCancelledError):
        handle.get(1)
    # the held items still run; fresh threads took their slots
    assert pool.map(len, ["a", "bb", "ccc"]) == [1, 2, 3]
    GATE.set()
    r = handle.report
    assert wait_for(lambda: r.results[:2] == [0, 10], what="the running items' late results")
    assert r.results[2:] == [NOT_DONE, NOT_DONE]  # never started
    assert wait_for(lambda: len(pool.backend._threads) == 2, what="the pool back to 2 threads")


def test_an_interrupted_map_says_its_running_items_go_on(pool):
    """Ctrl-C while a map waits on threads: the note said 'the running items were stopped',
    which a thread cannot be; they finish in the background."""
    import _thread

    GATE.clear()
    while STARTED.acquire(blocking=False):  # what an earlier test left
        pass

    def interrupt_once_both_hold_an_item():
        for _ in range(2):
            assert STARTED.acquire(timeout=30)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_both_hold_an_item, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as ei:
        pool.run(held, range(4), chunksize=1)
    notes = getattr(ei.value, "__notes__", [])
    assert notes == ["poolmagic: interrupted; items already running finish in the background "
                     "(a thread cannot be stopped) and 0 of 4 results kept (_poolmap.results)."], notes
    GATE.set()
    r = ei.value.poolmap_report
    assert wait_for(lambda: r.results[:2] == [0, 10], what="the running items' late results")


def inner_map(x):
    return poolmagic.get_pool().map(abs, [x])


def test_an_item_that_maps_over_its_own_pool_is_refused_not_deadlocked():
    p = poolmagic.set_pool(Pool(2, backend="threads"))
    try:
        with pytest.raises(poolmagic.errors.NestedPoolError, match="same pool") as ei:
            p.map(inner_map, range(4), chunksize=1)
        assert any(n.startswith("poolmagic: item ") and n.endswith("failed.") for n in ei.value.__notes__)
        assert p.map(abs, [-1]) == [1]
    finally:
        poolmagic.shutdown_pool()


FIRST_BACK = threading.Event()


def in_turn(x, folder):
    """Item 1 returns only once item 0 has: its chunk is answered while item 0's is being published."""
    Path(folder, f"{x}.{len(list(Path(folder).glob(f'{x}.*')))}").touch()
    if x == 0:
        FIRST_BACK.set()
    else:
        assert FIRST_BACK.wait(30)
    return x


class HoldFirstChunk:
    """A display that is slow to take chunk 0's end (as a busy observer can be), until chunk 1 ended too."""

    def attach(self, job):
        self.second = threading.Event()
        self.seen: list = []  # in the order an observer after this one (the checkpoint writer's) sees them
        job.observers.append(self)  # before the checkpoint writer's observer
        job.observers.append(lambda event: self.seen.append(type(event).__name__))

    def __call__(self, event):
        if type(event) is ChunkFinished:
            if event.record.start == 0:
                self.second.wait(2)  # chunk 1 cannot end meanwhile (answers are serialised): give up
            else:
                self.second.set()

    def tick(self):
        pass

    def close(self):
        pass


def test_observers_see_a_maps_end_after_all_its_chunks(pool, tmp_path):
    """Regression: two threads answering at once published the map's end (MapFinished) before
    chunk 0's ChunkFinished, which a slow observer was still taking: the checkpoint writer was
    told "close" before chunk 0's records (they survived only because its fsync runs later)."""
    FIRST_BACK.clear()
    marks, ck = tmp_path / "marks", str(tmp_path / "run.ckpt")
    marks.mkdir()
    kw = {"folder": str(marks)}
    watch = HoldFirstChunk()
    assert pool.run(in_turn, range(2), chunksize=1, checkpoint=ck, kwargs=kw, watch=watch).results == [0, 1]
    assert watch.seen[-1] == "MapFinished" and watch.seen.count("ChunkFinished") == 2, watch.seen
    again = pool.run(in_turn, range(2), chunksize=1, checkpoint=ck, kwargs=kw)
    assert again.results == [0, 1] and again.resumed == (2, 0), again.resumed
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "1.0"]


def test_registered_by_name():
    p = Pool(3, backend="threads")
    try:
        assert isinstance(p.backend, ThreadsBackend) and p.size == 3
        assert p.backend.worker_pids() == [] and p.backend.state == "cold"
        p.start()
        assert p.backend.state == "warm"
    finally:
        p.shutdown()


def draw_both(x):
    import random

    import numpy as np

    return random.random(), float(np.random.random())


def test_a_seeded_map_leaves_the_kernels_own_random_streams_as_they_were(pool):
    """Seeded items seed the process's ``random`` and ``np.random``; on threads that process is
    the kernel, whose streams were left on the last item's numbers: ``random.random()`` in the
    next cell drew item 5's next number (on any other backend the kernel's streams are untouched)."""
    import random

    import numpy as np

    from poolmagic.engine import seeds

    items = []
    for i in range(6):  # each item's own numbers, as a worker draws them
        seeds.seed_item(7, i)
        items.append(draw_both(i))
    seeds.clear()
    random.seed(123)
    np.random.seed(456)
    expected = (random.random(), float(np.random.random()))
    random.seed(123)
    np.random.seed(456)
    assert pool.map(draw_both, range(6), seed=7, chunksize=1) == items
    assert (random.random(), float(np.random.random())) == expected


def test_rerun_leaves_the_kernels_own_random_streams_as_they_were(pool):
    """``rerun`` (and %pooldebug) seeds the kernel for the item: afterwards its streams are back."""
    import random

    import numpy as np

    r = pool.run(draw_both, range(3), seed=7)
    random.seed(123)
    np.random.seed(456)
    expected = (random.random(), float(np.random.random()))
    random.seed(123)
    np.random.seed(456)
    assert r.rerun(2) == r.results[2]
    assert (random.random(), float(np.random.random())) == expected


def naps(x):
    import time

    time.sleep(0.02)
    return x


def test_the_card_never_advises_threads_it_refuses(pool):
    """A seeded map (its items run one at a time on threads) was 'slower than a plain loop'
    and its card said why: '2 native threads each: 4 threads on 2 cores; try --threads 1',
    an option this backend refuses, about thread pools it never limits."""
    pool.resize(2)
    r = pool.run(naps, range(8), seed=5)
    assert r.threads is None
    assert "--threads" not in r.summary()
    assert not [f for f in r.analysis(all_findings=True).findings if f.kind == "threads"]


def held_until(x, gate):
    """Says it started, then waits for the gate file (a thread cannot be stopped)."""
    Path(f"{gate}-started-{x}").write_text("")
    while not os.path.exists(gate):
        threading.Event().wait(0.01)
    return x


def test_a_map_waiting_behind_a_cancelled_one_that_held_every_thread_runs(tmp_path):
    """An --async map held both threads; a blocking map waited; the async one was cancelled:
    its threads were let go and no fresh ones were started while a map still waited, so the
    blocking map hung for ever."""
    gate = str(tmp_path / "gate")
    p = Pool(2, backend="threads")
    try:
        handle = p.map_async(held_until, range(2), chunksize=1, kwargs={"gate": gate})
        assert wait_for(lambda: len(list(tmp_path.glob("gate-started-*"))) == 2)
        t, out = in_thread(lambda: p.map(abs, [-1, -2, -3]))
        assert wait_for(lambda: len(p._life.running()) == 2)  # it waits for a thread
        handle.cancel()
        t.join(30)
        assert not t.is_alive(), "the map behind the cancelled one hangs"
        assert out == {"value": [1, 2, 3]}, out
    finally:
        Path(gate).write_text("")  # the held threads may leave
        p.shutdown()



@pytest.mark.timeout(60)
def test_a_function_that_holds_what_cannot_be_pickled_maps_on_threads():
    """The threads backend calls the function itself: a lock, a connection or an open file a
    notebook function reads is fine, where every map was refused ('cannot be sent to the
    workers: ... cannot be pickled')."""
    ns = {"__name__": "__main__", "LOCK": threading.Lock()}
    exec("def under_lock(x):\n    with LOCK:\n        return x * 2\n", ns)  # a notebook's: pickled by value
    with Pool(2, backend="threads") as pool:
        assert pool.map(ns["under_lock"], range(5)) == [0, 2, 4, 6, 8]
