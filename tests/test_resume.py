"""--resume, for real: a run re-maps only what an earlier report lacks, and refuses when the
items behind its kept results changed (resume.py).

Every test runs real worker processes; which items a map ran is counted through
files the mapped function appends to (``log_call``, longrun_helpers.py). Cells run
through the session's real InteractiveShell (``ip``); each such test names its
function uniquely, because ``--resume`` remembers runs by (function, ITERABLE).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from conftest import wait_for
from longrun_helpers import calls, calls_str, ck_wait_for, ident_value, log_call, pool  # noqa: F401  (pool: the module's warm pool, a fixture)
from IPython.core.error import UsageError

from poolmagic import NOT_DONE, BadInputError, MapFailedError, Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])


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


def _cancelled_after_six(pool, iterable, path: str):
    """The report of an async map of slow_logged over ``iterable`` cancelled once 6 items ran,
    once every chunk it sent has answered: cancel() waits at most 1 s for the workers to be
    stopped, and under load a result drained from a worker being killed landed (or a queued
    item started) after the test had counted what was kept."""
    handle = pool.map_async(slow_logged, iterable, chunksize=1, kwargs={"path": path})
    wait_for(lambda: len(calls(path)) >= 6, timeout=20, what="the async map getting going")
    handle.cancel()
    assert handle.wait(20)
    wait_for(lambda: handle._job.inflight <= 0, what="the cancelled map's chunks all answered")
    return handle.report


@pytest.mark.timeout(60)
def test_api_resume_after_a_cancelled_async_map(pool, tmp_path):
    """An async map cancelled half-way: resuming runs exactly what has no result."""
    path = str(tmp_path / "calls")
    earlier = _cancelled_after_six(pool, range(40), path)
    missing = [i for i, v in enumerate(earlier.results) if v is NOT_DONE]
    assert missing, "everything finished before the cancel (nothing to resume)"
    n = len(calls(path))

    report = pool.run(slow_logged, range(40), resume=earlier, chunksize=4, kwargs={"path": path})
    assert sorted(calls(path)[n:]) == missing
    assert report.results == [-x for x in range(40)]
    assert report.resumed == (40 - len(missing), len(missing))


@pytest.mark.timeout(60)
def test_api_resume_after_a_cancelled_map_over_a_generator(pool, tmp_path):
    """A map over a generator cancelled half-way had taken only some of its items: resuming
    with the same generator was refused ('the ITERABLE now has 40 items, the run to resume had
    9'), where a range resumed. The items it never took run too, with those left unfinished."""
    path = str(tmp_path / "calls")
    earlier = _cancelled_after_six(pool, (x for x in range(40)), path)
    kept = [i for i, v in enumerate(earlier.results) if v is not NOT_DONE]
    assert earlier.items < 40 or len(kept) < 40, "everything finished before the cancel"
    n = len(calls(path))

    report = pool.run(slow_logged, (x for x in range(40)), resume=earlier, chunksize=4, kwargs={"path": path})
    assert sorted(calls(path)[n:]) == [x for x in range(40) if x not in kept]
    assert report.results == [-x for x in range(40)]
    assert report.resumed == (len(kept), 40 - len(kept))
    with pytest.raises(BadInputError, match="nothing to resume"):
        pool.run(slow_logged, (x for x in range(40)), resume=report, kwargs={"path": path})


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




def gated_or_failing(x, gate):
    """As ``gated``; items from 6 on raise while the file ``gate``-fail exists."""
    if x >= 6 and os.path.exists(f"{gate}-fail"):
        raise ValueError(x)
    return gated(x, gate)


def test_resume_over_a_generator_keeps_results_that_landed_after_the_map_ended(tmp_path):
    """Regression (test_api_resume_after_a_cancelled_map_over_a_generator, flaky under load):
    a stream's items are keyed as their chunks finish, but a chunk that finished after the map
    ended (drained from a worker being killed, or a thread left running) was kept unkeyed:
    resuming refused "the ITERABLE changed since the run to resume: item 0 differs" (or, with no
    key after it, kept it unchecked). Threads make it deterministic: item 6 fails the map while
    items 0 and 1 wait for the gate."""
    gate = str(tmp_path / "gate")
    open(f"{gate}-fail", "w").close()
    with Pool(4, backend="threads") as pool:
        handle = pool.map_async(gated_or_failing, (x for x in range(20)), chunksize=1, kwargs={"gate": gate})
        assert handle.wait(20)
        earlier = handle.report
        assert earlier.status == "failed", earlier.status
        assert earlier.identity.ready.wait(20)  # the keys are taken: the map has ended
        assert earlier.results[0] is NOT_DONE and earlier.results[1] is NOT_DONE
        open(gate, "w").close()  # now items 0 and 1 finish, after the map ended
        wait_for(lambda: earlier.results[0] == 0 and earlier.results[1] == -1, what="the late results")
        os.remove(f"{gate}-fail")
        report = pool.run(gated_or_failing, (x for x in range(20)), resume=earlier, kwargs={"gate": gate})
        assert report.results == [-x for x in range(20)]
        assert report.resumed[0] >= 3  # items 0 and 1 (late) and one of 2..5 at least were kept

# ---------------------------------------------------------------- the identity of items (issue 22)


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
    # only bad changed: path, the same, is compared as the checkpoint keyed it (the same in every kernel)
    assert report.notes == ["--kw bad changed since the run to resume; 9 results computed with its earlier "
                            "value were kept"], report.notes


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


@pytest.mark.timeout(60)
def test_resume_says_a_changed_kw_value_as_a_checkpoint_does(pool, tmp_path):
    """The kept results were computed with the earlier --kw value: said, as --checkpoint says it."""
    path = str(tmp_path / "calls")
    with pytest.raises(MapFailedError) as info:
        pool.run(numpy_block, range(4), keep_going=True, kwargs={"path": path, "fail": (2,)})
    earlier = info.value.poolmap_report
    report = pool.run(numpy_block, range(4), resume=earlier, kwargs={"path": path, "fail": ()})
    assert report.notes == ["--kw fail changed since the run to resume; 3 results computed with its "
                            "earlier value were kept"], report.notes

    flag = tmp_path / "fail-2"
    flag.touch()
    with pytest.raises(MapFailedError) as info:
        pool.run(fails_while_flagged, range(4), keep_going=True, kwargs={"flag": str(flag)})
    flag.unlink()
    same = pool.run(fails_while_flagged, range(4), resume=info.value.poolmap_report, kwargs={"flag": str(flag)})
    assert same.results == [0, 1, 2, 3]
    assert same.notes == [], same.notes  # nothing the user wrote changed


def fails_while_flagged(x, flag):
    if x == 2 and os.path.exists(flag):
        raise ValueError(x)
    return x


FIX_NOTE = ("the function changed (its code, or a global or helper it reads) since the run to resume; "
            "{n} results of its earlier version were kept")


@pytest.mark.timeout(60)
def test_resume_says_the_function_changed_as_a_checkpoint_does(ip, tmp_path, capsys):
    """The usual --resume: the function failed on some items, is fixed, and the rest run. The kept
    results came from the earlier version: said under the summary, as --checkpoint says it."""
    failing = ("%%poolmap -q --keep-going range(6)\n"
               "def resume_fixed(x):\n"
               "    if x == 4:\n"
               "        raise ValueError(x)\n"
               "    return x * SCALE\n")
    ip.user_ns["SCALE"] = 2
    assert isinstance(ip.run_cell(failing).error_in_exec, MapFailedError)
    fixed = "%%poolmap --resume range(6)\ndef resume_fixed(x):\n    return x * SCALE\n"
    capsys.readouterr()
    assert ip.run_cell(fixed).error_in_exec is None
    report = ip.user_ns["_poolmap"]
    assert report.results == [0, 2, 4, 6, 8, 10]
    assert report.notes == [FIX_NOTE.format(n=5)], report.notes
    assert "its earlier version were kept" in capsys.readouterr().out  # on the card the cell showed


@pytest.mark.timeout(60)
def test_resume_says_a_changed_global_and_not_a_cell_run_again(ip, tmp_path):
    """A global the function reads counts as the function; the same cell run again (a new
    cell, as the kernel names it) is not a change."""
    flag = tmp_path / "fail-3"
    flag.touch()
    ip.user_ns.update(SCALE=3, RESUME_FLAG=str(flag))
    cell = ("%%poolmap -q --keep-going range(5)\n"
            "import os\n"
            "def resume_global(x):\n"
            "    if x == 3 and os.path.exists(RESUME_FLAG):\n"
            "        raise ValueError(x)\n"
            "    return x * SCALE\n")
    assert isinstance(ip.run_cell(cell).error_in_exec, MapFailedError)
    flag.unlink()
    again = cell.replace("%%poolmap -q --keep-going", "%%poolmap -q --resume --keep-going")
    assert ip.run_cell(again).error_in_exec is None
    assert ip.user_ns["_poolmap"].results == [0, 3, 6, 9, 12]
    assert ip.user_ns["_poolmap"].notes == []  # same code, same globals: nothing to say

    flag.touch()
    assert isinstance(ip.run_cell(cell).error_in_exec, MapFailedError)
    flag.unlink()
    ip.user_ns["SCALE"] = 10
    assert ip.run_cell(again).error_in_exec is None
    report = ip.user_ns["_poolmap"]
    assert report.results == [0, 3, 6, 30, 12]  # what the two versions gave: said
    assert report.notes == [FIX_NOTE.format(n=4)], report.notes


def scaled(x, k=1):
    if x == 1 and k == 1:
        raise ValueError(x)
    return x * k


@pytest.mark.timeout(60)
def test_resume_of_a_stream_and_of_a_partial_says_the_function_changed(pool, tmp_path):
    import functools

    with pytest.raises(MapFailedError) as info:
        pool.run(scaled, (x for x in range(3)), keep_going=True)
    report = pool.run(functools.partial(scaled, k=2), iter(range(3)), resume=info.value.poolmap_report)
    assert report.results == [0, 2, 2]
    assert report.notes == [FIX_NOTE.format(n=2)], report.notes

    with pytest.raises(MapFailedError) as info:
        pool.run(functools.partial(scaled, k=1), range(3), keep_going=True)
    with pytest.raises(ValueError) as again:  # the same partial: fails the same, and no note
        pool.run(functools.partial(scaled, k=1), range(3), resume=info.value.poolmap_report)
    assert again.value.poolmap_report.notes == [], again.value.poolmap_report.notes


WEIGHTS = np.zeros(100_000)


def weighted(x):
    if x == 2 and WEIGHTS[0] == 0:
        raise ValueError(x)
    return x + float(WEIGHTS[x])


@pytest.mark.timeout(60)
def test_resume_sees_a_global_array_changed_in_place(pool):
    """The function's key hashes the arrays it reads (taking the payload's digests, not hashing
    them again): an array changed in place since the run to resume is a changed function."""
    with pytest.raises(ValueError) as info:
        pool.run(weighted, range(4))
    WEIGHTS[0] = 1.0
    try:
        report = pool.run(weighted, range(4), resume=info.value.poolmap_report)
    finally:
        WEIGHTS[0] = 0.0
    assert report.results[2:] == [2.0, 3.0]
    assert report.notes == [FIX_NOTE.format(n=report.resumed[0])], report.notes


def ten_times_but_13(x):
    if x == 13:
        raise ValueError("thirteen")
    return x * 10


@pytest.mark.parametrize("how", ["resume", "checkpoint"])
@pytest.mark.timeout(60)
def test_any_item_of_a_list_can_be_rerun_after_a_map_that_ran_only_the_missing_ones(pool, tmp_path, how):
    """%pooldebug N / rerun(N) after --resume or a checkpoint's second run: item N of the list,
    not 'the ITERABLE was a stream' (the map ran only the missing items, the list has them all)."""
    items = [10, 11, 12, 13, 14, 15]
    ck = str(tmp_path / "ck.bin")
    options = {"checkpoint": ck} if how == "checkpoint" else {}
    with pytest.raises(MapFailedError) as info:
        pool.run(ten_times_but_13, items, keep_going=True, chunksize=1, **options)
    if how == "resume":
        options = {"resume": info.value.report}
    with pytest.raises(MapFailedError) as info:
        pool.run(ten_times_but_13, items, keep_going=True, chunksize=1, **options)
    report = info.value.report
    assert report.resumed == (5, 1)
    assert report.rerun(5) == 150 and report.rerun(0) == 100
    with pytest.raises(ValueError, match="thirteen"):
        report.rerun(3)


@pytest.mark.timeout(60)
def test_a_resume_of_a_resume_says_the_results_an_earlier_version_computed(ip):
    """v1 fills items 0-2, --resume with v2 fills 3-4 (item 5 still fails, said), --resume with v2
    again: items 0-2 are still v1's, though the run it resumes was v2's."""
    body = "def resumed_versions(x):\n    if x >= {n}:\n        raise ValueError(x)\n    return ('{v}', x)\n"
    assert isinstance(ip.run_cell("%%poolmap -q --keep-going range(6)\n" + body.format(n=3, v="v1")).error_in_exec,
                      MapFailedError)
    v2 = "%%poolmap -q --resume --keep-going range(6)\n" + body.format(n=5, v="v2")
    assert isinstance(ip.run_cell(v2).error_in_exec, MapFailedError)
    assert isinstance(ip.run_cell(v2).error_in_exec, MapFailedError)
    report = ip.user_ns["_poolmap"]
    assert report.results[:5] == [("v1", 0), ("v1", 1), ("v1", 2), ("v2", 3), ("v2", 4)]
    assert report.notes == ["3 results kept by the run to resume were computed by an earlier version of the "
                            "function (items 0–2)"], report.notes


@pytest.mark.timeout(60)
def test_a_resume_of_a_resume_says_the_results_an_earlier_kw_value_computed(ip):
    """--kw w=1 fills items 0-3, --resume with w=2 item 4 (item 5 still fails), --resume with w=2
    again: items 0-3 are still w=1's."""
    body = ("def resumed_kw(x, w):\n    if x >= 3 + w:\n        raise ValueError(x)\n    return x * w\n")
    ip.user_ns["RS_W"] = 1
    assert isinstance(ip.run_cell("%%poolmap -q --keep-going --kw w=RS_W range(6)\n" + body).error_in_exec,
                      MapFailedError)
    ip.user_ns["RS_W"] = 2
    again = "%%poolmap -q --resume --keep-going --kw w=RS_W range(6)\n" + body
    assert isinstance(ip.run_cell(again).error_in_exec, MapFailedError)
    assert isinstance(ip.run_cell(again).error_in_exec, MapFailedError)
    report = ip.user_ns["_poolmap"]
    assert report.results[:5] == [0, 1, 2, 3, 8]
    assert report.notes == ["4 results kept by the run to resume were computed with earlier --kw values "
                            "(items 0–3)"], report.notes
