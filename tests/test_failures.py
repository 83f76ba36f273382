"""Fault injection: every failure is fast, clear and recoverable (issue #3).

Each test breaks something for real -- a worker that exits, segfaults, is
SIGKILLed or hangs, a function that raises, an item or a result that cannot be
pickled, bad input -- and checks what the user sees: the exception type and
message, the results that were kept, how long it took, and that the next map
works with no manual step and no worker process is left behind.

Conventions:

* Functions mapped here live in this module; the module is registered with
  cloudpickle to be pickled *by value*, exactly like functions defined in a
  notebook (workers never import this test module).
* Every test that needs isolation uses its own ``Pool(2)``; the fixture shuts it
  down and checks that no worker outlives it.
* Time bounds are generous (< 10 s): they tell a hang from a prompt return.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time

import cloudpickle
import psutil
import pytest
from IPython.core.error import UsageError

import poolmagic
from poolmagic import NOT_DONE, Pool

from conftest import check_partial, descendants, read_pid, run_script, shutdown_and_check, wait_dead, wait_for, write_pid

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- helpers


# wait_for, read_pid/write_pid and shutdown_and_check are conftest's.


def next_map_works(pool: Pool, n: int = 20) -> None:
    """The pool serves the next map right (a hang is caught by the test's timeout, not a clock)."""
    assert pool.map(double, range(n)) == [2 * x for x in range(n)]


def replaced(pool: Pool, dead_pid: int) -> list[int]:
    """Wait until the pool is back to full size without ``dead_pid``."""
    def ok():
        pids = pool.backend.worker_pids()
        return pids if len(pids) == pool.size and dead_pid not in pids else None

    pids = wait_for(ok, 5.0)
    assert pids, f"pool not back to {pool.size} workers: {pool.backend.worker_pids()}"
    return pids


@pytest.fixture
def pool():
    """A private Pool(2) on the default start method."""
    p = Pool(2)
    yield p
    shutdown_and_check(p)


@pytest.fixture
def sm_pool(start_method):
    """A private Pool(2) on each safe start method."""
    p = Pool(2, start_method=start_method)
    yield p
    shutdown_and_check(p)


# ---------------------------------------------------------------- mapped functions
# (pickled by value, like notebook code)


def double(x):
    return 2 * x


def exit_at(x, piddir, bad=3, code=3, delay=0.3):
    if x == bad:
        write_pid(piddir, x)
        time.sleep(delay)  # the other items finish first
        os._exit(code)
    return 2 * x


def segfault_at(x, piddir, bad=2, delay=0.3):
    if x == bad:
        import ctypes
        import resource

        write_pid(piddir, x)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        time.sleep(delay)
        ctypes.string_at(0)
    return 2 * x


def sleep_at(x, piddir, bad=1, seconds=60.0, others=0.0):
    if x == bad:
        write_pid(piddir, x)
        time.sleep(seconds)
    elif others:
        time.sleep(others)
    return 2 * x


def raise_at(x, bad=4, delay=0.3):
    if x == bad:
        time.sleep(delay)  # the items before it finish first
        raise ValueError(f"bad item {x}")
    return 2 * x


def first_raises_rest_sleep(x, piddir):
    if x == 0:
        time.sleep(0.2)  # let the other workers start their sleeps
        raise RuntimeError("item zero is broken")
    write_pid(piddir, x)
    time.sleep(5)
    open(os.path.join(piddir, f"done-{x}"), "w").close()  # only if the pool let a cancelled item finish
    return x


def raise_every_third(x):
    if x % 3 == 2:
        raise ValueError(f"no {x}")
    return 2 * x


def return_unpicklable(x, kind="generator"):
    if x == 1:
        time.sleep(0.3)  # item 0 finishes first
        if kind == "generator":
            return (i for i in range(3))
        return threading.Lock()
    return 2 * x


def import_helper(x):
    import helper_mod

    return helper_mod.VALUE


class _SlowToLoad:
    """Captured data that takes ``delay`` s to unpickle in a worker (a big array, a model)."""

    def __init__(self, delay):
        self.delay = delay

    def __reduce__(self):
        return (_load_slowly, (self.delay,))


def _load_slowly(delay):
    time.sleep(delay)
    return delay


def uses_slow_data(x, data=None):
    time.sleep(0.03)
    return 2 * x


# ================================================================ worker crashes


def test_crash_os_exit(sm_pool, tmp_path):
    """os._exit(3) in item 3: WorkerCrashedError naming item and exit code, fast."""
    sm_pool.map(double, range(4))  # warm
    with pytest.raises(poolmagic.WorkerCrashedError) as ei:
        # one worker: the items before the crash surely finished first (no timing)
        sm_pool.map(exit_at, range(10), kwargs={"piddir": str(tmp_path)}, workers=1)
    exc = ei.value
    msg = str(exc)
    assert "item 3" in msg and "exit code 3" in msg, msg
    assert exc.indices == [3]
    assert exc.exitcode == 3
    assert "poolmagic: item 3 (value 3) failed." in getattr(exc, "__notes__", [])
    results = exc.report.results
    assert exc.poolmap_report is exc.report
    check_partial(results, [2 * x for x in range(10)], failed={3})
    assert results[:3] == [0, 2, 4]  # finished before the crash: kept
    dead = read_pid(tmp_path, 3)
    assert not wait_dead([dead]), "the crashed worker still runs"
    next_map_works(sm_pool)
    replaced(sm_pool, dead)


def test_crash_segfault(sm_pool, tmp_path):
    """A segfault (ctypes.string_at(0)) is reported as SIGSEGV for its item."""
    with pytest.raises(poolmagic.WorkerCrashedError) as ei:
        sm_pool.map(segfault_at, range(8), kwargs={"piddir": str(tmp_path)}, workers=1)
    exc = ei.value
    assert "item 2" in str(exc) and "SIGSEGV" in str(exc), str(exc)
    assert exc.indices == [2]
    assert exc.exitcode == -signal.SIGSEGV
    check_partial(exc.report.results, [2 * x for x in range(8)], failed={2})
    assert exc.report.results[:2] == [0, 2]
    dead = read_pid(tmp_path, 2)
    assert not wait_dead([dead])
    next_map_works(sm_pool)
    replaced(sm_pool, dead)


def test_crash_sigkill_from_outside(sm_pool, tmp_path):
    """A worker SIGKILLed by someone else (OOM killer): the map fails, it does not
    wait for the item (60 s: longer than the test's timeout) that will never come back."""
    killed = []

    def killer():
        pid = read_pid(tmp_path, 1)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(poolmagic.WorkerCrashedError) as ei:
        sm_pool.map(sleep_at, range(6), kwargs={"piddir": str(tmp_path), "seconds": 60})
    t.join(10)
    assert killed, "the killer thread did not run"
    pid = killed[0]
    exc = ei.value
    assert "item 1" in str(exc) and "SIGKILL" in str(exc), str(exc)
    assert exc.indices == [1]
    assert exc.exitcode == -signal.SIGKILL
    check_partial(exc.report.results, [2 * x for x in range(6)], failed={1})
    assert not wait_dead([pid])
    next_map_works(sm_pool)
    replaced(sm_pool, pid)


# ================================================================ exceptions


def asks(x):
    if x == 0:
        try:
            return input("fallback? ")
        except EOFError:  # as at the end of any input: the function's own fallback still works
            return "default"
    return input("value? ")


def test_input_in_a_worker_says_why_it_cannot_ask(pool):
    """A loop in the notebook would have asked; a worker's stdin is /dev/null, and the item failed
    with a bare 'EOFError: EOF when reading a line'."""
    with pytest.raises(EOFError, match=r"input\(\) cannot ask anyone in a worker: .*--kw NAME=EXPR") as ei:
        pool.map(asks, range(2), chunksize=1)
    assert ei.value.poolmap_report.results[0] == "default"


def test_exception_same_type_with_note_and_partial_results(sm_pool):
    try:
        sm_pool.map(raise_at, range(10))
    except ValueError as exc:  # the user's own except clause works
        caught = exc
    else:
        pytest.fail("no exception")
    assert type(caught) is ValueError
    assert str(caught) == "bad item 4"
    assert "poolmagic: item 4 (value 4) failed." in caught.__notes__
    report = caught.poolmap_report
    assert report is sm_pool.last_report
    assert report.status == "failed"
    check_partial(report.results, [2 * x for x in range(10)], failed={4})
    assert report.results[:4] == [0, 2, 4, 6]
    assert set(report.errors) == {4}
    next_map_works(sm_pool)


# ================================================================ timeouts


def test_timeout_api(sm_pool, tmp_path):
    """Item 2 hangs (60 s, beyond the test's timeout) under timeout=0.5: it is stopped.
    The others (0.05 s, 10x under the timeout) are not: their results are kept."""
    sm_pool.map(double, range(4))  # warm: the timeout is about the item
    with pytest.raises(poolmagic.ItemTimeoutError) as ei:
        sm_pool.map(
            sleep_at, range(8), timeout=0.5,
            kwargs={"piddir": str(tmp_path), "bad": 2, "seconds": 60, "others": 0.05},
        )
    exc = ei.value
    assert isinstance(exc, TimeoutError)
    assert "item 2" in str(exc), str(exc)
    assert exc.index == 2 and exc.timeout == 0.5
    results = exc.report.results
    check_partial(results, [2 * x for x in range(8)], failed={2})
    assert results[:2] == [0, 2]  # other items' results are kept
    pid = read_pid(tmp_path, 2)
    assert not wait_dead([pid]), "the timed-out worker was not killed"
    replaced(sm_pool, pid)
    next_map_works(sm_pool)


def test_timeout_via_magic(ip, tmp_path):
    ip.user_ns["_piddir"] = str(tmp_path)
    cell = (
        "import os, time\n"
        "def hangs_at_one(x):\n"
        "    if x == 1:\n"
        "        open(os.path.join(_piddir, 'pid-1'), 'w').write(str(os.getpid()))\n"
        "        time.sleep(60)\n"
        "    return x\n"
    )
    with pytest.raises(poolmagic.ItemTimeoutError) as ei:  # item 1 would sleep past the test's timeout
        ip.run_cell_magic("poolmap", "--timeout 0.5 range(4)", cell)
    assert isinstance(ei.value, TimeoutError)
    assert "item 1" in str(ei.value)
    assert ip.user_ns["_poolmap"] is ei.value.report
    assert set(ip.user_ns["_poolmap"].errors) == {1}
    assert ip.user_ns["_poolmap"].results[0] == 0
    pid = int((tmp_path / "pid-1").read_text())
    assert not wait_dead([pid])
    assert ip.run_cell_magic("poolmap", "-q range(3)", "def ok(x):\n    return -x\n") == [0, -1, -2]


def test_timeout_counts_item_time_not_worker_startup(sm_pool):
    """Items of 0.03 s under timeout=0.5 s, but the function's data takes 5 s to load
    (margins of 10x each way: no clock is read, the map must simply succeed).

    The clock must start when the item begins, not when the chunk is sent:
    otherwise a fresh worker still starting (spawn) or unpickling captured
    data is killed as "timed out" -- and so is its replacement, forever.
    (Was a bug: fixed in 50540d3.)
    """
    data = _SlowToLoad(5.0)
    assert sm_pool.map(uses_slow_data, range(4), timeout=0.5, kwargs={"data": data}) == [0, 2, 4, 6]


def test_timeout_keep_going_kills_only_the_hung_worker(sm_pool, tmp_path):
    """keep_going + timeout: the hung item fails, its worker is killed, the rest run."""
    n = 10
    with pytest.raises(poolmagic.MapFailedError) as ei:
        sm_pool.map(
            sleep_at, range(n), timeout=0.5, keep_going=True,
            kwargs={"piddir": str(tmp_path), "bad": 1, "seconds": 60, "others": 0.05},
        )
    exc = ei.value
    assert set(exc.errors) == {1}
    assert isinstance(exc.errors[1], poolmagic.ItemTimeoutError)
    results = exc.report.results
    assert [r for i, r in enumerate(results) if i != 1] == [2 * i for i in range(n) if i != 1]
    pid = read_pid(tmp_path, 1)
    assert not wait_dead([pid]), "the hung worker was not killed"
    replaced(sm_pool, pid)
    next_map_works(sm_pool)


# ================================================================ failure policy


def test_default_policy_stops_at_first_failure(pool, tmp_path):
    """Item 0 raises; the others would sleep 5 s each: cancelled, not waited for
    (a sleeper that was let finish leaves a done-<item> file)."""
    pool.map(double, range(4))  # warm
    with pytest.raises(RuntimeError, match="item zero is broken") as ei:
        pool.map(first_raises_rest_sleep, range(10), kwargs={"piddir": str(tmp_path)})
    assert not list(tmp_path.glob("done-*")), "the map waited for items it should have cancelled"
    results = ei.value.poolmap_report.results
    assert results == [NOT_DONE] * 10
    sleepers = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    assert sleepers, "no other item started"
    assert not wait_dead(sleepers), "workers running cancelled items were not stopped"
    next_map_works(pool)


def test_keep_going_api(pool):
    n = 12
    with pytest.raises(poolmagic.MapFailedError) as ei:
        pool.map(raise_every_third, range(n), keep_going=True)
    exc = ei.value
    bad = {2, 5, 8, 11}
    msg = str(exc)
    assert "4 of 12 items failed" in msg, msg
    assert "item 2" in msg and "item 5" in msg, msg
    assert set(exc.errors) == bad
    for i, e in exc.errors.items():
        assert type(e) is ValueError and str(e) == f"no {i}"
    results = exc.report.results
    for i in range(n):  # every item ran
        assert results[i] is NOT_DONE if i in bad else results[i] == 2 * i
    assert exc.report.done == n - len(bad)


def test_keep_going_crash_fails_only_that_item(sm_pool, tmp_path):
    """os._exit in one item of a 10-item chunk: only that item fails."""
    n = 40
    with pytest.raises(poolmagic.MapFailedError) as ei:
        sm_pool.map(
            exit_at, range(n), keep_going=True, chunksize=10,
            kwargs={"piddir": str(tmp_path), "bad": 13, "code": 5, "delay": 0},
        )
    exc = ei.value
    assert set(exc.errors) == {13}
    err = exc.errors[13]
    assert isinstance(err, poolmagic.WorkerCrashedError)
    assert "item 13" in str(err) and "exit code 5" in str(err), str(err)
    assert "1 of 40 items failed" in str(exc)
    results = exc.report.results
    assert [r for i, r in enumerate(results) if i != 13] == [2 * i for i in range(n) if i != 13]
    assert results[13] is NOT_DONE
    next_map_works(sm_pool)


# ================================================================ pickling


def test_unpicklable_item(pool):
    pool.map(double, range(2))
    with pytest.raises(poolmagic.ItemPicklingError) as ei:
        pool.map(double, [1, threading.Lock(), 3])
    msg = str(ei.value)
    assert "item 1" in msg and "_thread.lock" in msg, msg
    next_map_works(pool)


@pytest.mark.parametrize("kind, type_name", [("generator", "generator"), ("lock", "_thread.lock")])
def test_unpicklable_result(pool, kind, type_name):
    with pytest.raises(poolmagic.ItemPicklingError) as ei:
        pool.map(return_unpicklable, range(4), kwargs={"kind": kind})
    msg = str(ei.value)
    assert "item 1" in msg and type_name in msg, msg
    assert ei.value.report.results[0] == 0
    assert ei.value.report.results[1] is NOT_DONE
    next_map_works(pool)


# ================================================================ bad input


_GLOBAL_LOCK = threading.Lock()


def uses_global_lock(x):
    with _GLOBAL_LOCK:
        return x


def uses_undefined_name(x):
    return x + _no_such_name_anywhere  # noqa: F821


@pytest.fixture
def cold_pool():
    """A pool that must never start: bad input is rejected before any work."""
    p = Pool(2)
    yield p
    assert p.backend.state == "cold" and p.backend.worker_pids() == [], "work started on bad input"
    shutdown_and_check(p)


def test_bad_input_captured_lock(cold_pool):
    with pytest.raises(poolmagic.BadInputError) as ei:
        cold_pool.map(uses_global_lock, range(3))
    assert isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert "'_GLOBAL_LOCK'" in msg and "_thread.lock" in msg, msg


def test_bad_input_captured_open_file(cold_pool, tmp_path):
    with open(tmp_path / "log.txt", "w") as log:

        def writes_log(x):
            log.write(str(x))
            return x

        with pytest.raises(poolmagic.BadInputError) as ei:
            cold_pool.map(writes_log, range(3))
    msg = str(ei.value)
    assert "'log'" in msg and "TextIOWrapper" in msg, msg


def test_bad_input_undefined_global(cold_pool):
    with pytest.raises(poolmagic.BadInputError) as ei:
        cold_pool.map(uses_undefined_name, range(3))
    assert "'_no_such_name_anywhere'" in str(ei.value)
    assert "not defined" in str(ei.value)


def test_bad_input_not_iterable(cold_pool):
    with pytest.raises(poolmagic.BadInputError) as ei:
        cold_pool.map(double, 42)
    assert "int" in str(ei.value) and "not iterable" in str(ei.value)


def test_bad_input_star_with_non_sequence_item(cold_pool):
    with pytest.raises(poolmagic.BadInputError) as ei:
        cold_pool.starmap(pow, [(2, 3), 5, (1, 1)])
    msg = str(ei.value)
    assert "item 1" in msg and "int" in msg, msg


def test_star_over_a_stream_with_a_non_sequence_item_points_at_the_function(ip, capsys):
    """A stream's items are not checked before the map: the worker's TypeError has no frame of
    the user's, and its traceback ended at poolmagic's ``raise job.error`` in maprun.py."""
    import re

    ip.run_cell("def pairs_then_five():\n    yield (1, 2)\n    yield 5\n")
    capsys.readouterr()
    result = ip.run_cell("%%poolmap --star pairs_then_five()\ndef add_s(a, b):\n    return a + b\n")
    assert isinstance(result.error_in_exec, TypeError)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "----> 1 def add_s(a, b):" in shown and "maprun.py" not in shown, shown
    # (starmap's words or the call's, by the worker's path: "'int' object is not iterable",
    # "add_s() argument after * must be an iterable, not int")
    assert re.search(r"TypeError: .*iterable", shown) and "item 1 (value 5) failed" in shown, shown


def test_magic_bad_input_shows_no_stale_summary(ip, capsys):
    """Bad input shows no summary and keeps ``_poolmap``: no map ran.

    (Was a bug: the previous map's summary was displayed again; fixed in bc5f2ec.)
    """
    ip.run_cell_magic("poolmap", "range(3)", "def fine(x):\n    return x\n")
    previous = ip.user_ns["_poolmap"]
    capsys.readouterr()
    with pytest.raises(UsageError):
        ip.run_cell_magic("poolmap", "42", "def fine(x):\n    return x\n")
    out = capsys.readouterr().out
    assert "poolmagic:" not in out, f"a summary was shown for a map that never ran: {out!r}"
    assert ip.user_ns["_poolmap"] is previous


# ================================================================ memory


def gated(x, gate, _open=[]):  # noqa: B006 -- per-worker cache of "the gate is open"
    if not _open:
        while not os.path.exists(gate):
            time.sleep(0.005)
        _open.append(True)
    return x


def nothing(x):
    return None


def test_generator_is_streamed_not_materialised(pool, tmp_path):
    """2 million items from a generator: only what the workers hold is consumed."""
    n = 2_000_000
    consumed = [0]

    def numbers():
        for i in range(n):
            consumed[0] = i + 1
            yield i

    gate = tmp_path / "open"
    handle = pool.map_async(gated, numbers(), kwargs={"gate": str(gate)})
    try:
        assert wait_for(lambda: consumed[0] > 0, 5.0), "no item was taken"
        time.sleep(0.5)  # workers are blocked on their first items now
        early = consumed[0]
        assert early < 1000, f"{early} of {n} items were pulled while workers were blocked"
    finally:
        gate.touch()
    results = handle.get(timeout=30)
    assert consumed[0] == n
    assert len(results) == n and results[:3] == [0, 1, 2] and results[-1] == n - 1


def test_read_ahead_stays_small_for_fast_function(pool):
    """While 2 million trivially fast items stream, items pulled but not yet done stay few.

    (Was a bug, fixed in 89e1df2: chunks were sized to ~25 ms of work only, so
    a ~50 ns function held ~4 x 550k items in flight -- 70% of the input, and
    the kernel's peak RSS grew as much as if the input were a list. Now a
    stream is taken at most 32,768 items a chunk: ~131k in flight here.)
    """
    n = 2_000_000
    pool.map(double, range(4))  # warm
    worst = [0]

    def numbers():
        for i in range(n):
            if not i % 1000:
                worst[0] = max(worst[0], i - pool.last_report.done)
            yield i

    results = pool.map(nothing, numbers())
    assert len(results) == n
    assert worst[0] < n // 10, f"{worst[0]:,} of {n:,} items were held at once"


# ================================================================ no orphans


def _helper(p: psutil.Process) -> bool:
    """multiprocessing's forkserver / resource tracker (shared by every pool)."""
    try:
        cmd = " ".join(p.cmdline())
        return "resource_tracker" in cmd or ("forkserver import main" in cmd and p.ppid() == os.getpid())
    except psutil.NoSuchProcess:
        return True


def test_no_worker_outlives_its_pool(tmp_path):
    """Crash, timeout, exception, interrupt-free cancel: after shutdown nothing is left."""
    baseline = {p.pid for p in descendants()}
    for d in ("crash", "timeout", "running"):
        (tmp_path / d).mkdir()
    pool = Pool(2)
    seen: set[int] = set()
    try:
        pool.map(double, range(4))
        seen |= set(pool.backend.worker_pids())
        with pytest.raises(poolmagic.WorkerCrashedError):
            pool.map(exit_at, range(6), kwargs={"piddir": str(tmp_path / "crash"), "delay": 0})
        seen |= set(pool.backend.worker_pids())
        with pytest.raises(poolmagic.ItemTimeoutError):
            pool.map(sleep_at, range(4), timeout=0.3, kwargs={"piddir": str(tmp_path / "timeout")})
        seen |= set(pool.backend.worker_pids())
        with pytest.raises(ValueError):
            pool.map(raise_at, range(6), kwargs={"delay": 0})
        handle = pool.map_async(sleep_at, range(4), kwargs={"piddir": str(tmp_path / "running"), "bad": 0, "seconds": 30, "others": 30})
        read_pid(tmp_path / "running", 0)
        seen |= set(pool.backend.worker_pids())
    finally:
        for d in ("crash", "timeout", "running"):
            seen |= {int(p.read_text()) for p in (tmp_path / d).glob("pid-*")}
        pool.shutdown()  # with a map still running
    with pytest.raises(poolmagic.PoolmapError, match="shut down"):
        handle.get(timeout=5)
    assert len(seen) >= 3
    assert not wait_dead(seen), "worker processes outlived pool.shutdown()"

    def leftovers():
        return [p for p in descendants() if p.pid not in baseline and not _helper(p)]

    assert wait_for(lambda: not leftovers(), 5.0), f"new processes after shutdown: {leftovers()}"
    with pytest.raises(poolmagic.PoolmapError, match="shut down"):
        pool.map(double, range(2))


def test_shutdown_leaves_no_zombies(start_method):
    """After shutdown() the worker pids are gone, not left as zombies.

    Whether a kill lands before multiprocessing polls the child is a race, so
    several pools are tried; each is checked before the next one starts
    (starting a process reaps finished children as a side effect).
    (Was a bug under spawn: fixed in 50540d3.)
    """
    zombies = []
    for _ in range(3):
        pool = Pool(2, start_method=start_method)
        pool.map(double, range(4))
        pids = pool.backend.worker_pids()
        pool.shutdown()
        assert not wait_dead(pids), "workers still running after shutdown()"
        time.sleep(0.1)
        zombies += [p for p in pids if psutil.pid_exists(p)]
    assert not zombies, f"killed workers left as zombies: {zombies}"


# ================================================================ security


def test_local_backend_opens_no_network_socket(pool):
    pool.map(double, range(8))
    me = psutil.Process()
    listening = [c for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening == [], listening
    workers = pool.backend.worker_pids()
    assert len(workers) == 2
    others = [p.pid for p in descendants() if _helper(p)]  # the forkserver too
    for pid in workers + others:
        conns = psutil.Process(pid).net_connections(kind="inet")
        assert conns == [], f"pid {pid} has inet sockets: {conns}"


# ================================================================ stale code


def test_changed_user_module_is_reimported(pool, tmp_path, monkeypatch):
    mod = tmp_path / "helper_mod.py"
    mod.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "helper_mod" not in sys.modules
    assert pool.map(import_helper, range(6)) == [1] * 6
    first = set(pool.backend.worker_pids())

    mod.write_text("VALUE = 2\n")
    st = os.stat(mod)
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert pool.map(import_helper, range(6)) == [2] * 6
    second = set(pool.backend.worker_pids())
    assert not first & second, "workers that imported the old module were kept"

    assert pool.map(import_helper, range(6)) == [2] * 6
    assert set(pool.backend.worker_pids()) == second, "workers recycled with nothing changed"
    assert "helper_mod" not in sys.modules  # the parent never imported it


def test_exit_with_a_users_fork_pool_still_open_does_not_hang(tmp_path):
    """A user's fork Pool, forked after the forkserver, holds its "alive" pipe.

    Stopping the forkserver at exit used to wait for that pipe to close, which
    only happens after multiprocessing's own exit handler ends the Pool: the
    interpreter hung at exit for ever.
    """
    script = tmp_path / "fork_pool_at_exit.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "poolmagic")
        ip.run_cell("def noop(x):\\n    return x\\n")
        assert ip.run_cell("%%poolmap -q -o r range(4)\\ndef noop(x):\\n    return x\\n").success
        P = mp.get_context("fork").Pool(2)   # forked after the forkserver started
        assert P.map(abs, [-1, -2]) == [1, 2]
        print("done", flush=True)
    """))
    out, err, code = run_script(script, timeout=30)
    assert "done" in out and code == 0, err[-2000:]


def test_script_that_never_shuts_its_pool_down_exits_cleanly(tmp_path):
    """A script maps on a Pool(8) and simply ends.

    The map can finish before the manager thread has started all eight
    workers. multiprocessing's exit handler terminated the children it saw,
    then joined every child, including one started in between that nobody
    had terminated: the interpreter hung at exit (or raised "process object
    is closed" when the manager reaped a worker first).
    """
    script = tmp_path / "no_shutdown.py"
    script.write_text(textwrap.dedent("""
        import poolmagic
        def double(x):
            return 2 * x
        pool = poolmagic.Pool(8)
        print(sum(pool.map(double, range(16))), flush=True)
    """))
    for _ in range(4):
        out, err, code = run_script(script, timeout=20)
        assert out.strip() == "240" and code == 0, err[-2000:]
        assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]


# ------------------------------------------- a failed map's drain and the manager's turn


class SlowToLoad:
    """A result whose unpickling in the kernel takes 0.5 s: the manager is busy meanwhile."""

    def __reduce__(self):
        return (time.sleep, (0.5,))


def fail_while_the_manager_is_busy(x):
    if x == 0:  # fails while the manager unpickles item 1's result
        time.sleep(0.2)
        raise ValueError("item 0 fails")
    if x == 1:
        return SlowToLoad()
    time.sleep(0.3)  # lands in the same turn as item 0's failure
    return x


def test_a_failure_that_drains_another_worker_does_not_stop_the_manager():
    """Regression (CI, a hung test_tutorial): item 0's failure ends the map, which takes
    the result item 2's worker had already sent; that worker's pipe was ready in the same
    turn, and the manager then blocked for good reading it, empty. Every later map hung."""
    p = Pool(3)
    try:
        for _ in range(3):
            with pytest.raises(ValueError, match="item 0 fails"):
                p.run(fail_while_the_manager_is_busy, range(3), chunksize=1)
        next_map_works(p)
    finally:
        shutdown_and_check(p)
