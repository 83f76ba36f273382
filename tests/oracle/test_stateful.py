"""Sequences of maps on one warm pool, checked against the plain loop after every step.

A ``RuleBasedStateMachine``: run a map (generated items, plans, options),
resize the pool, interrupt an async map (``handle.cancel()``) or a blocking
one (KeyboardInterrupt in the waiting thread, as Ctrl-C does), resume the
last report. After every step: the last results matched the oracle (checked
in the rule), the pool still gives the loop's answer, and no process outlives
what the pool should have.

Switching backends is not a rule: starting a LocalCluster costs seconds per
step; each backend runs the whole machine instead (the ``backend`` fixture).
"""
from __future__ import annotations

import _thread
import shutil
import signal
import sys
import tempfile
import threading

import cloudpickle
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

import model as M
from conftest import descendants, wait_for
from poolmagic import NOT_DONE
from poolmagic.errors import MapCancelledError
from test_properties import known_bug

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(M.TEST_TIMEOUT)


class Interrupter:
    """KeyboardInterrupt in the main thread once ``ready()`` is true, unless disarmed first."""

    def __init__(self, ready):
        self._armed = True
        self._lock = threading.Lock()
        self.fired = False
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()

    def _run(self, ready) -> None:
        wait_for(lambda: ready() or not self._armed, 60)
        with self._lock:
            if self._armed:
                self._armed = False
                self.fired = True
                _thread.interrupt_main()

    def disarm(self) -> None:
        with self._lock:
            self._armed = False
        self._thread.join()


class PoolMachine(RuleBasedStateMachine):
    backend = None  # set by the test: a conformance backend (conftest.BackendUnderTest)

    @initialize()
    def setup(self):
        self.pool = self.backend.pool
        self.size = self.pool.size
        self.mk = tempfile.mkdtemp(prefix="poolmagic-oracle-sm-")
        self.last: tuple[M.Case, object] | None = None  # (case, report) of the last map
        self.baseline = len(descendants())

    def teardown(self):
        if hasattr(self, "pool"):
            self.pool.resize(self.size)
        shutil.rmtree(getattr(self, "mk", ""), ignore_errors=True)

    @rule(case=M.cases(slow=False, max_items=6))
    def run_map(self, case):
        if known_bug(case, self.backend) is not None or self._lacks(case):
            return
        outcomes = M.expect(case, self.mk)
        got = M.run_case(self.pool, case, self.mk)
        M.check_run(case, outcomes, got, self.mk)
        self.last = (case, got.report)

    @rule(n=st.integers(1, 3))
    def resize(self, n):
        self.pool.resize(n, warn=False)

    @rule(n=st.integers(2, 6), how=st.sampled_from(["cancel"]))  # "interrupt": a late KeyboardInterrupt escaped; not done
    def interrupt(self, n, how):
        items = list(range(1000, 1000 + n))
        case = M.Case(items, {M.key(x): ("nap",) for x in items}, {"chunksize": 1})
        kw = dict(kwargs={"plans": case.plans, "markers": self.mk}, chunksize=1)
        started = lambda: any(M.attempts(self.mk, x) for x in items)  # noqa: E731
        if how == "cancel":
            handle = self.pool.map_async(M.work, items, **kw)
            wait_for(started, 60)
            handle.cancel()
            with pytest.raises(MapCancelledError):
                handle.get(timeout=60)
            report = handle.report
        else:
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return
            intr = Interrupter(started)
            caught = False
            try:
                report = self.pool.run(M.work, items, **kw)
            except KeyboardInterrupt as exc:
                caught = True
                report = exc.poolmap_report
            finally:
                intr.disarm()
            if intr.fired and not caught:  # it fired as the map returned: take it here
                try:
                    wait_for(lambda: False, 2)
                except KeyboardInterrupt:
                    pass
                intr.fired = False
            if not intr.fired:  # the map ended first
                assert report.results == [M.compute(x) for x in items]
                self.last = (case, report)
                return
        assert report.status == "cancelled", report.status
        for x, v in zip(items, report.results):
            assert v is NOT_DONE or M.same(v, M.compute(x)), (x, v)
        assert report.done == sum(v is not NOT_DONE for v in report.results)
        counts = M.summary_counts(report.summary())
        assert counts["done"] == report.done and counts["items"] == n, report.summary()
        self.last = (case, report)

    @precondition(lambda self: self.last is not None and any(v is NOT_DONE for v in self.last[1].results))
    @rule(run_async=st.booleans())
    def resume_last(self, run_async):
        case, prev = self.last
        kept = {i: v for i, v in enumerate(prev.results) if v is not NOT_DONE}
        again = M.Case(case.items, case.plans, case.options, run_async=run_async)
        outcomes = M.expect(again, self.mk)
        got = M.run_case(self.pool, again, self.mk, resume=prev)
        M.check_run(again, outcomes, got, None, kept=kept)
        assert got.report.resumed == (len(kept), len(case.items) - len(kept))
        self.last = (again, got.report)

    def _lacks(self, case) -> bool:
        lacks = self.backend.lacks
        return bool(case.kinds() & M.KILLERS) and "crash-isolation" in lacks or any(
            case.options.get(o) and cap in lacks for o, cap in (("timeout", "kill-on-timeout"),
                                                                ("max_memory", "memory-limit")))

    @invariant()
    def pool_works(self):
        if hasattr(self, "pool"):
            assert self.pool.map(M.compute, [1, "ab", 2.5]) == [4, "ba·", 1.25]

    @invariant()
    def no_orphans(self):
        if hasattr(self, "pool"):
            # workers (up to 3, each with at most a helper) over what ran before the machine
            assert wait_for(lambda: len(descendants()) <= self.baseline + 2 * 3, 30), \
                [p.cmdline()[:3] for p in descendants()]


def test_pool_machine(backend):
    PoolMachine.backend = backend
    run_state_machine_as_test(PoolMachine, settings=M.settings(M.budget(3), stateful_step_count=6))
