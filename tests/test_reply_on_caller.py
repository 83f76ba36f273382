"""A quiet map's reply read on its caller's thread (Manager.read_reply), and every way it can go wrong.

A blocking map that is one quiet chunk into an idle warm pool is sent from the
caller's thread (Manager.add_direct); that thread then reads the reply too,
while the manager thread does not watch that worker's pipe. These tests check
the manager takes no turn for such maps, and that a crash, a timeout, an
interrupt of the caller and the memory guard still end such a map as they end
any other: each map here is checked to have been lent (``lends``).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import in_thread

import poolmagic
from poolmagic import Pool
from poolmagic.engine.core import caller
from poolmagic.engine.local.manager import Manager

FAST = 10.0  # a hang guard, never a timing claim
linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="quiet chunks and /proc: Linux")


@pytest.fixture
def lends(monkeypatch):
    """Every read_reply call: (the worker's pid, whether the map had ended when it returned)."""
    seen: list[tuple[int, bool]] = []
    real = Manager.read_reply

    def spy(self, p, job, budget):
        try:
            real(self, p, job, budget)
        finally:
            seen.append((p.pid, job.finished.is_set()))

    monkeypatch.setattr(Manager, "read_reply", spy)
    return seen


@pytest.fixture
def turns(monkeypatch):
    """How many turns the manager thread has taken."""
    count = [0]
    real = Manager._turn

    def spy(self, ready):
        count[0] += 1
        return real(self, ready)

    monkeypatch.setattr(Manager, "_turn", spy)
    return count


def _warm(pool: Pool) -> None:
    for _ in range(3):  # workers started and ready; the items known to be fast: one chunk per map
        assert pool.map(abs, [-1, -2, -3, -4]) == [1, 2, 3, 4]


def _crash_at_one(x: int) -> int:
    if x == 1:
        os._exit(7)
    return x


def _sleep_then(x: float) -> float:
    time.sleep(x)
    return x


def _pid_then_sleep(path: str) -> int:
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(60)
    return 0


def _hog(n: int) -> int:
    held = b"x" * n  # resident at once
    time.sleep(20)
    return len(held)


@linux_only
def test_a_small_blocking_map_takes_no_manager_turn(lends, turns):
    """The reply is read by the caller's thread: no manager turn per map (one each before)."""
    with Pool(2) as pool:
        _warm(pool)
        before, lent_before = turns[0], len(lends)
        for k in range(50):
            assert pool.map(abs, [-k, -1, -2, -3]) == [k, 1, 2, 3]
        lent = lends[lent_before:]
        assert len(lent) == 50, "every map into the idle warm pool was lent to its caller"
        ended_here = sum(done for _, done in lent)
        # a loaded host may stretch a map past NUDGE_S: then the manager finishes it, as before
        # (a turn for the hand-back, one for the nudge, one for the reply at most)
        assert ended_here >= 25, lent
        assert turns[0] - before <= 3 * (50 - ended_here), (turns[0] - before, ended_here)
        assert pool.backend.manager._lent is None, "each caller handed its worker's pipe back"


@linux_only
def test_a_crash_while_the_caller_reads_is_a_crash(lends, monkeypatch):
    """os._exit in a lent map: the caller sees the pipe end, hands it back, the manager
    reports the crash naming the item, and the pool goes on."""
    monkeypatch.setattr(caller, "NUDGE_S", 60.0)  # the caller holds the pipe all the map long
    with Pool(2) as pool:
        _warm(pool)
        n = len(lends)
        with pytest.raises(poolmagic.errors.WorkerCrashedError) as info:
            pool.map(_crash_at_one, [0, 1, 2, 3], chunksize=4)  # one chunk: a lent map
        assert len(lends) > n, "the crashing map was lent to its caller"
        assert "item 1" in str(info.value)
        assert pool.map(abs, [-5, -6]) == [5, 6]


@linux_only
def test_a_timeout_while_the_caller_reads_fires(lends, monkeypatch):
    """A timed item in a lent map: the caller hands the pipe back by its deadline and
    the manager kills the worker as for any timed-out item."""
    monkeypatch.setattr(caller, "NUDGE_S", 60.0)
    with Pool(2) as pool:
        _warm(pool)
        n = len(lends)
        t, outcome = in_thread(lambda: pool.map(_sleep_then, [30.0], timeout=0.5))
        t.join(FAST)
        assert not t.is_alive(), "the timeout of a lent map never fired"
        assert len(lends) > n, "the timed map was lent to its caller"
        assert isinstance(outcome.get("error"), poolmagic.errors.ItemTimeoutError), outcome
        assert pool.map(abs, [-5]) == [5]


@linux_only
def test_an_interrupt_of_the_caller_while_it_reads_stops_the_map(lends, monkeypatch, tmp_path):
    """SIGINT to the caller's thread while it waits on the lent pipe: KeyboardInterrupt,
    the running item's worker is killed (as for any interrupted map), the pool goes on."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default KeyboardInterrupt handler here")
    monkeypatch.setattr(caller, "NUDGE_S", 60.0)
    marker = str(tmp_path / "pid")
    main = threading.get_ident()

    def interrupt() -> None:
        stop = time.monotonic() + FAST
        while not os.path.exists(marker) and time.monotonic() < stop:
            time.sleep(0.01)
        time.sleep(0.05)  # the caller is in its wait on the pipe
        signal.pthread_kill(main, signal.SIGINT)

    with Pool(2) as pool:
        _warm(pool)
        n = len(lends)
        t = threading.Thread(target=interrupt)
        t.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                pool.map(_pid_then_sleep, [marker])
        finally:
            t.join()
        assert len(lends) > n, "the interrupted map was lent to its caller"
        pid = int(open(marker).read())
        stop = time.monotonic() + FAST
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < stop:
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{pid}"), "the interrupted item's worker still runs"
        assert pool.map(abs, [-5, -6]) == [5, 6]


@linux_only
def test_the_memory_guard_stops_a_lent_map(lends):
    """The memory guard's first look at a lent map comes when the caller hands the pipe
    back after NUDGE_S and nudges the manager: the item over --max-memory is stopped."""
    with Pool(2) as pool:
        _warm(pool)
        n = len(lends)
        t, outcome = in_thread(lambda: pool.map(_hog, [300 << 20], max_memory="100MB"))
        t.join(FAST)
        assert not t.is_alive(), "the memory of a lent map was not watched"
        assert len(lends) > n, "the map was lent to its caller"
        assert isinstance(outcome.get("error"), poolmagic.errors.WorkerMemoryError), outcome
        assert pool.map(abs, [-5]) == [5]


@linux_only
def test_a_cancel_from_another_thread_ends_a_lent_map(lends, monkeypatch):
    """A cancel from another thread (Backend.cancel, as an async handle's cancel does) of a
    lent blocking map: the manager kills the worker while the caller holds the pipe; the
    caller finds it gone and returns with the map's error."""
    monkeypatch.setattr(caller, "NUDGE_S", 60.0)
    jobs: list = []
    real = Manager.read_reply

    def grab(self, p, job, budget):
        jobs.append(job)
        return real(self, p, job, budget)

    monkeypatch.setattr(Manager, "read_reply", grab)
    with Pool(2) as pool:
        _warm(pool)
        jobs.clear()
        t, outcome = in_thread(lambda: pool.map(_sleep_then, [30.0]))
        stop = time.monotonic() + FAST
        while not jobs and time.monotonic() < stop:
            time.sleep(0.01)
        assert jobs, "the map was lent to its caller"
        pool.backend.cancel(jobs[0], RuntimeError("cancelled from outside"))
        t.join(FAST)
        assert not t.is_alive(), "the cancelled lent map never returned"
        assert "error" in outcome, outcome
        assert pool.map(abs, [-5]) == [5]


@linux_only
def test_an_interrupt_inside_the_reply_s_handling_kills_the_worker(lends, monkeypatch):
    """A KeyboardInterrupt that lands while the caller reads or handles a message (here
    raised from the handling, where a signal's handler would raise it) leaves the pipe
    in an unknown state: the worker is killed and the map stopped; the pool goes on."""
    from poolmagic.engine.local.outcomes import Outcomes

    main = threading.get_ident()
    real = Outcomes.handle
    hit: list[int] = []

    def handle(self, p, msg, frames):
        if threading.get_ident() == main and not hit:
            hit.append(p.pid)
            raise KeyboardInterrupt
        return real(self, p, msg, frames)

    with Pool(2) as pool:
        _warm(pool)
        monkeypatch.setattr(Outcomes, "handle", handle)
        with pytest.raises(KeyboardInterrupt):
            pool.map(abs, [-1, -2, -3, -4])
        monkeypatch.setattr(Outcomes, "handle", real)
        assert hit, "the reply was handled on the caller's thread"
        stop = time.monotonic() + FAST
        while os.path.exists(f"/proc/{hit[0]}") and time.monotonic() < stop:
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{hit[0]}"), "the worker whose pipe was mid-read still runs"
        assert pool.map(abs, [-5, -6]) == [5, 6]


@linux_only
def test_a_map_whose_items_do_not_pickle_leaves_no_pipe_lent(lends):
    """Its one chunk never leaves (the items do not pickle): the pipe taken out of the
    manager's wait for it is put back at once, and the next map is lent as usual."""
    with Pool(2) as pool:
        _warm(pool)
        with pytest.raises(Exception):
            pool.map(abs, [threading.Lock()])
        assert pool.backend.manager._lent is None, "a pipe stayed out of the manager's wait"
        n = len(lends)
        assert pool.map(abs, [-5, -6]) == [5, 6]
        assert len(lends) == n + 1
