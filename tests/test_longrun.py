"""Long maps lose nothing, for real: --retries, --resume, --checkpoint, %pooldebug, rerun().

Every test runs real worker processes. Which items a map ran is counted
through files the mapped function appends to (``log_call``): a line per call,
so "ran exactly items 3 and 7" is read from the file, not inferred from timing.

Functions mapped from this module are pickled *by value*, like notebook code
(workers never import this module). Cells run through the session's real
InteractiveShell (``ip``); each such test names its function uniquely, because
``--resume`` remembers runs by (function, ITERABLE).
"""
from __future__ import annotations

import io
import os
import random
import re
import subprocess
import statistics
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from conftest import shutdown_and_check, wait_for
from IPython.core.error import UsageError

import poolmagic
import poolmagic.api
from poolmagic import checkpointfile
from poolmagic import NOT_DONE, BadInputError, MapFailedError, Pool, WorkerCrashedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- helpers


def log_call(path: str | Path, x) -> None:
    """Runs in the worker: record one call of item ``x`` (one line, one O_APPEND write)."""
    with open(path, "a") as fh:
        fh.write(f"{x}\n")


def calls(path: str | Path) -> list[int]:
    """Every recorded call, in the order the lines were written."""
    p = Path(path)
    return [int(s) for s in p.read_text().split()] if p.exists() else []


def attempts_of(path: str | Path, x) -> int:
    """How many times item ``x`` has been called so far (read from inside the worker)."""
    try:
        with open(path) as fh:
            return sum(1 for line in fh if line.strip() == str(x))
    except FileNotFoundError:
        return 0


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture(scope="module")
def pool():
    """One warm two-worker pool for the API tests of this module; no worker may outlive it."""
    p = Pool(2).start()
    yield p
    shutdown_and_check(p)


# ================================================================ 1. retries


def crash_first_attempt(x, folder):
    """Item 3's first attempt kills its worker; the marker says "already tried"."""
    log_call(os.path.join(folder, "calls"), x)
    marker = os.path.join(folder, f"tried-{x}")
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()  # before dying: the retry must see it
        os._exit(1)
    return x * x


@pytest.mark.timeout(60)
def test_retry_recovers_an_item_whose_first_attempt_kills_its_worker(pool, tmp_path):
    # chunks of one item: the crash is charged to item 3 itself (a bigger chunk
    # is first re-run item by item to find the culprit, which is not a retry)
    r = pool.run(crash_first_attempt, range(8), retries=1, chunksize=1, kwargs={"folder": str(tmp_path)})
    assert r.results == [x * x for x in range(8)]
    assert r.errors == {}
    assert r.retried >= 1
    assert "retried" in r.summary(), r.summary()
    made = calls(tmp_path / "calls")
    assert made.count(3) == 2, made  # the crashed attempt and the retry
    assert sorted(set(made)) == list(range(8))

    # the same crash without --retries fails item 3 (the control: the retry is what saved it)
    (tmp_path / "tried-3").unlink()
    with pytest.raises(WorkerCrashedError) as info:
        pool.run(crash_first_attempt, range(8), chunksize=1, kwargs={"folder": str(tmp_path)})
    assert info.value.poolmap_report.retried == 0
    assert 3 in info.value.poolmap_report.errors


def always_connection_error(x, path):
    log_call(path, x)
    if x == 1:
        raise ConnectionError(f"no route for {x}")
    return x


@pytest.mark.timeout(60)
def test_retries_exhausted_raise_the_error_with_every_attempt(pool, tmp_path):
    path = str(tmp_path / "calls")
    with pytest.raises(ConnectionError) as info:
        pool.run(always_connection_error, range(4), retries=2, kwargs={"path": path})
    exc = info.value
    notes = "\n".join(getattr(exc, "__notes__", []))
    assert "failed after 3 attempts" in notes, notes
    report = exc.poolmap_report
    assert len(report.attempts[1]) == 3, report.attempts
    assert all(isinstance(e, ConnectionError) for e in report.attempts[1]), report.attempts
    assert report.retried == 2
    assert calls(path).count(1) == 3, calls(path)


def zero_division_once(x, path):
    log_call(path, x)
    if x == 2:
        return 1 / 0
    return x


@pytest.mark.timeout(60)
def test_retry_on_leaves_other_exceptions_alone(pool, tmp_path):
    path = str(tmp_path / "calls")
    with pytest.raises(ZeroDivisionError) as info:
        pool.run(zero_division_once, range(4), retries=3, retry_on=(ConnectionError,), kwargs={"path": path})
    report = info.value.poolmap_report
    assert report.retried == 0
    assert report.attempts == {}
    assert calls(path).count(2) == 1, calls(path)
    assert "attempts" not in "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.timeout(60)
def test_magic_retries_with_retry_on(ip, tmp_path):
    ip.user_ns["RETRY_CALLS"] = str(tmp_path / "calls")
    body = (
        "def retry_magic_flaky(x):\n"
        "    log_call(RETRY_CALLS, x)\n"
        "    n = attempts_of(RETRY_CALLS, x)\n"
        "    if x == 1 and n < 2:\n"
        "        raise TimeoutError('slow upstream')\n"
        "    if x == 4 and n < 3:\n"
        "        raise ConnectionError('reset')\n"
        "    return x + 100\n"
    )
    ip.user_ns.update(log_call=log_call, attempts_of=attempts_of)
    out = ip.run_cell_magic("poolmap", "-q --retries 2 --retry-on ConnectionError,TimeoutError -c 1 range(6)", body)
    assert out == [x + 100 for x in range(6)]
    report = ip.user_ns["_poolmap"]
    assert report.retried == 3, report.retried  # item 1 once, item 4 twice
    made = calls(tmp_path / "calls")
    assert made.count(1) == 2 and made.count(4) == 3, made

    with pytest.raises(UsageError, match="NotAClass"):
        ip.run_cell_magic("poolmap", "-q --retries 2 --retry-on NotAClass range(3)", "def retry_bad(x):\n    return x\n")
    with pytest.raises(UsageError, match="exception classes"):
        ip.run_cell_magic("poolmap", "-q --retries 2 --retry-on len range(3)", "def retry_bad(x):\n    return x\n")


# ================================================================ 2. resume


def _run(ip, source: str):
    """Run a cell as the notebook would; return the ExecutionResult."""
    return ip.run_cell(source)


@pytest.mark.timeout(60)
def test_magic_resume_runs_exactly_the_unfinished_items(ip, tmp_path, capsys):
    ip.user_ns.update(RESUME_CALLS=str(tmp_path / "calls"), log_call=log_call)
    failing = (
        "%%poolmap --keep-going range(10)\n"
        "def resume_sq(x):\n"
        "    log_call(RESUME_CALLS, x)\n"
        "    if x in (3, 7):\n"
        "        raise ValueError(f'bad {x}')\n"
        "    return x * x\n"
    )
    first = _run(ip, failing)
    assert isinstance(first.error_in_exec, MapFailedError), first.error_in_exec
    before = calls(tmp_path / "calls")
    assert sorted(before) == list(range(10)), before

    fixed = (
        "%%poolmap --resume --keep-going range(10)\n"
        "def resume_sq(x):\n"
        "    log_call(RESUME_CALLS, x)\n"
        "    return x * x\n"
    )
    capsys.readouterr()
    second = _run(ip, fixed)
    out = capsys.readouterr().out
    assert second.error_in_exec is None, second.error_in_exec
    new = calls(tmp_path / "calls")[len(before):]
    assert sorted(new) == [3, 7], new
    report = ip.user_ns["_poolmap"]
    assert report.results == [x * x for x in range(10)]
    assert second.result == [x * x for x in range(10)]
    assert "resumed: 8 kept, 2 run" in report.summary(), report.summary()
    assert "resumed: 8 kept, 2 run" in out, out  # the summary the cell showed

    # and now there is nothing left to resume
    with pytest.raises(UsageError, match="nothing to resume: all"):
        ip.run_cell_magic("poolmap", "--resume --keep-going range(10)",
                          "def resume_sq(x):\n    log_call(RESUME_CALLS, x)\n    return x * x\n")
    assert len(calls(tmp_path / "calls")) == len(before) + 2


@pytest.mark.timeout(60)
def test_magic_resume_refuses_before_any_work(ip, tmp_path):
    path = tmp_path / "calls"
    ip.user_ns.update(REFUSE_CALLS=str(path), log_call=log_call, REFUSE_N=10)
    body = "def refuse_{tag}(x):\n    log_call(REFUSE_CALLS, x)\n    if x == 5 and {fail}:\n        raise ValueError(x)\n    return x\n"

    # a cell that never ran
    with pytest.raises(UsageError, match="nothing to resume"):
        ip.run_cell_magic("poolmap", "--resume range(10)", body.format(tag="never", fail=True))
    assert calls(path) == []

    # after a clean run
    ip.run_cell_magic("poolmap", "-q range(10)", body.format(tag="clean", fail=False))
    n = len(calls(path))
    with pytest.raises(UsageError, match="nothing to resume: all"):
        ip.run_cell_magic("poolmap", "-q --resume range(10)", body.format(tag="clean", fail=False))
    assert len(calls(path)) == n

    # the ITERABLE's length changed between the runs
    with pytest.raises(MapFailedError):
        ip.run_cell_magic("poolmap", "-q --keep-going range(REFUSE_N)", body.format(tag="grow", fail=True))
    n = len(calls(path))
    ip.user_ns["REFUSE_N"] = 11
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("poolmap", "-q --resume range(REFUSE_N)", body.format(tag="grow", fail=False))
    message = str(info.value)
    assert "11" in message and "10" in message, message
    assert len(calls(path)) == n


@pytest.mark.timeout(60)
def test_magic_resume_after_an_async_run(ip, tmp_path):
    """A cell run with --async is this cell's last run too: --resume finishes it."""
    path = tmp_path / "calls"
    ip.user_ns.update(ASYNC_CALLS=str(path), log_call=log_call)
    first = ip.run_cell(
        "%%poolmap --async -q -o async_h --keep-going range(6)\n"
        "def async_resume(x):\n"
        "    log_call(ASYNC_CALLS, x)\n"
        "    if x == 2:\n"
        "        raise ValueError(x)\n"
        "    return x + 1\n"
    )
    assert first.error_in_exec is None, first.error_in_exec
    handle = ip.user_ns["async_h"]
    assert handle.wait(30), "the async map did not finish"
    assert not handle.successful()
    n = len(calls(path))
    assert n == 6

    second = ip.run_cell(
        "%%poolmap --resume -q range(6)\n"
        "def async_resume(x):\n"
        "    log_call(ASYNC_CALLS, x)\n"
        "    return x + 1\n"
    )
    assert second.error_in_exec is None, repr(second.error_in_exec)
    assert calls(path)[n:] == [2]
    assert second.result == [x + 1 for x in range(6)]


def numpy_block(x, path, fail):
    log_call(path, x)
    if x in fail:
        raise ValueError(f"item {x}")
    return np.arange(x, x + 1000, dtype=np.float64) * 0.5


@pytest.mark.timeout(60)
def test_api_resume_with_numpy_results(pool, tmp_path):
    path = str(tmp_path / "calls")
    with pytest.raises(MapFailedError) as info:
        pool.run(numpy_block, range(8), keep_going=True, kwargs={"path": path, "fail": (2, 5)})
    earlier = info.value.poolmap_report
    assert [i for i, v in enumerate(earlier.results) if v is NOT_DONE] == [2, 5]
    n = len(calls(path))

    report = pool.run(numpy_block, range(8), resume=earlier, kwargs={"path": path, "fail": ()})
    assert sorted(calls(path)[n:]) == [2, 5]
    assert report.resumed == (6, 2)
    assert len(report.results) == 8
    for x, got in enumerate(report.results):
        assert isinstance(got, np.ndarray) and got.dtype == np.float64, (x, got)
        np.testing.assert_array_equal(got, np.arange(x, x + 1000, dtype=np.float64) * 0.5)


def slow_logged(x, path):
    log_call(path, x)
    time.sleep(0.05)
    return -x


@pytest.mark.timeout(60)
def test_api_resume_after_a_cancelled_async_map(pool, tmp_path):
    """An async map cancelled half-way: resuming runs exactly what has no result."""
    path = str(tmp_path / "calls")
    handle = pool.map_async(slow_logged, range(40), chunksize=1, kwargs={"path": path})
    deadline = time.monotonic() + 20
    while len(calls(path)) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls(path)) >= 6, "the async map never got going"
    handle.cancel()
    assert handle.wait(20)
    earlier = handle.report
    missing = [i for i, v in enumerate(earlier.results) if v is NOT_DONE]
    assert missing, "everything finished before the cancel (nothing to resume)"
    n = len(calls(path))

    report = pool.run(slow_logged, range(40), resume=earlier, chunksize=4, kwargs={"path": path})
    assert sorted(calls(path)[n:]) == missing
    assert report.results == [-x for x in range(40)]
    assert report.resumed == (40 - len(missing), len(missing))


def gated(x, gate):
    """Items 0 and 1 say they started, then wait for the gate file; the others return at once."""
    if x < 2:
        open(f"{gate}-started-{x}", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.01)
    return -x


def test_resume_keeps_results_that_landed_after_the_map_ended(tmp_path):
    """Regression (CI, 5 runs in 40 on the local backend): results on their way when a map was
    cancelled land after it ended (kept, as late results), but --resume's keys were taken only
    for what had a result at the end, so resuming was refused: "ITERABLE changed: item 0
    differs". On threads a cancelled map's running items finish later by design: deterministic."""
    gate = str(tmp_path / "gate")
    with Pool(2, backend="threads") as pool:
        handle = pool.map_async(gated, range(10), chunksize=1, kwargs={"gate": gate})
        wait_for(lambda: all(os.path.exists(f"{gate}-started-{x}") for x in (0, 1)), what="items 0 and 1 running")
        handle.cancel()
        assert handle.wait(20)
        earlier = handle.report
        seen = earlier.identity
        assert seen.ready is not None and seen.ready.wait(20)  # the keys are taken: the map has ended
        assert earlier.results[0] is NOT_DONE and earlier.results[1] is NOT_DONE
        open(gate, "w").close()  # now items 0 and 1 finish, after the map ended
        wait_for(lambda: earlier.results[0] == 0 and earlier.results[1] == -1, what="the late results")
        report = pool.run(gated, range(10), resume=earlier, kwargs={"gate": gate})
        assert report.results == [-x for x in range(10)]
        assert report.resumed[0] >= 2  # items 0 and 1 were kept, not run again


# ================================================================ 3. checkpoints


def ck_square(x, path, fail):
    """Logs each call; fails the items in ``fail`` (a tuple), or those with a ``fail-<x>`` file
    next to ``path`` (so that a fixed run can use the very same function and arguments)."""
    log_call(path, x)
    if x in fail or os.path.exists(os.path.join(os.path.dirname(path), f"fail-{x}")):
        raise ValueError(f"item {x} failed")
    return x * x


def ck_square_v2(x, path, fail):
    log_call(path, x)
    return x * x  # a new version of the function: same results


@pytest.mark.timeout(60)
def test_checkpoint_second_run_runs_only_the_missing_items(pool, tmp_path):
    ck = str(tmp_path / "ck.bin")
    path = str(tmp_path / "calls")
    args = {"path": path, "fail": ()}
    for x in (4, 11, 29):
        (tmp_path / f"fail-{x}").touch()
    with pytest.raises(MapFailedError):
        pool.run(ck_square, range(30), keep_going=True, chunksize=4, checkpoint=ck, kwargs=args)
    n = len(calls(path))
    assert sorted(calls(path)) == list(range(30))

    # the same function and arguments, failures fixed, the same PATH: only what is missing runs
    for x in (4, 11, 29):
        (tmp_path / f"fail-{x}").unlink()
    report = pool.run(ck_square, range(30), keep_going=True, chunksize=4, checkpoint=ck, kwargs=args)
    assert sorted(calls(path)[n:]) == [4, 11, 29]
    (tmp_path / "clean").mkdir()
    clean = pool.run(ck_square, range(30), kwargs={"path": str(tmp_path / "clean" / "calls"), "fail": ()})
    assert report.results == clean.results == [x * x for x in range(30)]
    assert report.resumed == (27, 3)
    assert report.notes == [], report.notes  # the function did not change

    # a third run finds everything in the file and runs nothing
    n = len(calls(path))
    again = pool.run(ck_square, range(30), checkpoint=ck, kwargs=args)
    assert calls(path)[n:] == []
    assert again.results == clean.results


@pytest.mark.timeout(60)
def test_checkpoint_changed_function_is_reported(pool, tmp_path):
    ck = str(tmp_path / "ck.bin")
    path = str(tmp_path / "calls")
    with pytest.raises(MapFailedError):
        pool.run(ck_square, range(12), keep_going=True, checkpoint=ck, kwargs={"path": path, "fail": (6,)})
    n = len(calls(path))
    report = pool.run(ck_square_v2, range(12), checkpoint=ck, kwargs={"path": path, "fail": ()})
    assert calls(path)[n:] == [6]
    assert report.results == [x * x for x in range(12)]
    notes = " ".join(report.notes)
    assert "function changed" in notes, report.notes
    assert "function changed" in report.summary()


def megabyte(x, path, fail):
    log_call(path, x)
    if x in fail:
        raise ValueError(x)
    return np.random.default_rng(x).random(131_072)  # 1 MB of float64


@pytest.mark.timeout(60)
def test_checkpoint_numpy_results_round_trip_exactly(pool, tmp_path):
    ck = str(tmp_path / "ck.bin")
    path = str(tmp_path / "calls")
    with pytest.raises(MapFailedError):
        pool.run(megabyte, range(6), keep_going=True, chunksize=1, checkpoint=ck,
                 kwargs={"path": path, "fail": (2,)})
    n = len(calls(path))
    report = pool.run(megabyte, range(6), checkpoint=ck, kwargs={"path": path, "fail": ()})
    assert calls(path)[n:] == [2]  # the other five came from the file
    for x, got in enumerate(report.results):
        want = np.random.default_rng(x).random(131_072)
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        assert got.nbytes == 1 << 20
        assert np.array_equal(got, want), f"item {x} differs after the round trip"


@pytest.mark.timeout(60)
def test_checkpoint_refuses_a_changed_iterable(pool, tmp_path):
    ck = str(tmp_path / "ck.bin")
    path = str(tmp_path / "calls")
    items = list(range(100, 112))
    pool.run(ck_square, items, chunksize=1, checkpoint=ck, kwargs={"path": path, "fail": ()})
    n = len(calls(path))

    changed = list(items)
    changed[7] = -1  # same length, one value differs
    with pytest.raises(BadInputError) as info:
        pool.run(ck_square, changed, checkpoint=ck, kwargs={"path": path, "fail": ()})
    assert "item 7 differs" in str(info.value), str(info.value)

    with pytest.raises(BadInputError) as info:
        pool.run(ck_square, items + [112], checkpoint=ck, kwargs={"path": path, "fail": ()})
    message = str(info.value)
    assert "12" in message and "13" in message, message
    assert len(calls(path)) == n, "a refused checkpoint still ran items"

    # the file is intact: the original ITERABLE still loads everything
    report = pool.run(ck_square, items, checkpoint=ck, kwargs={"path": path, "fail": ()})
    assert report.results == [x * x for x in items]
    assert len(calls(path)) == n


@pytest.mark.timeout(60)
def test_checkpoint_chunk_of_several_items_names_the_item_that_changed(pool, tmp_path):
    ck = str(tmp_path / "ck.bin")
    path = str(tmp_path / "calls")
    pool.run(ck_square, list(range(20)), chunksize=5, checkpoint=ck, kwargs={"path": path, "fail": ()})
    changed = list(range(20))
    changed[12] = "twelve"
    with pytest.raises(BadInputError) as info:
        pool.run(ck_square, changed, checkpoint=ck, kwargs={"path": path, "fail": ()})
    message = str(info.value)
    assert "item 12 differs (it is now 'twelve')" in message, message  # not the whole chunk 10–14
    assert message.startswith("the ITERABLE changed") and "cannot be read" not in message, message  # not wrapped twice


def _stored_indices(db: Path) -> list[int]:
    """Every item index the whole chunk records of a checkpoint file hold."""
    return sorted(i for idx, *_ in checkpointfile.read(str(db)).chunks for i in idx)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_torn_checkpoint_loads_whole_chunks_and_runs_the_rest(pool, tmp_path, damage):
    ck = tmp_path / "ck.bin"
    path = str(tmp_path / "calls")
    pool.run(ck_square, range(40), chunksize=5, checkpoint=str(ck), kwargs={"path": path, "fail": ()})
    whole = ck.stat().st_size
    assert _stored_indices(ck) == list(range(40))
    last = list(checkpointfile.read(str(ck)).chunks[-1][0])  # chunks finish in any order
    if damage == "truncated":
        os.truncate(ck, whole - 7)  # the last record (a chunk of 5) is cut short, as by a kill mid-write
    else:
        with open(ck, "ab") as fh:  # a record header promising more than follows, then noise
            fh.write(b"C" + (10**6).to_bytes(8, "little") + os.urandom(3000))

    stored = _stored_indices(ck)
    torn = checkpointfile.read(str(ck)).torn
    if damage == "truncated":
        assert stored == sorted(set(range(40)) - set(last)) and len(last) == 5 and torn > 0, (stored, torn)
    else:
        assert stored == list(range(40)) and torn == 1 + 8 + 3000, (stored, torn)

    n = len(calls(path))
    report = pool.run(ck_square, range(40), checkpoint=str(ck), kwargs={"path": path, "fail": ()})
    ran = sorted(calls(path)[n:])
    assert ran == sorted(set(range(40)) - set(stored)), (ran, stored)
    assert report.results == [x * x for x in range(40)]
    # the torn tail was cut off before appending: the file reads whole again
    after = checkpointfile.read(str(ck))
    assert after.torn == 0 and _stored_indices(ck) == list(range(40)), (after.torn, _stored_indices(ck))


@pytest.mark.timeout(60)
def test_a_checkpoint_another_writer_holds_is_refused_before_any_work(pool, tmp_path):
    ck = tmp_path / "busy.bin"
    path = str(tmp_path / "calls")
    holder = checkpointfile.Writer(str(ck), 0)  # as another kernel writing the same file would
    try:
        with pytest.raises(BadInputError, match="another process is writing it"):
            pool.run(ck_square, range(5), checkpoint=str(ck), kwargs={"path": path, "fail": ()})
        assert calls(path) == []
    finally:
        holder.close()
    report = pool.run(ck_square, range(5), checkpoint=str(ck), kwargs={"path": path, "fail": ()})
    assert report.results == [x * x for x in range(5)]


@pytest.mark.timeout(60)
def test_a_checkpoint_in_a_missing_directory_is_refused_before_any_work(pool, tmp_path):
    path = str(tmp_path / "calls")
    where = tmp_path / "no" / "such" / "dir" / "ck.bin"
    with pytest.raises(BadInputError, match="there is no directory"):
        pool.run(ck_square, range(5), checkpoint=str(where), kwargs={"path": path, "fail": ()})
    assert calls(path) == [] and not where.parent.exists()


def ck_wait_for(x, path, gate):
    """Logs the call, then waits until the file ``gate`` exists (the test lets it go)."""
    log_call(path, x)
    while not os.path.exists(gate):
        time.sleep(0.01)
    return x


@pytest.mark.timeout(60)
def test_a_checkpoint_a_running_map_of_this_kernel_writes_is_refused(pool, tmp_path):
    ck, path, gate = str(tmp_path / "busy.bin"), str(tmp_path / "calls"), str(tmp_path / "go")
    handle = pool.map_async(ck_wait_for, range(2), checkpoint=ck, kwargs={"path": path, "gate": gate})
    try:
        with pytest.raises(BadInputError, match="a running map of this kernel is writing it"):
            pool.run(ck_square, range(2), checkpoint=ck, kwargs={"path": path + "2", "fail": ()})
        assert calls(path + "2") == []
    finally:
        Path(gate).touch()
    assert handle.get(timeout=30) == [0, 1]
    assert _stored_indices(Path(ck)) == [0, 1]


@pytest.mark.timeout(20)  # a map prepared on the file but never run must not hold it (it waited 30 s)
def test_a_checkpoint_map_prepared_but_never_run_does_not_hold_its_file(pool, tmp_path):
    ck, path = str(tmp_path / "prepared.bin"), str(tmp_path / "calls")
    with pytest.raises(MapFailedError):
        pool.run(ck_square, range(6), checkpoint=ck, kwargs={"path": path, "fail": (2,)}, keep_going=True)
    pool.prepare(ck_square, range(6), checkpoint=ck, kwargs={"path": path, "fail": ()})  # never submitted
    # a run that waited for the prepared map's file (30 s) fails the 20 s timeout above
    report = pool.run(ck_square, range(6), checkpoint=ck, kwargs={"path": path, "fail": ()})
    assert report.results == [x * x for x in range(6)] and report.resumed == (5, 1)


@pytest.mark.timeout(60)
def test_the_same_checkpoint_map_twice_in_a_row_waits_for_the_first_to_close(pool, tmp_path):
    ck = str(tmp_path / "again.bin")
    path = str(tmp_path / "calls")
    for _ in range(5):  # the second map opens the file while the first may still be syncing it
        report = pool.run(ck_square, range(30), checkpoint=ck, kwargs={"path": path, "fail": ()})
        assert report.results == [x * x for x in range(30)]
    assert sorted(calls(path)) == list(range(30)), "a later run re-ran items the file holds"


@pytest.mark.timeout(60)
def test_a_file_that_is_not_a_checkpoint_is_refused_plainly(pool, ip, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("these are my notes, not a database\n" * 200)
    path = str(tmp_path / "calls")
    with pytest.raises(BadInputError, match="cannot") as info:
        pool.run(ck_square, range(5), checkpoint=str(bad), kwargs={"path": path, "fail": ()})
    exc = info.value
    assert "not a poolmagic checkpoint file" in str(exc), str(exc)
    assert exc.__cause__ is None and exc.__suppress_context__, "the reader's own error is chained"
    assert calls(path) == []
    assert bad.read_text() == "these are my notes, not a database\n" * 200, "the file was changed"

    # through the magic: a UsageError, one line, no traceback
    ip.user_ns.update(log_call=log_call, NOTSQL_CALLS=path)
    capsys.readouterr()
    result = ip.run_cell(f"%%poolmap --checkpoint {bad} range(5)\ndef notsql(x):\n    log_call(NOTSQL_CALLS, x)\n    return x\n")
    captured = capsys.readouterr()
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    shown = plain(captured.out + captured.err)
    assert "cannot" in shown and "Traceback" not in shown and "CheckpointFileError" not in shown, shown
    assert calls(path) == []


@pytest.mark.timeout(60)
def test_magic_checkpoint_second_run_runs_only_what_is_missing(ip, tmp_path):
    ck = tmp_path / "magic.bin"
    path = tmp_path / "calls"
    ip.user_ns.update(log_call=log_call, MAGIC_CK_CALLS=str(path), MAGIC_CK_FAIL={2, 9})
    cell = (
        f"%%poolmap -q --keep-going --checkpoint {ck} range(12)\n"
        "def magic_ck(x):\n"
        "    log_call(MAGIC_CK_CALLS, x)\n"
        "    if x in MAGIC_CK_FAIL:\n"
        "        raise ValueError(x)\n"
        "    return x * 3\n"
    )
    first = ip.run_cell(cell)
    assert isinstance(first.error_in_exec, MapFailedError), first.error_in_exec
    n = len(calls(path))
    ip.user_ns["MAGIC_CK_FAIL"] = set()
    second = ip.run_cell(cell)
    assert second.error_in_exec is None, second.error_in_exec
    assert sorted(calls(path)[n:]) == [2, 9]
    assert second.result == [x * 3 for x in range(12)]
    assert ip.user_ns["_poolmap"].resumed == (10, 2)


def tiny(x):
    return x * x


@pytest.mark.timeout(120)
def test_checkpoint_overhead_on_100k_tiny_items(pool, tmp_path, capsys):
    """Measured and printed, not asserted: what --checkpoint costs on 100k tiny items."""
    items = range(100_000)
    want = [x * x for x in items]
    pool.map(tiny, range(1000))  # warm: workers up, the function's item time known

    def timed(**options) -> float:
        t0 = time.perf_counter()
        got = pool.map(tiny, items, **options)
        dt = time.perf_counter() - t0
        assert got == want
        return dt

    plain_s, ck_s = [], []
    for k in range(5):  # interleaved, so that drift hits both alike
        plain_s.append(timed())
        ck_s.append(timed(checkpoint=str(tmp_path / f"ck{k}.bin")))
    chunks = len(checkpointfile.read(str(tmp_path / "ck0.bin")).chunks)
    size = (tmp_path / "ck0.bin").stat().st_size
    a, b = statistics.median(plain_s), statistics.median(ck_s)
    with capsys.disabled():
        print(
            f"\n[checkpoint overhead] 100k x*x items, median of 5: no checkpoint {a * 1e3:.1f} ms, "
            f"checkpoint {b * 1e3:.1f} ms, +{(b - a) * 1e3:.1f} ms ({b / a:.2f}x); "
            f"{chunks} chunks, file {size / 1e6:.2f} MB\n"
            f"  plain runs: {[round(t * 1e3, 1) for t in plain_s]} ms\n"
            f"  checkpoint runs: {[round(t * 1e3, 1) for t in ck_s]} ms"
        )
    assert chunks >= 1


# ================================================================ 5. %pooldebug and rerun()


DEBUG_BODY = (
    "def {name}(x):\n"
    "    y = x * 10\n"
    "    if x in (2, 4):\n"
    "        raise ValueError(f'bad item {{x}}')\n"
    "    return y\n"
)


def _debug(ip, monkeypatch, capsys, arg: str, commands: str = "p y\np x\nq\n") -> list[str]:
    """%pooldebug ARG with debugger commands on stdin; the output lines, without color."""
    monkeypatch.setattr("sys.stdin", io.StringIO(commands))
    capsys.readouterr()
    ip.run_line_magic("pooldebug", arg)
    return plain(capsys.readouterr().out).splitlines()


def _printed(lines: list[str], value: str) -> bool:
    """The debugger printed ``value`` on a line of its own (after its prompt, if echoed)."""
    return any(re.fullmatch(rf"(ipdb>\s*)*{re.escape(value)}", line.strip()) for line in lines)


@pytest.mark.timeout(60)
def test_pooldebug_opens_the_debugger_in_the_failed_item(ip, monkeypatch, capsys):
    result = ip.run_cell("%%poolmap --keep-going range(6)\n" + DEBUG_BODY.format(name="dbg_work"))
    assert isinstance(result.error_in_exec, MapFailedError)

    lines = _debug(ip, monkeypatch, capsys, "")
    assert _printed(lines, "20") and _printed(lines, "2"), lines  # y and x of item 2, the first failed
    text = "\n".join(lines)
    assert "raise ValueError" in text, text
    # the debugger stops in the user's function, at its raise line (line 4 of the cell)
    assert re.search(r"^> .*\(4\)dbg_work\(\)", text, re.MULTILINE), text
    assert "ValueError" in text and "bad item 2" in text, text

    lines = _debug(ip, monkeypatch, capsys, "4")
    assert _printed(lines, "40") and _printed(lines, "4"), lines
    assert not _printed(lines, "20"), lines

    lines = _debug(ip, monkeypatch, capsys, "1", commands="q\n")
    assert any("ran without an error" in line for line in lines), lines

    with pytest.raises(UsageError, match=r"6 items"):
        ip.run_line_magic("pooldebug", "99")
    with pytest.raises(UsageError, match="index"):
        ip.run_line_magic("pooldebug", "two")


@pytest.mark.timeout(60)
def test_pooldebug_before_any_map(ip):
    saved = ip.user_ns.pop("_poolmap", None)
    try:
        poolmagic.api.set_pool(Pool(2))
        with pytest.raises(UsageError, match="no map has run yet"):
            ip.run_line_magic("pooldebug", "")
    finally:
        poolmagic.api.shutdown_pool()  # the next map starts a fresh shared pool
        if saved is not None:
            ip.user_ns["_poolmap"] = saved


@pytest.mark.timeout(60)
def test_pooldebug_on_a_generator_keeps_the_failed_items(ip, monkeypatch, capsys):
    result = ip.run_cell("%%poolmap --keep-going (i for i in range(6))\n" + DEBUG_BODY.format(name="dbg_stream"))
    assert isinstance(result.error_in_exec, MapFailedError)
    report = ip.user_ns["_poolmap"]
    assert report.failed_items == {2: 2, 4: 4}

    lines = _debug(ip, monkeypatch, capsys, "")
    assert _printed(lines, "20") and _printed(lines, "2"), lines
    lines = _debug(ip, monkeypatch, capsys, "4")
    assert _printed(lines, "40") and _printed(lines, "4"), lines
    with pytest.raises(UsageError, match="no longer available"):
        ip.run_line_magic("pooldebug", "1")


def seeded(x, path):
    v = random.random()
    with open(path, "a") as fh:
        fh.write(f"{x} {v!r}\n")
    if x == 3:
        raise ValueError(f"item {x} drew {v}")
    return v


@pytest.mark.timeout(60)
def test_rerun_raises_here_and_sees_the_workers_random_numbers(pool, tmp_path):
    path = tmp_path / "draws"
    with pytest.raises(MapFailedError) as info:
        pool.run(seeded, range(6), seed=1234, keep_going=True, kwargs={"path": str(path)})
    report = info.value.poolmap_report

    def draws(x) -> list[str]:
        return [line.split()[1] for line in path.read_text().splitlines() if line.split()[0] == str(x)]

    in_worker = draws(3)
    assert len(in_worker) == 1
    with pytest.raises(ValueError, match="item 3 drew"):
        report.rerun()  # the first failed item, here in this process
    assert draws(3) == in_worker * 2, draws(3)  # the same number as in the worker
    assert report.rerun(1) == report.results[1]  # a good item: the same value too
    assert draws(1)[0] == draws(1)[1]
    assert len(set(report.results[:3])) == 3  # and the items do get different streams


# ================================================================ 6. tracebacks


@pytest.mark.timeout(60)
def test_keep_going_traceback_starts_at_the_users_code(ip, capsys):
    capsys.readouterr()
    result = ip.run_cell(
        "%%poolmap --keep-going range(5)\n"
        "def tb_work(x):\n"
        "    if x == 3:\n"
        "        raise ValueError('three is bad')\n"
        "    return x\n"
    )
    captured = capsys.readouterr()
    shown = plain(captured.out + captured.err)
    assert isinstance(result.error_in_exec, MapFailedError), result.error_in_exec
    assert "raise ValueError('three is bad')" in shown, shown
    # the cell's own frame (the whole cell as a string) is hidden; IPython 8
    # (Python 3.10) still shows its own InteractiveShell.run_cell_magic frame
    assert "get_ipython().run_cell_magic(" not in shown, shown
    assert "run_cell_magic('poolmap'" not in shown, shown
    stb = plain("\n".join(ip.InteractiveTB.structured_traceback(
        type(result.error_in_exec), result.error_in_exec, result.error_in_exec.__traceback__)))
    assert "raise ValueError('three is bad')" in stb, stb
    assert "__tracebackhide__" not in ip.user_ns

    later = ip.run_cell("1/0")
    captured = capsys.readouterr()
    shown = plain(captured.out + captured.err)
    assert isinstance(later.error_in_exec, ZeroDivisionError)
    assert re.search(r"----> 1 1/0", shown), shown  # the cell's own frame is still shown
    assert "Cell In[" in shown, shown


# ================================================================ 6. the identity of items (issue 22)


@pytest.mark.timeout(60)
def test_magic_resume_refuses_when_the_items_behind_the_expression_changed(ip, tmp_path):
    """The issue's row: items 3 and 7 fail, ``data`` is rebound to other values, ``--resume data``
    must not merge the old results with the new items' (it gave [0, 10, 20, 1030, ...])."""
    path = tmp_path / "calls"
    ip.user_ns.update(IDR_CALLS=str(path), log_call=log_call, data=list(range(10)))
    body = ("def idr_times10(x):\n"
            "    log_call(IDR_CALLS, x)\n"
            "    if x in (3, 7):\n"
            "        raise ValueError(x)\n"
            "    return x * 10\n")
    with pytest.raises(MapFailedError):
        ip.run_cell_magic("poolmap", "-q --keep-going data", body)
    n = len(calls(path))
    ip.user_ns["data"] = list(range(100, 110))
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("poolmap", "-q --resume data", body.replace("(3, 7)", "()"))
    message = str(info.value)
    assert message.startswith("cannot resume: the ITERABLE changed since the run to resume"), message
    assert "8 items differ, the first 0, 1, 2, 4, 5 (now 100, 101, 102, 104, 105" in message, message
    assert "without --resume" in message, message
    assert len(calls(path)) == n, "a refused resume ran items"
    # without --resume: the loop's answer over the new items
    got = ip.run_cell_magic("poolmap", "-q data", body.replace("(3, 7)", "()"))
    assert got == [x * 10 for x in range(100, 110)]


@pytest.mark.timeout(60)
def test_resume_allows_a_changed_failed_item_and_refuses_a_kept_one_changed_in_place(pool, tmp_path):
    path = str(tmp_path / "calls")
    data = [{"v": i} for i in range(8)]
    with pytest.raises(MapFailedError) as info:
        pool.run(ident_value, data, keep_going=True, chunksize=2, kwargs={"path": path, "bad": (3,)})
    earlier = info.value.poolmap_report
    data[3] = {"v": 33}  # the failed item fixed: its result is computed now, the loop's answer
    data[5]["v"] = -5  # a kept item changed in place, after its result came back
    n = len(calls(path))
    with pytest.raises(BadInputError, match=r"item 5 differs \(it is now \{'v': -5\}\)"):
        pool.run(ident_value, data, resume=earlier, kwargs={"path": path, "bad": ()})
    assert len(calls(path)) == n
    data[5]["v"] = 5
    report = pool.run(ident_value, data, resume=earlier, kwargs={"path": path, "bad": ()})
    assert calls(path)[n:] == [33]
    assert report.results == [d["v"] for d in data] and report.resumed == (7, 1)


def ident_value(d, path, bad):
    log_call(path, d["v"] if isinstance(d, dict) else d)
    v = d["v"] if isinstance(d, dict) else d
    if v in bad:
        raise ValueError(v)
    return v


@pytest.mark.timeout(60)
def test_resume_over_a_generator_compares_the_items_it_yielded(pool, tmp_path):
    """A stream is gone once read: its items' keys are taken as its chunks come back."""
    path = str(tmp_path / "calls")
    words = [f"w{i}" for i in range(30)]
    with pytest.raises(MapFailedError) as info:
        pool.run(ident_value, (w for w in words), keep_going=True, chunksize=4,  # 8 chunks
                 kwargs={"path": path, "bad": ("w4", "w17")})
    earlier = info.value.poolmap_report
    n = len(calls_str(path))
    with pytest.raises(BadInputError, match=r"item 20 differs \(it is now 'W20'\)"):
        pool.run(ident_value, (w.upper() if w == "w20" else w for w in words), resume=earlier,
                 kwargs={"path": path, "bad": ()})
    report = pool.run(ident_value, (w for w in words), resume=earlier, kwargs={"path": path, "bad": ()})
    assert sorted(calls_str(path)[n:]) == ["w17", "w4"]
    assert report.results == words


def calls_str(path: str | Path) -> list[str]:
    p = Path(path)
    return p.read_text().split() if p.exists() else []


@pytest.mark.timeout(60)
def test_checkpoint_of_a_range_resumes_over_the_same_list(pool, tmp_path):
    ck = str(tmp_path / "ck.bin")
    path = str(tmp_path / "calls")
    with pytest.raises(MapFailedError):
        pool.run(ck_square, range(20), keep_going=True, chunksize=3, checkpoint=ck, kwargs={"path": path, "fail": (5, 14)})
    n = len(calls(path))
    report = pool.run(ck_square, list(range(20)), checkpoint=ck, kwargs={"path": path, "fail": ()})
    assert sorted(calls(path)[n:]) == [5, 14]
    assert report.results == [x * x for x in range(20)] and report.resumed == (18, 2)
    # and a list written, a range read back
    ck2 = str(tmp_path / "ck2.bin")
    with pytest.raises(MapFailedError):
        pool.run(ck_square, list(range(20)), keep_going=True, checkpoint=ck2, kwargs={"path": path, "fail": (9,)})
    n = len(calls(path))
    report = pool.run(ck_square, range(20), checkpoint=ck2, kwargs={"path": path, "fail": ()})
    assert calls(path)[n:] == [9] and report.results == [x * x for x in range(20)]


class HoldsAFunction:
    def __init__(self, fn):
        self.fn = fn


def call_held(h, path):
    log_call(path, 0)
    return h.fn(2)


@pytest.mark.timeout(60)
def test_an_item_that_cannot_be_identified_is_refused_before_any_work(pool, tmp_path):
    path = str(tmp_path / "calls")
    with pytest.raises(BadInputError) as info:
        pool.run(call_held, [HoldsAFunction(lambda x: x + 1)], checkpoint=str(tmp_path / "ck.bin"), kwargs={"path": path})
    message = str(info.value)
    assert message.startswith("cannot identify item 0 for a checkpoint (type "), message
    assert "HoldsAFunction): its .fn is '" in message and "a function without a name" in message, message
    assert calls(path) == []


SUBPROCESS_RUN = r'''
import dataclasses, os, sys
import pandas as pd
import poolmagic

@dataclasses.dataclass
class Job:                      # a class defined in __main__, as in a notebook
    name: str
    tags: frozenset

def work(item):
    with open(os.environ["CALLS"], "a") as fh:
        fh.write(f"{item[0]}\n")
    if str(item[0]) in os.environ["FAIL"].split(","):
        raise ValueError(item[0])
    return (item[0], len(item[1].tags), item[2].b)

df = pd.DataFrame({"a": range(12), "b": [f"row{i}" for i in range(12)]})
items = [(i, Job(f"job{i}", frozenset({"x", "y", f"t{i}", "z"})), row) for i, row in enumerate(df.itertuples())]
with poolmagic.Pool(2) as pool:
    try:
        r = pool.run(work, items, chunksize=2, keep_going=True, checkpoint=os.environ["CKPT"])
    except poolmagic.MapFailedError as exc:
        r = exc.poolmap_report
print(repr((r.results, r.resumed, r.notes)))
'''


@pytest.mark.timeout(120)
def test_checkpoint_resumes_in_a_new_interpreter_with_notebook_classes_rows_and_sets_of_str(tmp_path):
    """Before: "the ITERABLE changed" in the new process (cloudpickle's per-process class ids,
    the hash seed's order of a frozenset of str, itertuples' generated class)."""
    script = tmp_path / "run.py"
    script.write_text(SUBPROCESS_RUN)
    env = {**os.environ, "CALLS": str(tmp_path / "calls"), "CKPT": str(tmp_path / "ck.bin")}

    def run(seed: int, fail: str):
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100,
                             env={**env, "PYTHONHASHSEED": str(seed), "FAIL": fail})
        assert out.returncode == 0, out.stderr[-3000:]
        return eval(out.stdout.strip().splitlines()[-1], {"NOT_DONE": NOT_DONE})

    run(1, "3,8")
    first = calls(tmp_path / "calls")
    assert sorted(first) == list(range(12))
    results, resumed, notes = run(2, "")
    assert sorted(calls(tmp_path / "calls")[len(first):]) == [3, 8]
    assert results == [(i, 4, f"row{i}") for i in range(12)]
    assert resumed == (10, 2) and notes == [], (resumed, notes)


def ck_label(x, path, fail):
    log_call(path, x)
    return f"result-{x:04d}"  # a marker the damage tests find in the file


@pytest.mark.timeout(60)
def test_a_damaged_record_costs_only_its_own_items_and_is_said(pool, tmp_path, monkeypatch):
    """What longrun does with the reader's count of damaged records (the reader of branch
    ckpt-security skips them and keeps the later ones): their items run again, the summary says so."""
    from poolmagic import longrun

    ck, path = str(tmp_path / "ck.bin"), str(tmp_path / "calls")
    pool.run(ck_label, range(40), chunksize=4, checkpoint=ck, kwargs={"path": path, "fail": ()})
    real = longrun.read
    lost: list = []

    def reader_that_skipped_a_damaged_record(p):
        stored = real(p)
        lost.extend(stored.chunks.pop(5)[0])
        stored.damaged = 1
        return stored

    monkeypatch.setattr(longrun, "read", reader_that_skipped_a_damaged_record)
    n = len(calls(path))
    report = pool.run(ck_label, range(40), checkpoint=ck, kwargs={"path": path, "fail": ()})
    assert sorted(calls(path)[n:]) == sorted(lost) and len(lost) == 4
    assert report.results == [f"result-{x:04d}" for x in range(40)]
    assert report.resumed == (36, 4)
    assert "1 checkpoint record was damaged; its items ran again" in report.notes, report.notes
    assert "1 checkpoint record was damaged" in report.summary(), report.summary()


@pytest.mark.timeout(60)
def test_a_flipped_byte_in_record_6_of_11_keeps_records_7_to_11(pool, tmp_path):
    """The issue's row, end to end: needs the reader that resyncs past a damaged record."""
    ck, path = tmp_path / "ck.bin", str(tmp_path / "calls")
    pool.run(ck_label, range(44), chunksize=4, checkpoint=str(ck), kwargs={"path": path, "fail": ()})
    chunks = checkpointfile.read(str(ck)).chunks
    assert len(chunks) == 11
    victim = sorted(chunks[5][0])  # the 6th chunk record in the file
    data = bytearray(ck.read_bytes())
    at = data.index(f"result-{victim[0]:04d}".encode())
    data[at + 3] ^= 0x20
    ck.write_bytes(bytes(data))
    held = checkpointfile.read(str(ck))
    if held.damaged == 0:
        pytest.skip("this branch's checkpointfile.read stops at a damaged record (branch ckpt-security resyncs)")
    assert held.damaged == 1 and len(held.chunks) == 10
    n = len(calls(path))
    report = pool.run(ck_label, range(44), checkpoint=str(ck), kwargs={"path": path, "fail": ()})
    assert sorted(calls(path)[n:]) == victim
    assert report.results == [f"result-{x:04d}" for x in range(44)]
    assert "1 checkpoint record was damaged; its items ran again" in report.notes, report.notes


@pytest.mark.timeout(60)
def test_a_malformed_record_is_one_plain_error_naming_the_file_and_record(pool, ip, tmp_path, capsys):
    from poolmagic import longrun

    path = str(tmp_path / "calls")
    ck = str(tmp_path / "bad-body.bin")
    w = checkpointfile.Writer(ck, 0)
    w.meta({"items": 6})
    w.chunk(range(0, 3), longrun.items_hash(range(0, 3)), b"\x80\x05 not a pickle", [])
    w.close()
    with pytest.raises(BadInputError) as info:
        pool.run(ck_square, range(6), checkpoint=ck, kwargs={"path": path, "fail": ()})
    message = str(info.value)
    assert message.startswith(f"the checkpoint {ck!r} cannot be read: chunk record 1 of 1 is malformed ("), message
    assert "Delete it to start over" in message and message.count("cannot") == 1, message
    assert info.value.__cause__ is None and calls(path) == []

    # a record whose frame is whole but whose envelope is not what a chunk holds
    ck2 = str(tmp_path / "bad-envelope.bin")
    w = checkpointfile.Writer(ck2, 0)
    w._append(b"C", __import__("pickle").dumps(("only one field",)), [])
    w.close()
    try:
        report = pool.run(ck_square, range(6), checkpoint=ck2, kwargs={"path": path, "fail": ()})
    except BadInputError as exc:  # a signed record whose envelope is wrong: refused, by name
        message = str(exc)
        assert message.startswith(f"cannot use {ck2!r} as a checkpoint: record 1 (at byte "), message
        assert "malformed" in message and exc.__cause__ is None, message
    else:  # a reader that skips a damaged record: its items ran, and the summary says so
        assert report.results == [x * x for x in range(6)]
        assert any("damaged" in note for note in report.notes), report.notes


@pytest.mark.timeout(60)
def test_magic_changed_iterable_message_is_said_once(ip, tmp_path):
    ck = tmp_path / "said-once.bin"
    path = tmp_path / "calls"
    ip.user_ns.update(log_call=log_call, ONCE_CALLS=str(path), once_items=[f"a{i}" for i in range(6)])
    cell = (f"%%poolmap -q --checkpoint {ck} once_items\n"
            "def once(x):\n    log_call(ONCE_CALLS, 0)\n    return x + '!'\n")
    assert ip.run_cell(cell).error_in_exec is None
    n = len(calls(path))
    ip.user_ns["once_items"] = [f"a{i}" for i in range(5)] + ["b5"]
    result = ip.run_cell(cell)
    exc = result.error_in_exec
    assert isinstance(exc, UsageError), exc
    message = str(exc)
    assert message.startswith("the ITERABLE changed since the checkpoint "), message
    assert "item 5 differs (it is now 'b5')" in message and "cannot be read" not in message, message
    assert message.count("the ITERABLE changed") == 1 and message.count("delete") == 1, message
    assert len(calls(path)) == n


@pytest.mark.timeout(60)
def test_resume_of_a_resumed_run_still_knows_every_kept_item(pool, tmp_path):
    path = str(tmp_path / "calls")
    data = [f"s{i}" for i in range(12)]
    with pytest.raises(MapFailedError) as info:
        pool.run(ident_value, data, keep_going=True, chunksize=3, kwargs={"path": path, "bad": ("s2", "s9")})
    first = info.value.poolmap_report
    with pytest.raises(MapFailedError) as info:  # the second run fixes s2, s9 still fails
        pool.run(ident_value, data, resume=first, keep_going=True, kwargs={"path": path, "bad": ("s9",)})
    second = info.value.poolmap_report
    assert second.resumed == (10, 2)
    changed = list(data)
    changed[2] = "S2"  # kept by the second run (from its own run, not the first)
    with pytest.raises(BadInputError, match=r"item 2 differs \(it is now 'S2'\)"):
        pool.run(ident_value, changed, resume=second, kwargs={"path": path, "bad": ()})
    changed = list(data)
    changed[0] = "S0"  # kept since the first run
    with pytest.raises(BadInputError, match=r"item 0 differs \(it is now 'S0'\)"):
        pool.run(ident_value, changed, resume=second, kwargs={"path": path, "bad": ()})
    n = len(calls_str(path))
    report = pool.run(ident_value, data, resume=second, kwargs={"path": path, "bad": ()})
    assert calls_str(path)[n:] == ["s9"] and report.results == data


@pytest.mark.timeout(60)
def test_resume_after_a_checkpointed_run_knows_the_items_the_file_held(pool, tmp_path):
    ck, path = str(tmp_path / "ck.bin"), str(tmp_path / "calls")
    data = [f"c{i}" for i in range(10)]
    with pytest.raises(MapFailedError):
        pool.run(ident_value, data, keep_going=True, chunksize=2, checkpoint=ck, kwargs={"path": path, "bad": ("c3", "c7")})
    with pytest.raises(MapFailedError) as info:  # c3 now from this run, the rest from the file; c7 fails again
        pool.run(ident_value, data, keep_going=True, checkpoint=ck, kwargs={"path": path, "bad": ("c7",)})
    earlier = info.value.poolmap_report
    assert earlier.resumed == (8, 2) and earlier.results[7] is NOT_DONE and earlier.results[3] == "c3"
    changed = list(data)
    changed[0] = "C0"  # a result the file held
    with pytest.raises(BadInputError, match=r"item 0 differs \(it is now 'C0'\)"):
        pool.run(ident_value, changed, resume=earlier, kwargs={"path": path, "bad": ()})
    n = len(calls_str(path))
    report = pool.run(ident_value, data, resume=earlier, kwargs={"path": path, "bad": ()})
    assert calls_str(path)[n:] == ["c7"] and report.results == data


@pytest.mark.timeout(60)
def test_resume_of_a_map_still_running_is_refused(pool, tmp_path):
    path, gate = str(tmp_path / "calls"), str(tmp_path / "go")
    handle = pool.map_async(ck_wait_for, range(4), kwargs={"path": path, "gate": gate})
    try:
        with pytest.raises(BadInputError, match="the run to resume is still running"):
            pool.run(ck_wait_for, range(4), resume=handle.report, kwargs={"path": path + "2", "gate": gate})
        assert calls(path + "2") == []
    finally:
        Path(gate).touch()
    assert handle.get(timeout=30) == [0, 1, 2, 3]
