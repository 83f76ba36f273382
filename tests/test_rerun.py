"""engine/core/rerun.py: what of a map runs again, through a Job driven by hand.

A chunk put back goes out first and whole; one re-run item by item goes out
one item at a time, in order; nothing of a map that ended runs again; the
items of a chunk that can be sent run again when the others cannot.
"""
from __future__ import annotations

from job_helpers import answer, has_failure_note, make_job, notes, run_all, take
from poolmagic.errors import ItemPicklingError, MapCancelledError, MapFailedError
from poolmagic.sentinel import NOT_DONE


def test_requeue_hands_the_same_chunk_out_first():
    job = make_job(range(10))
    a = take(job, 3)
    b = take(job, 3)
    job.requeue(*a)
    assert job.inflight == 1
    assert job.next_items(3) == a
    assert job.inflight == 2
    answer(job, a)
    answer(job, b)
    run_all(job)
    assert job.report.results == [x * x for x in range(10)]


def test_retry_singly_splits_a_chunk_into_its_items_in_order():
    job = make_job(list("abcdef"), str.upper)
    a = take(job, 4)
    job.retry_singly(*a)
    assert job.inflight == 0
    singles = [job.next_items(10) for _ in range(4)]
    assert singles == [(0, ["a"]), (1, ["b"]), (2, ["c"]), (3, ["d"])]
    assert job.next_items(10) == (4, ["e", "f"])
    assert job.inflight == 5


def test_requeue_and_retry_of_a_finished_job_are_dropped():
    job = make_job(range(6))
    a, b = take(job, 2), take(job, 2)
    job.fail(MapCancelledError("x"), status="cancelled")
    job.requeue(*a)
    job.retry_singly(*b)
    assert job.inflight == 0
    assert not job.retry and not job.has_work()


def test_split_failed_keep_going_fails_the_bad_items_and_retries_the_rest():
    job = make_job(range(5), keep_going=True)
    a = take(job, 5)
    bad = {1: ItemPicklingError("item 1 cannot be pickled"), 3: ItemPicklingError("item 3 cannot be pickled")}
    job.split_failed(*a, bad)
    assert job.inflight == 0 and job.active
    assert set(job.report.errors) == {1, 3}
    retried = []
    while (got := job.next_items(5)) is not None:
        retried.append(got)
    assert retried == [(0, range(0, 1)), (2, range(2, 3)), (4, range(4, 5))]
    for chunk in retried:
        answer(job, chunk)
    assert isinstance(job.error, MapFailedError)
    assert job.report.results == [0, NOT_DONE, 4, NOT_DONE, 16]
    assert has_failure_note(bad[1], 1, "1"), notes(bad[1])



def test_an_item_is_retried_as_often_as_asked_and_only_for_the_errors_named():
    from poolmagic.engine.core.rerun import Reruns
    from poolmagic.engine.mapoptions import MapOptions

    again = Reruns(MapOptions(retries=2, retry_on=(OSError,)))
    first, second, third = OSError("1"), OSError("2"), OSError("3")
    assert again.again(5, first, [50]) and again.again(5, second, [50])
    assert not again.again(5, third, [50]), "a third attempt with --retries 2"
    assert again.tries(5) == [first, second]
    assert not again.again(6, ValueError("not named"), [60])
    assert not again.again(7, OSError("no item to run again"), None)
    assert [again.pop(), again.pop()] == [(5, [50]), (5, [50])] and not again
    assert list(again.succeeded(4, 3, failed={6})) == [(5, [first, second])]
    assert not Reruns(MapOptions()).again(0, OSError("no --retries"), [0])
