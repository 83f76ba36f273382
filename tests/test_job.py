"""engine/core/job.py: one map's bookkeeping, driven by hand as a backend would drive it.

No backend and no process: the test takes chunks with ``next_items``, runs the
items in this process and answers each chunk with exactly one of
``chunk_done``, ``items_failed``, ``requeue``, ``retry_singly``,
``split_failed`` or ``drop_chunk`` -- the contract in job.py's docstring.
What an answer writes in the record is tested in test_results.py, what runs
again in test_rerun.py (helpers: job_helpers.py).
"""
from __future__ import annotations

import threading
import time
import types

import pytest

from job_helpers import add, answer, has_failure_note, make_job, notes, run_all, square, take
from poolmagic.engine import job as job_module
from poolmagic.engine.events import ChunkFinished, ChunkStarted, ItemsFailed, MapFinished
from poolmagic.engine.items import ItemSource
from poolmagic.engine.job import ItemTimes, Job, write_outputs
from poolmagic.engine.mapoptions import MapOptions
from poolmagic.errors import (
    ItemPicklingError,
    MapCancelledError,
    MapFailedError,
    WorkerCrashedError,
)
from poolmagic.report import RunReport
from poolmagic.sentinel import NOT_DONE


# ---------------------------------------------------------------- a map that succeeds


def test_results_in_order_and_the_report_done():
    job = make_job(range(10))
    r = job.report
    assert r.items == 10 and r.results == [NOT_DONE] * 10 and r.status == "running"
    chunks = [take(job, 3) for _ in range(4)]
    assert [c[0] for c in chunks] == [0, 3, 6, 9]
    assert chunks[-1][1] == range(9, 10)
    assert job.next_items(3) is None
    assert job.inflight == 4 and job.active
    for c in reversed(chunks):  # answered out of order
        answer(job, c)
    assert job.finished.is_set() and not job.active
    assert job.error is None
    assert r.status == "done" and r.t_end is not None
    assert r.results == [x * x for x in range(10)]
    assert r.done == 10 and r.failed == 0
    assert sorted(c.start for c in r.chunks) == [0, 3, 6, 9]
    assert job.inflight == 0
    assert job.wait(timeout=0) is True


def test_an_empty_map_finishes_on_the_first_look():
    job = make_job([])
    assert job.next_items(5) is None
    assert job.finished.is_set() and job.report.status == "done" and job.report.results == []


def test_the_job_finishes_exactly_when_the_last_taken_chunk_is_answered():
    job = make_job(range(6))
    a, b, c = take(job, 2), take(job, 2), take(job, 2)
    assert job.source.exhausted
    answer(job, a)
    answer(job, c)
    assert job.active, "finished with a chunk still out"
    answer(job, b)
    assert not job.active and job.report.status == "done"


def test_a_stream_map_counts_its_items_at_the_end():
    job = make_job(x for x in range(5))
    r = job.report
    assert r.items is None and r.results == []
    job.source.set_want(10)
    job.source.feed()
    answer(job, take(job, 3))
    answer(job, take(job, 3))
    assert job.next_items(3) is None
    assert r.status == "done" and r.items == 5 and r.results == [0, 1, 4, 9, 16]


class LenDisagrees:
    """len() says 5, iteration gives 3 -- as a pandas DataFrame does (len: rows, iter: column labels)."""

    def __len__(self):
        return 5

    def __iter__(self):
        return iter(range(3))


def test_a_done_map_of_a_stream_whose_len_disagrees_has_every_result():
    job = make_job(LenDisagrees())
    job.source.set_want(10)
    job.source.feed()
    answer(job, take(job, 10))
    assert job.next_items(10) is None
    r = job.report
    assert r.status != "done" or NOT_DONE not in r.results, f"'done' with results {r.results}"
    assert r.items == job.source.pos == 3


def test_wait_feeds_a_stream_while_a_backend_thread_runs_chunks():
    job = make_job(iter(range(200)))
    printed, starts = [], []

    def backend():  # the manager thread: never reads the generator
        deadline = time.monotonic() + 5
        while job.active and time.monotonic() < deadline:
            got = job.next_items(7)
            if got is None:
                time.sleep(0.0005)
                continue
            job.source.set_want(16)
            starts.append(got[0])
            answer(job, got, outputs=[(got[0], "stdout", f"{got[0]}\n")])

    t = threading.Thread(target=backend)
    t.start()
    try:
        assert job.wait(timeout=5, on_output=printed.extend)
    finally:
        t.join(5)
    assert job.report.results == [x * x for x in range(200)]
    assert [p[0] for p in printed] == sorted(starts) == starts, "output not in item order"


# ---------------------------------------------------------------- failures


def test_keep_going_summarises_the_failures():
    def f(x):
        if x in (2, 7):
            raise ValueError(f"bad {x}")
        return x

    job = make_job(range(10), f, keep_going=True)
    run_all(job, 4)
    r = job.report
    assert r.status == "failed"
    err = job.error
    assert isinstance(err, MapFailedError)
    assert set(err.errors) == {2, 7} and set(r.errors) == {2, 7}
    assert isinstance(err.errors[2], ValueError)
    text = str(err)
    assert "2 of 10 items failed" in text
    assert "item 2: ValueError: bad 2" in text and "item 7: ValueError: bad 7" in text
    assert "The 8 results that finished are kept" in text
    assert r.done == 8
    assert r.results[2] is NOT_DONE and r.results[7] is NOT_DONE
    assert r.results[8] == 8
    assert err.report is r and err.poolmap_report is r
    assert err.__traceback__ is not None, "the summary points at the mapped function"
    assert has_failure_note(err.errors[7], 7, "7"), notes(err.errors[7])


def test_keep_going_lists_at_most_five_failures():
    job = make_job(range(9), lambda x: 1 / 0, keep_going=True)
    run_all(job, 4)
    text = str(job.error)
    assert "9 of 9 items failed" in text
    assert "item 4: ZeroDivisionError" in text and "item 5:" not in text
    assert "... and 4 more (all in .errors)" in text


def test_fail_fast_raises_the_items_own_exception_with_a_note():
    boom = ValueError("boom")

    def f(x):
        if x == 4:
            raise boom
        return x

    job = make_job(range(10), f)
    a, b, c = take(job, 3), take(job, 3), take(job, 3)
    answer(job, a)
    answer(job, b)  # items 3, 4: 4 raises
    assert not job.active and job.report.status == "failed"
    assert job.error is boom
    assert has_failure_note(boom, 4, "4"), notes(boom)
    assert boom.poolmap_report is job.report
    assert job.report.results[:4] == [0, 1, 2, 3]
    assert job.report.errors == {4: boom}
    # a chunk still out answers after the failure: its finished results are kept, no longer in flight
    done = job.report.done
    answer(job, c)
    assert job.inflight == 0
    assert job.report.results[6:9] == [6, 7, 8]
    assert job.report.results[5] is NOT_DONE and job.report.results[9] is NOT_DONE
    assert job.report.done == done + 3
    assert job.report.status == "failed" and job.error is boom


def test_items_failed_fail_fast():
    job = make_job(range(10))
    a = take(job, 3)
    crash = WorkerCrashedError("the worker died", [0, 1, 2], -9)
    job.items_failed([1], crash, a[1], a[0])
    assert job.error is crash and job.report.status == "failed"
    assert has_failure_note(crash, 1, "1"), notes(crash)
    assert crash.report is job.report
    assert job.inflight == 0


def test_items_failed_keep_going_records_each_index():
    job = make_job(range(4), keep_going=True)
    a, b = take(job, 2), take(job, 2)
    crash = WorkerCrashedError("the worker died", [0, 1], -9)
    job.items_failed([0, 1], crash, a[1], a[0])
    assert job.active
    assert job.report.errors == {0: crash, 1: crash}
    answer(job, b)
    assert isinstance(job.error, MapFailedError)
    assert job.report.results == [NOT_DONE, NOT_DONE, 4, 9]
    assert job.report.done == 2


def test_with_star_the_tuples_are_unpacked():
    job = make_job([(1, 2), (3, 4)], add, star=True)
    run_all(job)
    assert job.report.results == [3, 7]


def test_fail_from_the_caller_ends_the_job():
    job = make_job(range(10))
    take(job, 3)
    cancel = MapCancelledError("cancelled")
    job.fail(cancel, status="cancelled")
    assert not job.active and job.report.status == "cancelled"
    assert job.error is cancel and cancel.report is job.report
    assert job.source.exhausted
    assert not job.has_work()
    job.drop_chunk()  # the backend drops what it had out
    assert job.inflight == 0
    job.fail(RuntimeError("later"))
    assert job.error is cancel, "a second failure replaced the first"


# ---------------------------------------------------------------- requeue, retry, drop, split


def test_inflight_stays_consistent_through_requeue_retry_and_answers():
    job = make_job(range(6))
    a, b, c = take(job, 2), take(job, 2), take(job, 2)
    assert job.inflight == 3 and job.source.exhausted
    job.requeue(*a)
    assert job.inflight == 2
    job.retry_singly(*b)
    assert job.inflight == 1
    answer(job, c)
    assert job.inflight == 0 and job.active, "finished with chunks waiting to be retried"
    taken = []
    while True:
        got = job.next_items(2)
        if got is None:
            break
        taken.append(got)
    assert taken == [(2, range(2, 3)), (3, range(3, 4)), a]  # the last handed back goes first
    assert job.inflight == 3
    for chunk in taken[:-1]:
        answer(job, chunk)
        assert job.active
    answer(job, taken[-1])
    assert not job.active and job.inflight == 0
    assert job.report.results == [x * x for x in range(6)]


def test_split_failed_fail_fast_raises_the_first_bad_item():
    job = make_job(range(5))
    a = take(job, 5)
    bad = {3: ItemPicklingError("item 3"), 2: ItemPicklingError("item 2")}
    job.split_failed(*a, bad)
    assert job.error is bad[2]
    assert job.inflight == 0 and not job.active


def test_split_failed_of_the_last_items_finishes_the_job():
    job = make_job(range(2), keep_going=True)
    a = take(job, 2)
    job.split_failed(*a, {0: ItemPicklingError("0"), 1: ItemPicklingError("1")})
    assert not job.active and isinstance(job.error, MapFailedError)


# ---------------------------------------------------------------- events


def test_observers_receive_the_events():
    seen = []
    job = make_job(range(4), keep_going=True)
    job.observers.append(seen.append)
    a = take(job, 2)
    job.started(1, 4242, *a[:1], len(a[1]))
    rec = answer(job, a, worker=1, pid=4242)
    b = take(job, 2)
    job.started(0, 4343, b[0], len(b[1]))
    crash = WorkerCrashedError("died", [2, 3], -9)
    job.items_failed([2, 3], crash, b[1], b[0])
    kinds = [type(e) for e in seen]
    assert kinds == [ChunkStarted, ChunkFinished, ChunkStarted, ItemsFailed, MapFinished]
    started = seen[0]
    assert (started.worker, started.pid, started.start, started.count) == (1, 4242, 0, 2)
    assert seen[1].record is rec and seen[1].failed == 0
    assert seen[3].indices == [2, 3] and seen[3].error is crash
    assert seen[4].status == "failed" and seen[4].error is job.error


def test_a_chunk_finished_event_counts_its_failed_items():
    seen = []
    job = make_job(range(3), lambda x: 1 / x, keep_going=True)
    job.observers.append(seen.append)
    run_all(job, 3)
    finished = [e for e in seen if isinstance(e, ChunkFinished)]
    assert [e.failed for e in finished] == [1]
    assert finished[0].record.status == "failed"


def test_an_observer_that_raises_breaks_nothing():
    seen = []

    def broken(event):
        raise RuntimeError("a display bug")

    job = make_job(range(5))
    job.observers[:] = [broken, seen.append]
    chunk = take(job, 5)
    job.started(0, 1, chunk[0], len(chunk[1]))
    answer(job, chunk)
    assert job.report.status == "done" and job.report.results == [0, 1, 4, 9, 16]
    assert [type(e) for e in seen] == [ChunkStarted, ChunkFinished, MapFinished]


def test_no_observer_no_event_work():
    job = make_job(range(2))
    run_all(job)
    assert job.report.status == "done"


# ---------------------------------------------------------------- chunk sizes


def test_chunk_size_probes_with_one_item_without_an_estimate():
    job = make_job(range(10_000))
    assert job.per_item_s() is None
    assert job.chunk_size(4) == 1


def test_chunk_size_adapts_to_the_measured_item_time():
    job = make_job(range(10_000))
    answer(job, take(job, 100), seconds=0.01)  # 100 µs per item
    assert job.per_item_s() == pytest.approx(1e-4)
    t = job.per_item_s()
    lo, hi = int(job_module.MIN_CHUNK_S / t), int(job_module.TARGET_CHUNK_S / t)
    assert (lo, hi) in {(20, 250), (19, 249), (20, 249), (19, 250)}  # float rounding
    assert job.chunk_size(4) == hi  # plenty left: chunks of about TARGET_CHUNK_S
    # towards the end, smaller so that the workers finish together, never under MIN_CHUNK_S
    job.source.pos = 10_000 - 200
    assert job.chunk_size(4) == max(lo, -(-200 // 8))
    job.source.pos = 10_000 - 40
    assert job.chunk_size(4) == lo


def test_chunk_size_of_a_stream_is_bounded():
    job = make_job(iter(range(10)))
    job.busy, job.timed_items = 1e-9 * 1000, 1000  # nearly free items
    assert job.chunk_size(4) == job_module.STREAM_MAX_CHUNK


def test_chunk_size_never_passes_max_chunk():
    job = make_job(range(3 * job_module.MAX_CHUNK))
    job.busy, job.timed_items = 1e-12, 1
    assert job.chunk_size(1) == job_module.MAX_CHUNK


def test_chunk_size_fixed_by_the_chunksize_option():
    job = make_job(range(10_000), chunksize=7)
    assert job.chunk_size(4) == 7
    job.busy, job.timed_items = 1.0, 10
    assert job.chunk_size(4) == 7


def test_chunk_size_is_one_with_a_timeout():
    job = make_job(range(10_000), timeout=5)
    job.busy, job.timed_items = 1e-3, 100
    assert job.chunk_size(4) == 1
    assert make_job(range(10), timeout=5, chunksize=3).chunk_size(4) == 3  # unless asked


def test_item_times_remembers_per_function_version():
    times = ItemTimes(size=2)
    a = make_job(range(10))
    a.busy, a.timed_items = 0.5, 10
    times.remember(a)
    b = make_job(range(10))
    times.recall(b)
    assert (b.busy, b.timed_items) == (0.5, 10)
    for key in ("k2", "k3"):  # evicts "k"
        j = Job(types.SimpleNamespace(key=key), ItemSource(range(1)), RunReport(), MapOptions(), None, square)
        j.busy, j.timed_items = 1.0, 1
        times.remember(j)
    c = make_job(range(10))
    times.recall(c)
    assert c.per_item_s() is None


def test_wire_options_leave_the_kwargs_out():
    job = make_job(range(3), seed=4, kwargs={"y": object()})
    assert job.wire_options.kwargs is None and job.wire_options.seed == 4
    assert job.options.kwargs is not None


# ---------------------------------------------------------------- output in item order


def test_take_printable_waits_for_every_earlier_item():
    job = make_job(range(9))
    a, b, c = take(job, 3), take(job, 3), take(job, 3)
    answer(job, b, outputs=[(4, "stdout", "four\n"), (3, "stderr", "three\n")])
    assert job.take_printable() == [], "printed before items 0-2 were done"
    answer(job, a, outputs=[(0, "stdout", "zero\n"), (2, "stdout", "two\n")])
    out = job.take_printable()
    assert [(o[0], o[2], o[3]) for o in out] == [
        (0, "stdout", "zero\n"), (2, "stdout", "two\n"), (3, "stderr", "three\n"), (4, "stdout", "four\n"),
    ]
    assert job.take_printable() == []
    answer(job, c, outputs=[(8, "stdout", "eight\n")])
    assert [o[0] for o in job.take_printable()] == [8]
    assert [o[0] for o in job.report.outputs] == [0, 2, 3, 4, 8]


def test_outputs_of_one_item_keep_their_order():
    job = make_job(range(2))
    a = take(job, 2)
    answer(job, a, outputs=[(1, "stdout", "b1\n"), (1, "stderr", "b2\n"), (0, "stdout", "a\n"), (1, "stdout", "b3\n")])
    assert [o[3] for o in job.take_printable()] == ["a\n", "b1\n", "b2\n", "b3\n"]


def test_take_printable_final_returns_everything():
    job = make_job(range(6))
    take(job, 3)  # items 0-2 never answer
    b = take(job, 3)
    answer(job, b, outputs=[(5, "stdout", "five\n")])
    assert job.take_printable() == []
    assert [o[0] for o in job.take_printable(final=True)] == [5]


def test_output_after_a_crashed_item_is_printed_without_waiting_for_the_end():
    job = make_job(range(6), keep_going=True)
    a, b = take(job, 1), take(job, 3)
    take(job, 2)  # still running: the map is not over
    job.items_failed([0], WorkerCrashedError("died", [0], -9), a[1], a[0])
    answer(job, b, outputs=[(1, "stdout", "one\n")])
    assert job.active
    assert [o[0] for o in job.take_printable()] == [1], "item 1's output waits for the end of the map"


def test_write_outputs_goes_to_the_right_stream(capsys):
    write_outputs([(0, 0, "stdout", "out\n"), (1, 1, "stderr", "err\n")])
    captured = capsys.readouterr()
    assert captured.out == "out\n" and captured.err == "err\n"
