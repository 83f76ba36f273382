"""poolmagic.Executor, judged by CPython's own concurrent.futures tests where they apply.

The tests are imported from the running interpreter: a package
(``test.test_concurrent_futures``, 3.12+) or one module (3.10, 3.11). Some
distributions leave it out of their Python (pyenv's 3.11 and 3.12 here): the
stdlib part then skips with that reason; poolmagic's own tests below still run.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
import unittest

import pytest

import poolmagic
from conftest import wait_for


def _stdlib_modules():
    """(ExecutorTest, WaitTests, AsCompletedTests, ExecutorShutdownTest, BaseTestCase) or a reason."""
    try:
        import test.support  # noqa: F401
    except ImportError as exc:
        return None, f"this interpreter ships no 'test' package ({exc})"
    try:  # 3.12+: a package, one module per topic
        from test.test_concurrent_futures import executor, test_as_completed, test_shutdown, test_wait, util
        return (executor.ExecutorTest, test_wait.WaitTests, test_as_completed.AsCompletedTests,
                test_shutdown.ExecutorShutdownTest, util.BaseTestCase), None
    except ImportError:
        pass
    try:  # 3.10, 3.11: one module
        import test.test_concurrent_futures as m
        return (m.ExecutorTest, m.WaitTests, m.AsCompletedTests, m.ExecutorShutdownTest, m.BaseTestCase), None
    except ImportError as exc:
        return None, f"this interpreter's test package has no test_concurrent_futures ({exc})"


CLASSES, WHY_NOT = _stdlib_modules()

# test name -> why it does not apply to poolmagic.Executor
SKIPPED = {
    "test_interpreter_shutdown": "runs a script that imports the executor class from concurrent.futures by its name",
    "test_submit_after_interpreter_shutdown": "runs a script that imports the executor class from concurrent.futures "
                                              "by its name",
    "test_hang_gh83386": "runs a script that imports the executor class from concurrent.futures by its name",
    "test_no_stale_references": "waits for the submitted callable to be freed by reference counting alone; a "
                                "poolmagic map and its observers form reference cycles, so it is freed at the "
                                "next garbage collection (test_submitted_callable_is_freed checks that)",
}


class PoolmagicExecutorMixin:
    """What the standard library's ExecutorMixin does, with poolmagic.Executor."""

    worker_count = 5
    executor_type = poolmagic.Executor

    def setUp(self):
        super().setUp()
        self.executor = self.executor_type(max_workers=self.worker_count)

    def tearDown(self):
        self.executor.shutdown(wait=True)
        self.executor = None
        super().tearDown()


def _skipping(cls: type) -> type:
    for name, why in SKIPPED.items():
        if hasattr(cls, name):
            setattr(cls, name, unittest.skip(why)(getattr(cls, name)))
    return cls


if CLASSES is not None:
    ExecutorTest, WaitTests, AsCompletedTests, ExecutorShutdownTest, BaseTestCase = CLASSES

    @_skipping
    class TestPoolmagicExecutor(PoolmagicExecutorMixin, ExecutorTest, BaseTestCase):
        pass

    @_skipping
    class TestPoolmagicWait(PoolmagicExecutorMixin, WaitTests, BaseTestCase):
        pass

    @_skipping
    class TestPoolmagicAsCompleted(PoolmagicExecutorMixin, AsCompletedTests, BaseTestCase):
        pass

    @_skipping
    class TestPoolmagicShutdown(PoolmagicExecutorMixin, ExecutorShutdownTest, BaseTestCase):
        pass

else:

    def test_stdlib_concurrent_futures_suite():
        pytest.skip(WHY_NOT)


# ---------------------------------------------------------------- poolmagic's own


def double(x):
    return 2 * x


def crash_at(x, bad):
    import os

    if x == bad:
        os._exit(3)
    return x


def test_submit_map_as_completed_and_wait():
    with poolmagic.Executor(2) as ex:
        fs = [ex.submit(double, i) for i in range(6)]
        assert sorted(f.result() for f in cf.as_completed(fs, timeout=60)) == [0, 2, 4, 6, 8, 10]
        done, not_done = cf.wait(fs, timeout=60)
        assert len(done) == 6 and not not_done
        assert list(ex.map(double, range(10))) == [double(i) for i in range(10)]
        assert list(ex.map(pow, [2, 3], [3, 2], chunksize=1)) == [8, 9]


def test_a_crashed_worker_fails_its_future_and_the_executor_goes_on():
    """ProcessPoolExecutor breaks for good (BrokenProcessPool); poolmagic names the call."""
    with poolmagic.Executor(2) as ex:
        bad = ex.submit(crash_at, 1, 1)
        good = ex.submit(crash_at, 2, 1)
        with pytest.raises(poolmagic.WorkerCrashedError):
            bad.result(timeout=60)
        assert good.result(timeout=60) == 2
        assert ex.submit(double, 4).result(timeout=60) == 8


def test_map_timeout_counts_from_the_call():
    with poolmagic.Executor(2) as ex:
        t0 = time.monotonic()
        with pytest.raises(cf.TimeoutError):
            list(ex.map(time.sleep, [0, 30], timeout=0.5))
        assert time.monotonic() - t0 < 20  # not the 30 s item: it was stopped


def test_shutdown_cancel_futures():
    ex = poolmagic.Executor(1)
    fs = [ex.submit(time.sleep, 0.2) for _ in range(12)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in fs)
    assert all(f.done() for f in fs)
    with pytest.raises(RuntimeError):
        ex.submit(double, 1)


def test_executor_on_dask():
    pytest.importorskip("distributed")
    with poolmagic.Executor(2, backend="dask") as ex:
        assert ex.submit(double, 21).result(timeout=120) == 42
        assert list(ex.map(double, range(5))) == [0, 2, 4, 6, 8]


def test_submitted_callable_is_freed():
    """What test_no_stale_references checks, with a garbage collection (see SKIPPED)."""
    import gc
    import weakref

    class Holder:
        def method(self):
            return 1

    with poolmagic.Executor(1) as ex:
        obj = Holder()
        ref = weakref.ref(obj)
        assert ex.submit(obj.method).result(timeout=60) == 1
        del obj
        assert wait_for(lambda: gc.collect() is not None and ref() is None, 5.0)


def fail(x):
    raise ValueError(f"bad {x}")


@pytest.mark.timeout(60)
def test_an_items_error_has_its_worker_traceback_as_cause():
    """As ProcessPoolExecutor's: the worker's traceback text chained as ``__cause__``."""
    with poolmagic.Executor(2) as ex:
        err = ex.submit(fail, 1).exception(timeout=30)
        assert isinstance(err, ValueError)
        assert type(err.__cause__).__name__ == "_RemoteTraceback" and "in fail" in str(err.__cause__)
        with pytest.raises(ValueError) as info:
            list(ex.map(fail, [1]))
        assert "in fail" in str(info.value.__cause__)


@pytest.mark.timeout(60)
def test_a_calls_own_error_is_on_its_future_not_raised_by_submit():
    """ProcessPoolExecutor's submit returns a future that holds the TypeError of a call
    that cannot be made; poolmagic's submit raised it, so a loop of submits stopped."""
    with poolmagic.Executor(1) as ex:
        futures = [ex.submit(double), ex.submit(5), ex.submit(double, 2)]
        assert isinstance(futures[0].exception(timeout=30), TypeError)
        assert isinstance(futures[1].exception(timeout=30), TypeError)
        assert futures[2].result(timeout=30) == 4
        done, _ = cf.wait(futures, timeout=30)
        assert len(done) == 3


@pytest.mark.timeout(60)
def test_sizes_are_checked_as_process_pool_executor_checks_them():
    """ProcessPoolExecutor(True) has one worker; a size that is no int (1.5) and a
    max_tasks_per_child that is none are TypeErrors. poolmagic refused True and raised
    ValueErrors only, which `except TypeError` written for the standard library missed."""
    with poolmagic.Executor(True) as ex:
        assert ex.pool.size == 1
        assert ex.submit(double, 2).result(timeout=30) == 4
    with pytest.raises(TypeError, match="max_workers must be an integer"):
        poolmagic.Executor(1.5)
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        poolmagic.Executor(1, max_tasks_per_child=1.5)
    for bad in ({"max_workers": 0}, {"max_tasks_per_child": 0}):
        with pytest.raises(ValueError):
            poolmagic.Executor(**bad)


@pytest.mark.timeout(60)
def test_a_call_that_does_not_fit_says_so_in_the_words_of_the_call():
    """submit(double) said "--star calls the function with each item's values as its arguments,
    but item 0 () holds 0 values": words of a map the caller never wrote. Now the call's own."""
    with poolmagic.Executor(1) as ex:
        err = ex.submit(double).exception(timeout=30)
        assert isinstance(err, TypeError)
        assert "cannot be called as double()" in str(err) and "'x'" in str(err), err
        assert "--star" not in str(err) and "item 0" not in str(err), err

