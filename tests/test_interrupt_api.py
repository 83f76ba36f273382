"""Interrupts: KeyboardInterrupt in the caller while a map waits, SIGINT at workers.

A real kernel interrupt (SIGINT to the kernel's process group from Jupyter) is
covered by the end-to-end tests; here the two halves are tested directly in
this process with real worker processes:

* the caller's main thread gets KeyboardInterrupt while ``Pool.run`` waits:
  the map stops at once, the workers running its items are killed and
  replaced, and the next map runs;
* the workers get SIGINT (as they do from Jupyter, which signals the whole
  process group): they ignore it and the map completes.
"""
from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from conftest import alive, shutdown_and_check, wait_dead, write_pid, written_pids
from poolmagic import NOT_DONE, Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)



# ---------------------------------------------------------------- mapped functions


def double(x):
    return 2 * x


def sleep_long(x, piddir):
    write_pid(piddir, x)
    time.sleep(30)
    open(os.path.join(piddir, f"done-{x}"), "w").close()  # only if it was let finish
    return x


def slow_double(x):
    time.sleep(0.3)
    return 2 * x


# ---------------------------------------------------------------- KeyboardInterrupt in the caller


class Interrupter:
    """Raise KeyboardInterrupt in the main thread after ``delay`` s, unless disarmed first.

    Disarming right after the map returns keeps a late interrupt from escaping
    the test (and stopping the whole pytest session) if poolmagic returns early.
    """

    def __init__(self, delay: float, how: str):
        self.how = how
        self.fired_at: float | None = None
        self._armed = True
        self._lock = threading.Lock()
        self._timer = threading.Timer(delay, self._fire)
        self._timer.daemon = True

    def start(self) -> "Interrupter":
        self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self._armed = False
            self.fired_at = time.monotonic()
            if self.how == "interrupt_main":
                _thread.interrupt_main()
            else:  # a real SIGINT to this process, as a terminal's ^C
                os.kill(os.getpid(), signal.SIGINT)

    def disarm(self) -> None:
        with self._lock:
            self._armed = False
        self._timer.cancel()


@pytest.mark.parametrize("how", ["interrupt_main", "sigint"])
def test_keyboard_interrupt_while_waiting(tmp_path: Path, how: str):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default KeyboardInterrupt handler here")
    pool = Pool(2)
    try:
        pool.map(double, range(4))  # warm
        intr = Interrupter(0.5, how).start()
        with pytest.raises(KeyboardInterrupt) as ei:
            try:
                pool.map(sleep_long, range(6), kwargs={"piddir": str(tmp_path)})
            finally:
                intr.disarm()
        assert intr.fired_at is not None
        assert not list(tmp_path.glob("done-*")), "run() waited for the items instead of stopping on KeyboardInterrupt"
        report = ei.value.poolmap_report
        assert report.status == "cancelled"
        assert report.results == [NOT_DONE] * 6
        sleepers = list(written_pids(tmp_path).values())
        assert len(sleepers) == 2, sleepers  # both workers were running a 30 s sleep
        assert not wait_dead(sleepers), "the workers running the interrupted items still run"
        assert pool.map(double, range(10)) == [2 * x for x in range(10)]
        assert not set(sleepers) & set(pool.backend.worker_pids())
    finally:
        shutdown_and_check(pool)


def test_keyboard_interrupt_while_getting_a_background_map_says_the_map_goes_on(tmp_path: Path):
    """Ctrl-C in ``handle.get()`` stops the wait, not the map (as multiprocessing's): the
    interrupt said nothing of it, its traceback threading's lock frames."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default KeyboardInterrupt handler here")
    import traceback

    pool = Pool(2)
    try:
        handle = pool.map_async(sleep_long, range(3), kwargs={"piddir": str(tmp_path)})
        intr = Interrupter(0.5, "sigint").start()
        with pytest.raises(KeyboardInterrupt) as ei:
            try:
                handle.get(20)
            finally:
                intr.disarm()
        assert intr.fired_at is not None
        notes = getattr(ei.value, "__notes__", [])
        assert notes == ["poolmagic: interrupted the wait, not the map: sleep_long() goes on in the background "
                         "(0 of 3 items done); .cancel() stops it"], notes
        shown = "".join(traceback.format_exception(ei.value))
        assert "threading.py" not in shown, shown
        assert not handle.ready() and handle.report.status == "running"
        handle.cancel()
        assert handle.wait(10) and handle.report.status == "cancelled"
    finally:
        shutdown_and_check(pool)


def test_keyboard_interrupt_while_imap_waits_stops_its_items(tmp_path: Path):
    """Ctrl-C while ``next()`` of an imap waited left the map running: its 30 s items, then the
    rest of its ITERABLE, for results no one would read, and the next map waited behind them."""
    from poolmagic.errors import MapCancelledError

    pool = Pool(2)
    try:
        pool.map(double, range(4))  # warm
        it = pool.imap(sleep_long, range(20), kwargs={"piddir": str(tmp_path)})

        def interrupt_once_both_run() -> None:  # and next() waits: never outside pytest.raises
            deadline = time.monotonic() + 20
            while (len(written_pids(tmp_path)) < 2 or not it._cond._waiters) and time.monotonic() < deadline:
                time.sleep(0.01)
            _thread.interrupt_main()

        threading.Thread(target=interrupt_once_both_run, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            next(it)
        sleepers = list(written_pids(tmp_path).values())
        assert len(sleepers) == 2, sleepers
        assert not wait_dead(sleepers), "the workers running the interrupted imap's items still run"
        assert it.report.status == "cancelled"
        with pytest.raises(MapCancelledError, match="interrupted"):
            next(it)
        assert pool.map(double, range(10)) == [2 * x for x in range(10)]
        assert not list(tmp_path.glob("done-*"))
    finally:
        shutdown_and_check(pool)


# ---------------------------------------------------------------- SIGINT at the workers


def test_sigint_to_workers_is_ignored(start_method, capfd):
    """SIGINT at every worker, every 50 ms, during a map: no worker dies, no traceback."""
    pool = Pool(2, start_method=start_method)
    stop = threading.Event()
    sent = [0]
    try:
        pool.map(double, range(4))  # warm
        pids = sorted(pool.backend.worker_pids())
        assert len(pids) == 2

        def poke():
            while not stop.is_set():
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGINT)
                        sent[0] += 1
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)

        t = threading.Thread(target=poke, daemon=True)
        t.start()
        try:
            results = pool.map(slow_double, range(8))
        finally:
            stop.set()
            t.join(2)
        assert sent[0] >= 10
        assert results == [2 * x for x in range(8)]
        assert sorted(pool.backend.worker_pids()) == pids, "a worker was replaced"
        assert all(alive(p) for p in pids)
    finally:
        shutdown_and_check(pool)
    if start_method == "spawn":  # spawn workers write to this test's captured stderr
        err = capfd.readouterr().err
        assert "KeyboardInterrupt" not in err and "Traceback" not in err, err


# A fresh interpreter, like a kernel that just ran %load_ext poolmagic: the
# first pool starts multiprocessing's resource tracker (and the forkserver)
# from its manager thread. SIGINT goes to each pool's workers every millisecond
# from the moment they exist; three pools in a row give six start-ups a chance
# to be hit (forkserver's window is narrow). The script prints how many
# workers died and whether each next map worked.
_STARTUP_SCRIPT = """
import os, signal, sys, time
from poolmagic import Pool

deaths, ok = 0, True
for _ in range(3):
    pool = Pool(2, start_method=sys.argv[1])
    seen = set()
    pool.start()
    # signal every worker from the moment it appears until both have been hit a
    # while (a loaded machine may take seconds to start them: wait, don't guess)
    deadline, hits = time.monotonic() + 20, 0
    while time.monotonic() < deadline and len(seen) <= 2 and hits < 200:
        for pid in pool.backend.worker_pids():
            try:
                os.kill(pid, signal.SIGINT)
                seen.add(pid)
            except ProcessLookupError:
                pass
        if len(seen) >= 2:
            hits += 1
        time.sleep(0.001)
    try:
        ok = pool.map(abs, range(-2, 2)) == [2, 1, 0, 1]
    except Exception as exc:
        ok = repr(exc)
    pool.shutdown()
    deaths += len(seen) - 2
    if deaths or ok is not True:
        break
print("RESULT", deaths, ok)
"""


def test_sigint_while_workers_start(start_method, tmp_path):
    """Jupyter signals the whole process group: an interrupt can reach a worker as it starts.

    No worker may die of it: a worker killed while starting is replaced, but a
    chunk already sent to it fails with WorkerCrashedError (signal SIGINT).
    (Was a bug: fixed in 50540d3, then for fresh processes in 89e1df2 -- the
    resource tracker's start unblocked SIGINT in the manager thread.)
    """
    proc = subprocess.run(
        [sys.executable, "-c", _STARTUP_SCRIPT, start_method],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    _, deaths, ok = line.split(" ", 2)
    assert int(deaths) == 0, f"{deaths} workers died of SIGINT while starting\n{proc.stderr}"
    assert ok == "True", ok
    assert "KeyboardInterrupt" not in proc.stderr, proc.stderr
