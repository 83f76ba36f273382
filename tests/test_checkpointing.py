"""--checkpoint, for real: a map records finished chunks in a file and a later run, in this
kernel or a new one, runs only what the file lacks (checkpointing.py).

Every test runs real worker processes; which items a map ran is counted through
files the mapped function appends to (``log_call``, longrun_helpers.py).
"""
from __future__ import annotations

import os
import subprocess
import statistics
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from longrun_helpers import calls, ck_wait_for, log_call, plain, pool  # noqa: F401  (pool: the module's warm pool, a fixture)
from IPython.core.error import UsageError

from poolmagic import checkpointfile
from poolmagic import NOT_DONE, BadInputError, MapFailedError, Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])


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



# ---------------------------------------------------------------- the identity of items (issue 22)


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
    """What checkpointing does with the reader's count of damaged records (the reader of branch
    ckpt-security skips them and keeps the later ones): their items run again, the summary says so."""
    from poolmagic import checkpointing

    ck, path = str(tmp_path / "ck.bin"), str(tmp_path / "calls")
    pool.run(ck_label, range(40), chunksize=4, checkpoint=ck, kwargs={"path": path, "fail": ()})
    real = checkpointing.read
    lost: list = []

    def reader_that_skipped_a_damaged_record(p):
        stored = real(p)
        lost.extend(stored.chunks.pop(5)[0])
        stored.damaged = 1
        return stored

    monkeypatch.setattr(checkpointing, "read", reader_that_skipped_a_damaged_record)
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
    from poolmagic.itemkeys import items_hash

    path = str(tmp_path / "calls")
    ck = str(tmp_path / "bad-body.bin")
    w = checkpointfile.Writer(ck, 0)
    w.meta({"items": 6})
    w.chunk(range(0, 3), items_hash(range(0, 3)), b"\x80\x05 not a pickle", [])
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
def test_checkpoint_says_a_changed_kw_value_not_a_changed_function(ip, tmp_path):
    """Only a --kw value changed: the note said 'the function changed since PATH was written'; and the
    same cell run again (a new cell number, the same code and values) said it too, where nothing changed."""
    ck = tmp_path / "kw.bin"
    # item 3 fails while a file exists: nothing the function reads from the notebook changes
    flag = tmp_path / "fail3"
    flag.touch()
    ip.user_ns.update(kw_ck_w=[1, 2])
    cell = (
        f"%%poolmap -q --keep-going --checkpoint {ck} --kw w=kw_ck_w range(6)\n"
        "import os\n"
        "def kw_ck(x, w):\n"
        f"    if x == 3 and os.path.exists({str(flag)!r}):\n"
        "        raise ValueError(x)\n"
        "    return x * sum(w)\n"
    )
    assert isinstance(ip.run_cell(cell).error_in_exec, MapFailedError)
    flag.unlink()
    ip.run_cell("pass")  # the next run of the cell is compiled under another cell number
    again = ip.run_cell(cell)
    assert again.error_in_exec is None, again.error_in_exec
    assert ip.user_ns["_poolmap"].notes == [], ip.user_ns["_poolmap"].notes

    ck.unlink()
    flag.touch()
    assert isinstance(ip.run_cell(cell).error_in_exec, MapFailedError)
    flag.unlink()
    ip.user_ns["kw_ck_w"].append(7)  # changed in place
    changed = ip.run_cell(cell)
    assert changed.result == [0, 3, 6, 30, 12, 15]  # the kept ones computed with [1, 2]
    assert ip.user_ns["_poolmap"].notes == [
        f"--kw w changed since {ck} was written; 5 results computed with its earlier value were kept"
    ], ip.user_ns["_poolmap"].notes


def test_checkpoint_says_the_function_changed_when_a_helper_or_a_global_it_reads_did(ip, tmp_path):
    """The function's key leaves out the cell's file name and lines, not what the function reads:
    a changed helper, or a changed global value, is still said (results of both versions are kept)."""
    flag = tmp_path / "fail2"
    helper = "def ck_helper(x):\n    return x + 1\n"
    cell = (
        "import os\n"
        "def ck_f(x):\n"
        f"    if x == 2 and os.path.exists({str(flag)!r}):\n"
        "        raise ValueError(x)\n"
        "    return ck_helper(x) * CK_SCALE\n"
    )
    for change, what in (("helper", "def ck_helper(x):\n    return x + 2\n"), ("global", "CK_SCALE = 100\n")):
        ck = tmp_path / f"{change}.bin"
        line = f"%%poolmap -q --keep-going --checkpoint {ck} range(4)\n"
        ip.run_cell(helper)
        ip.user_ns["CK_SCALE"] = 10
        flag.touch()
        assert isinstance(ip.run_cell(line + cell).error_in_exec, MapFailedError)
        flag.unlink()
        same = ip.run_cell(line + cell)  # nothing changed: no note (and nothing left to run)
        assert same.error_in_exec is None and ip.user_ns["_poolmap"].notes == [], ip.user_ns["_poolmap"].notes
        ck.unlink()
        flag.touch()
        assert isinstance(ip.run_cell(line + cell).error_in_exec, MapFailedError)
        flag.unlink()
        ip.run_cell(what)
        again = ip.run_cell(line + cell)
        assert again.error_in_exec is None, again.error_in_exec
        notes = ip.user_ns["_poolmap"].notes
        assert notes == [f"the function changed (its code, or a global or helper it reads) since {ck} was "
                         "written; 3 results of its earlier version were kept (items 0, 1 and 3)"], (change, notes)



_NOTEBOOK_CLASS_SCRIPT = '''
import sys
from dataclasses import dataclass
from poolmagic import Pool

@dataclass
class Point:  # defined in __main__, as in a notebook: pickled by value
    x: int

def mk(i):
    return Point(i)

if __name__ == "__main__":
    p = Pool(1).start()
    notes = []
    for _ in range(int(sys.argv[2])):
        r = p.run(mk, range(4), checkpoint=sys.argv[1])
        notes.append(r.notes)
    print(repr((notes, [type(v) is Point for v in r.results])))
'''


@pytest.mark.timeout(60)
def test_results_of_a_notebook_class_loaded_in_a_new_kernel_are_said(tmp_path):
    """cloudpickle rebuilds a class the notebook defined as a new class in a kernel that did not
    pickle it: kept results then differ (==, isinstance) from the plain loop's, and that is said."""
    script = tmp_path / "nb.py"
    script.write_text(_NOTEBOOK_CLASS_SCRIPT)
    ck = str(tmp_path / "ck.bin")

    def kernel(runs: int):
        out = subprocess.run([sys.executable, str(script), ck, str(runs)], capture_output=True, text=True,
                             timeout=50, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        return eval(out.stdout.strip().splitlines()[-1])

    notes, same_class = kernel(2)  # the same kernel loading its own file: its class, nothing to say
    assert notes == [[], []] and all(same_class)
    notes, same_class = kernel(1)
    assert not any(same_class)
    assert len(notes[0]) == 1 and "items 0–3" in notes[0][0] and "Point" in notes[0][0], notes


@pytest.mark.timeout(60)
def test_results_of_an_earlier_version_are_said_after_the_new_version_wrote_the_file_too(ip, tmp_path):
    """v1 fills items 0-2, v2 items 3-4 (item 5 still fails), then v2 again: the results of 0-2
    are still v1's, though the file's last meta is v2's. Each chunk is judged by the version it was
    written under."""
    ck = tmp_path / "ck.bin"
    line = f"%%poolmap -q --keep-going --checkpoint {ck} range(6)\ndef ck_versions(x):\n"
    v1 = line + "    if x >= 3:\n        raise ValueError(x)\n    return ('v1', x)\n"
    v2 = line + "    if x >= 5:\n        raise ValueError(x)\n    return ('v2', x)\n"
    assert isinstance(ip.run_cell(v1).error_in_exec, MapFailedError)
    assert isinstance(ip.run_cell(v2).error_in_exec, MapFailedError)
    assert isinstance(ip.run_cell(v2).error_in_exec, MapFailedError)
    report = ip.user_ns["_poolmap"]
    assert report.results[:5] == [("v1", 0), ("v1", 1), ("v1", 2), ("v2", 3), ("v2", 4)]
    assert report.notes == [f"the function changed (its code, or a global or helper it reads) since {ck} was "
                            "written; 3 results of its earlier version were kept (items 0–2)"], report.notes


@pytest.mark.timeout(60)
def test_a_checkpoint_path_under_the_home_directory_written_with_a_tilde(ip, tmp_path, monkeypatch):
    """``--checkpoint ~/ck.bin`` is the file in the home directory, as a shell reads it: it was
    refused with "there is no directory '<cwd>/~'"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = ip.run_cell("%%poolmap -q --checkpoint ~/ck.bin range(3)\ndef ck_home(x):\n    return x\n")
    assert result.error_in_exec is None, result.error_in_exec
    assert ip.user_ns["_poolmap"].results == [0, 1, 2]
    assert checkpointfile.read(str(tmp_path / "ck.bin")).chunks


@pytest.mark.timeout(60)
def test_results_of_an_earlier_kw_value_are_counted_after_the_new_value_wrote_the_file_too(ip, tmp_path):
    """--kw w=1 fills items 0-3, w=2 item 4 (item 5 still fails), then w=2 again: 4 kept results,
    not 5, were computed with the earlier value."""
    cell = (f"%%poolmap -q --keep-going --checkpoint {tmp_path / 'ck.bin'} --kw w=CK_W range(6)\n"
            "def ck_kw_versions(x, w):\n    if x >= 3 + w:\n        raise ValueError(x)\n    return x * w\n")
    ip.user_ns["CK_W"] = 1
    assert isinstance(ip.run_cell(cell).error_in_exec, MapFailedError)
    ip.user_ns["CK_W"] = 2
    assert isinstance(ip.run_cell(cell).error_in_exec, MapFailedError)
    assert isinstance(ip.run_cell(cell).error_in_exec, MapFailedError)
    report = ip.user_ns["_poolmap"]
    assert report.results[:5] == [0, 1, 2, 3, 8]
    assert report.notes == [f"--kw w changed since {tmp_path / 'ck.bin'} was written; 4 results computed with "
                            "its earlier value were kept"], report.notes
