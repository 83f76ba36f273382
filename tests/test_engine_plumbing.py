"""The engine's plumbing added for speed and clean exits: the Waiter, prestart,
stopping the forkserver, forked children and death detection.

Each test here pins down one property that no end-to-end test sees, because
breaking it leaves every map's results right: a manager thread that spins, a
wake-up written into someone else's file, a leaked descriptor, a forkserver
that boots without the worker module, a dead worker noticed only when a
grandchild lets go of its pipe, results a dying worker had already sent.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

import poolmagic
from poolmagic import Pool
from poolmagic.engine.local.waiter import Waiter

from conftest import in_thread, read_pid, run_script, write_pid

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)

FAST = 10.0
linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")


# ================================================================ Waiter


@pytest.mark.skipif(os.name != "posix", reason="the epoll/wake-pipe Waiter is POSIX only")
def test_wake_after_close_never_writes_into_a_reused_descriptor():
    """close() frees the wake pipe's numbers; the OS hands them to the next file
    opened. A late wake() (a command sent to a pool being shut down) must not
    write a byte into that file."""
    import fcntl

    w = Waiter()
    old_wake_w = w._wake_w
    w.close()
    r0, w0 = os.pipe()
    # move the new pipe out of the way, then put its write end at the old number
    r, wfd = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 900) for fd in (r0, w0))
    os.close(r0)
    os.close(w0)
    os.set_blocking(r, False)
    try:
        os.dup2(wfd, old_wake_w)  # someone else's pipe now has the old number
        w.wake()
        try:
            got = os.read(r, 16)
        except BlockingIOError:
            got = b""
        assert got == b"", f"wake() after close() wrote {got!r} into a reused descriptor"
    finally:
        for fd in (r, wfd, old_wake_w):
            os.close(fd)


@pytest.mark.skipif(os.name != "posix", reason="the epoll/wake-pipe Waiter is POSIX only")
def test_wake_never_blocks_even_when_nobody_waits():
    """Any thread may call wake() (every command does). With no wait() draining
    the pipe for a while, the pipe fills: wake() must still return at once."""
    w = Waiter()
    done = threading.Event()

    def many() -> None:
        for _ in range(200_000):  # > a 64 KiB pipe buffer of one-byte wake-ups
            w.wake()
        done.set()

    threading.Thread(target=many, daemon=True).start()
    try:
        assert done.wait(FAST), "wake() blocked on a full wake pipe"
        assert w.wait(0) == []  # one drained wake-up, not returned
        assert w.wait(0) == []  # and nothing left pending
    finally:
        if done.is_set():
            w.close()


@pytest.mark.skipif(os.name != "posix", reason="the epoll/wake-pipe Waiter is POSIX only")
def test_waiter_reports_a_wake_up_once_then_blocks_again():
    w = Waiter()
    try:
        w.wake()
        w.wake()
        assert w.wait(1.0) == []
        t0 = time.monotonic()
        assert w.wait(0.2) == []
        assert time.monotonic() - t0 >= 0.15, "the wake-up was not drained: wait() returns at once for ever"
    finally:
        w.close()


def test_idle_pool_uses_no_cpu():
    """Between maps the manager thread sleeps in one wait: an idle warm pool
    costs the kernel no CPU (a wake-up left undrained makes it spin)."""
    with Pool(2) as pool:
        assert pool.map(abs, range(-8, 8)) == [abs(x) for x in range(-8, 8)]
        time.sleep(0.3)
        me = psutil.Process()
        before = sum(me.cpu_times()[:2])
        time.sleep(1.0)
        used = sum(me.cpu_times()[:2]) - before
    assert used < 0.3, f"an idle pool used {used:.2f} s of CPU in 1 s"


# ================================================================ descriptors


@linux_only
def test_pools_and_forkserver_restarts_leak_no_descriptors():
    """A Pool's shutdown closes its waiter (epoll set, wake pipe); stopping the
    forkserver closes the kernel's end of its "alive" pipe and removes its
    socket file. Nothing may be left behind per pool or per restart."""
    out, err, code = run_script("""
        import os
        from multiprocessing import forkserver
        from poolmagic import Pool
        from poolmagic.engine.processes import stop_helper_processes

        sockets_left = 0

        def cycle():
            global sockets_left
            with Pool(1, start_method="forkserver") as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]
            address = forkserver._forkserver._forkserver_address
            stop_helper_processes()
            if address and not address.startswith("\\0") and os.path.exists(address):
                sockets_left += 1

        cycle()  # first use opens what stays open for good (resource tracker ...)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(4):
            cycle()
        print("LEAKED", len(os.listdir("/proc/self/fd")) - before, flush=True)
        print("SOCKETS_LEFT", sockets_left, flush=True)
    """)
    assert code == 0, err[-2000:]
    assert "LEAKED 0" in out, out + err[-2000:]
    assert "SOCKETS_LEFT 0" in out, out + err[-2000:]


# ================================================================ prestart


@linux_only
def test_prestart_boots_the_forkserver_warm_and_with_sigint_blocked():
    """prestart() (first thing %load_ext does) boots the forkserver in the
    background: with the worker module and the kernel's numpy preloaded, and
    with SIGINT blocked so that a worker it forks cannot die of an interrupt
    before it ignores SIGINT."""
    pytest.importorskip("numpy")
    out, err, code = run_script("""
        import signal, sys, time
        import numpy  # the notebook imported numpy before %load_ext
        from multiprocessing import forkserver
        from poolmagic.engine.processes import prestart, stop_helper_processes

        # "returns at once", with no clock: the boot needs the forkserver's lock, held
        # here until prestart() returned; a prestart() that waited for it would hang
        with forkserver._forkserver._lock:
            prestart("forkserver")
            print("RETURNED", True, flush=True)
        deadline = time.monotonic() + 20
        while forkserver._forkserver._forkserver_pid is None and time.monotonic() < deadline:
            time.sleep(0.005)
        pid = forkserver._forkserver._forkserver_pid
        print("BOOTED", pid is not None, flush=True)
        if pid is None:
            sys.exit(0)
        # the pid is known from fork on; until the child has exec'd, its cmdline is this script's
        # (multiprocessing's spawnv_passfds does not wait for the exec)
        while True:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
            if "forkserver import main" in cmdline or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        print("PRELOAD_WORKER", "'poolmagic.engine.worker'" in cmdline)
        print("PRELOAD_NUMPY", "'numpy'" in cmdline)
        status = open(f"/proc/{pid}/status").read()
        blocked = int(next(l for l in status.splitlines() if l.startswith("SigBlk:")).split()[1], 16)
        print("SIGINT_BLOCKED", bool(blocked & (1 << (signal.SIGINT - 1))), flush=True)
        stop_helper_processes(tracker=True)
    """)
    assert code == 0, err[-2000:]
    lines = dict(ln.split(" ", 1) for ln in out.splitlines() if " " in ln)
    assert lines["RETURNED"] == "True", "prestart() must return at once"
    assert lines["BOOTED"] == "True", "prestart() did not start the forkserver"
    assert lines["PRELOAD_WORKER"] == "True", out
    assert lines["PRELOAD_NUMPY"] == "True", out
    assert lines["SIGINT_BLOCKED"] == "True", "the forkserver (and every worker it forks) starts with SIGINT deliverable"


def test_load_ext_calls_prestart_before_importing_the_rest_of_poolmagic():
    """%load_ext boots the forkserver first, so that its ~60 ms start overlaps
    the import of the rest of poolmagic (the API, the engine, cloudpickle)."""
    out, err, code = run_script("""
        import sys
        import poolmagic.extension as ext

        calls = []
        real = ext.prestart

        def spy(*args, **kwargs):
            calls.append("poolmagic.api" in sys.modules)
            return real(*args, **kwargs)

        ext.prestart = spy
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "poolmagic")
        print("CALLS", calls, flush=True)
        ip.run_line_magic("unload_ext", "poolmagic")
    """)
    assert code == 0, err[-2000:]
    assert "CALLS [False]" in out, "prestart() not called once, before poolmagic.api is imported: " + out


# ================================================================ forked children


# One script for a child made by os.fork() in a process that uses the pool; the
# child either tries a map first (child_maps) or just exits.
_FORKED_CHILD = """
    import os, signal, sys, time
    from multiprocessing import forkserver, resource_tracker
    import psutil
    import poolmagic
    from poolmagic.extension import stop_everything
    import atexit
    atexit.register(stop_everything)  # as %load_ext does

    CHILD_MAPS = {child_maps}

    def double(x):
        return 2 * x

    pool = poolmagic.get_pool()
    assert pool.map(double, range(8)) == [2 * x for x in range(8)]
    before = sorted(pool.backend.worker_pids())
    tracker = resource_tracker._resource_tracker._pid
    server = forkserver._forkserver._forkserver_pid
    pid = os.fork()
    if pid == 0:
        signal.alarm(5)  # a hang in the child dies of SIGALRM
        if CHILD_MAPS:
            try:
                pool.map(double, range(4))
                print("CHILD mapped", flush=True)
            except poolmagic.PoolmapError:
                print("CHILD refused", flush=True)
        sys.exit(0)  # runs the inherited atexit handlers in the child
    _, status = os.waitpid(pid, 0)
    print("CHILD_EXIT", os.waitstatus_to_exitcode(status), flush=True)
    time.sleep(0.1)

    def running(p):  # a killed child of ours stays a zombie: os.kill(p, 0) would still succeed
        try:
            return psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    for name, p in (("tracker", tracker), ("forkserver", server)):
        print(name, "alive" if running(p) else "dead", flush=True)
    assert pool.map(double, range(8)) == [2 * x for x in range(8)]
    after = sorted(pool.backend.worker_pids())
    print("same workers" if before == after else f"workers changed {{before}} -> {{after}}", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")
@pytest.mark.parametrize("child_maps", [True, False], ids=["child-maps-then-exits", "child-just-exits"])
def test_a_forked_child_leaves_the_parents_pool_alone(child_maps):
    """A notebook may os.fork() a child: it inherits the pool and the atexit
    handlers. Using the pool there fails at once (its manager thread was not
    forked: a map would wait for ever), and the child's exit (sys.exit runs the
    inherited atexit handlers) must not kill the parent's resource tracker,
    forkserver or workers."""
    out, err, code = run_script(_FORKED_CHILD.format(child_maps=child_maps), timeout=30)
    assert code == 0, err[-2000:]
    if child_maps:
        assert "CHILD refused" in out, out + err[-2000:]
    assert "CHILD_EXIT 0" in out, out + err[-2000:]
    assert "forkserver alive" in out, out
    assert "tracker alive" in out, out
    assert "same workers" in out, out + err[-2000:]


# ================================================================ deaths


def fork_then_exit(x, piddir):
    """Item 1 leaves a grandchild holding the worker's pipe, then the worker exits."""
    if x == 1:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        Path(piddir, "grandchild").write_text(str(pid))
        os._exit(7)
    return x


def test_death_seen_at_once_though_a_grandchild_keeps_the_pipe_open(tmp_path):
    """A function may fork (a helper tool, a user's own fork). When the worker
    dies its grandchild still holds the worker's pipe, so the pipe never reaches
    EOF: only the process sentinel tells the manager. (Under spawn the
    grandchild also holds the sentinel's write end, so this is forkserver only.)"""
    if "forkserver" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no forkserver")
    gc_file = tmp_path / "grandchild"
    with Pool(1, start_method="forkserver") as pool:
        try:
            handle = pool.map_async(fork_then_exit, range(3), chunksize=1, kwargs={"piddir": str(tmp_path)})
            assert handle.wait(FAST), "the worker's death went unnoticed while its grandchild lives"
            with pytest.raises(poolmagic.WorkerCrashedError) as ei:
                handle.get()
            assert ei.value.exitcode == 7
            assert pool.map(abs, [-1]) == [1]
        finally:
            if gc_file.exists():
                try:
                    os.kill(int(gc_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def mark_then_return(x, piddir):
    """Mark that item ``x`` started (``write_pid``); item 0 then waits for a "go" file."""
    write_pid(piddir, x)
    if x == 0:
        deadline = time.monotonic() + 20
        while not Path(piddir, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    return x


def test_results_a_worker_sent_before_it_was_killed_are_kept(tmp_path):
    """The manager reads one message per ready pipe per turn; when a worker
    dies, every message it had already sent must still be read (not just the
    next one): those items finished and must not be reported as crashed.

    The manager is held in a command while the worker finishes both chunks
    (BEGIN/DONE for each: four messages) and is then SIGKILLed."""
    with Pool(1, start_method="forkserver") as pool:
        assert pool.map(abs, [-1]) == [1]  # warm
        backend = pool.backend
        handle = pool.map_async(mark_then_return, range(2), chunksize=1, timeout=30,
                                kwargs={"piddir": str(tmp_path)})
        read_pid(tmp_path, 0, FAST)  # fails the test if item 0 never started
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(20)

        backend.manager.command(hold)  # the manager stops reading pipes until released
        try:
            assert held.wait(FAST)
            (tmp_path / "go").write_text("")
            pid = read_pid(tmp_path, 1, FAST)  # fails the test if item 1 never started
            time.sleep(0.5)  # the worker sends DONE for item 1 and goes idle
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        finally:
            release.set()
        assert handle.wait(FAST)
        assert handle.get() == [0, 1], "a finished item's result, sent before the worker died, was lost"


# ================================================================ results the kernel cannot load


def _refuse_to_load():
    raise RuntimeError("this result cannot be rebuilt here")


class _LoadsOnlyInTheWorker:
    """Pickles fine in the worker; unpickling it (in the kernel) raises."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def unloadable_at_1(x):
    return _LoadsOnlyInTheWorker() if x == 1 else x


def test_result_that_cannot_be_unpickled_in_the_kernel_fails_its_items_fast():
    """The worker pickles the chunk's results, the kernel cannot load them: the
    chunk's items fail with ItemPicklingError (not a map waiting for ever)."""
    with Pool(1) as pool:
        handle = pool.map_async(unloadable_at_1, range(4), chunksize=1)
        assert handle.wait(FAST), "a result message the kernel could not load was dropped: the map hangs"
        with pytest.raises(poolmagic.ItemPicklingError) as ei:
            handle.get()
        msg = str(ei.value)
        assert "item 1" in msg and "could not be unpickled in the kernel" in msg, msg
        assert ei.value.report.results[0] == 0
        assert pool.map(abs, [-3]) == [3]


def _hog(n: int) -> int:
    if n:
        held = b"x" * n  # resident at once
        time.sleep(20)
        return len(held)
    return 0


@linux_only
def test_a_map_sent_from_the_callers_thread_has_its_memory_watched():
    """Into an idle warm pool a map is sent from the caller's thread (Manager.add_direct)
    while the manager thread sleeps with no deadline. Its item is known to be fast,
    so its chunk is not timed and sends nothing until it ends: unless the manager is
    woken to start watching, --max-memory is never checked and the item runs its 20 s."""
    with Pool(2) as pool:
        assert pool.map(_hog, [0, 0, 0, 0]) == [0, 0, 0, 0]
        assert pool.map(_hog, [0, 0, 0, 0]) == [0, 0, 0, 0]  # known fast, warm and idle
        handle = pool.map_async(_hog, [300 << 20], max_memory="100MB")
        assert handle.wait(FAST), "the memory of a map sent from the caller's thread was not watched"
        with pytest.raises(poolmagic.errors.WorkerMemoryError):
            handle.get()
        assert pool.map(abs, [-5]) == [5]


@linux_only
def test_a_blocking_map_sent_from_the_callers_thread_has_its_memory_watched():
    """A blocking map into an idle warm pool does not wake the manager when it is sent: the
    reply would. Its caller wakes it once the map has run NUDGE_S without ending; without
    that nudge the memory guard never looks and the item runs its 20 s."""
    with Pool(2) as pool:
        assert pool.map(_hog, [0, 0, 0, 0]) == [0, 0, 0, 0]
        assert pool.map(_hog, [0, 0, 0, 0]) == [0, 0, 0, 0]  # known fast, warm and idle
        t, outcome = in_thread(lambda: pool.map(_hog, [300 << 20], max_memory="100MB"))
        t.join(FAST)
        assert not t.is_alive(), "the memory of a blocking map sent from the caller's thread was not watched"
        assert isinstance(outcome.get("error"), poolmagic.errors.WorkerMemoryError), outcome
        assert pool.map(abs, [-5]) == [5]


# ================================================================ the magic's cached parse


def test_cell_with_a_syntax_error_raises_it_not_no_function(ip):
    """A cell that does not parse runs as usual and shows its SyntaxError, not
    "the cell defines no function"."""
    with pytest.raises(SyntaxError):
        ip.run_cell_magic("poolmap", "range(3)", "def work(x):\n    return x +\n")


def test_function_found_in_a_cell_that_also_uses_ipython_syntax(ip):
    """The function is looked for in the transformed cell: a magic or a shell
    escape in the cell must not hide it."""
    body = "n = 2\n%time m = 1\nfiles = !echo a\ndef work(x):\n    return x * n\n"
    assert ip.run_cell_magic("poolmap", "range(3)", body) == [0, 2, 4]
    assert ip.user_ns["files"] == ["a"]


# ================================================================ who reads a worker's pipe


def _echo_after(x):
    time.sleep(0.2)
    return x


@pytest.mark.skipif(os.name != "posix", reason="the main thread reads the pipe only where select() takes it")
def test_big_items_sent_while_a_chunk_returns_a_big_result_do_not_deadlock():
    """While a chunk runs, the worker's reader thread has the pipe: the parent sends the
    next chunk (16 MB of items, more than a socket holds) while the worker sends back
    16 MB. Without a reader draining during the chunk both block on a full pipe for ever."""
    items = [bytes([i]) * (16 << 20) for i in range(3)]
    with Pool(1) as pool:
        handle = pool.map_async(_echo_after, items, chunksize=1)
        assert handle.wait(30), "the worker and the parent block on each other's full pipe"
        assert [r[:1] for r in handle.get()] == [b"\x00", b"\x01", b"\x02"]


def _nap_pid(x):
    time.sleep(0.5)
    return os.getpid()


def test_a_small_maps_chunk_is_quiet_and_its_worker_is_sent_nothing_until_it_answers():
    """A worker's only chunk, with nothing left to schedule, is sent quiet: the worker runs
    it with no reader thread, so the parent must not send that worker anything until it
    answers (it leaves the scheduler's capacity). Another map meanwhile runs elsewhere."""
    with Pool(2) as pool:
        assert pool.map(abs, range(4)) == list(range(4))
        backend = pool.backend
        handle = pool.map_async(_nap_pid, [0])
        seen = {}

        def look() -> None:
            busy = [p for p in backend.workers.procs.values() if p.inflight]
            seen["quiet"] = [p.inflight[-1].quiet for p in busy]
            seen["offered"] = [p in backend.workers.capacity() for p in busy]

        deadline = time.monotonic() + FAST
        while not seen.get("quiet") and time.monotonic() < deadline:
            done = threading.Event()
            backend.manager.command(lambda: (look(), done.set()))
            assert done.wait(FAST)
        assert seen["quiet"] == [True] and seen["offered"] == [False]
        other = pool.map(_pid_of, range(2), chunksize=1)
        assert handle.get()[0] not in other, "a chunk went to the worker running a quiet one"


def _pid_of(x):
    return os.getpid()


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_the_notebooks_own_multiprocessing_start_method_stays_unset(method):
    """multiprocessing's preparation data asks for the default start method, which fixes it:
    after ``%load_ext poolmagic`` and a map, the notebook's own ``mp.set_start_method("spawn")``
    raised "RuntimeError: context has already been set" (poolmagic never chose it)."""
    out, err, code = run_script(f"""
        import os
        os.environ["POOLMAGIC_START_METHOD"] = {method!r}
        import multiprocessing as mp
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.extension_manager.load_extension("poolmagic")
        assert ip.run_cell("%%poolmap -q -o r range(4)\\ndef sq(x):\\n    return x * x\\n").success
        assert ip.user_ns["r"] == [0, 1, 4, 9]
        print(mp.get_start_method(allow_none=True))
        mp.set_start_method("spawn")
        assert ip.run_cell("%%poolmap -q -o r range(4)\\ndef sq(x):\\n    return x + 1\\n").success
        print(ip.user_ns["r"])
    """, timeout=60)
    assert code == 0, err[-2000:]
    assert out.split("\n")[:2] == ["None", "[1, 2, 3, 4]"], out
