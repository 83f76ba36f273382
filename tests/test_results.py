"""engine/core/results.py: what a chunk's answer writes in the map's record, through a Job driven by hand.

An item's error is recorded once by index, with a note that names the item
(its value shortened) and a hint at ``star=True`` where a tuple item did not
fit the function; an item that exits or interrupts becomes ItemExitError; a
stream's record holds a place for items that failed.
"""
from __future__ import annotations

import re

import pytest

from job_helpers import add, answer, has_failure_note, item_named, make_job, notes, run_all, square, take
from poolmagic.errors import ItemExitError, MapFailedError


def test_a_long_item_value_is_shortened_in_the_note():
    job = make_job(["x" * 500], lambda s: int(s))
    run_all(job)
    note = [n for n in notes(job.error) if n.startswith("poolmagic: item 0")][0]
    assert len(note) < 120 and "..." in note


def test_items_failed_without_items_names_only_the_index():
    job = make_job(range(3), keep_going=True)
    take(job, 3)
    exc = RuntimeError("lost")
    job.items_failed([0, 1, 2], exc)
    assert has_failure_note(exc, 0), notes(exc)
    assert job.report.status == "failed"


def test_items_failed_of_a_stream_extends_the_results():
    job = make_job(iter(range(4)), keep_going=True)
    job.source.set_want(4)
    job.source.feed()
    a = take(job, 4)
    job.items_failed([2, 3], RuntimeError("x"), a[1], a[0])
    assert len(job.report.results) == 4
    job.source.feed()  # reads the end of the stream
    assert job.next_items(1) is None  # the source ended: the job finishes
    assert job.report.items == 4 and len(job.report.results) == 4


@pytest.mark.parametrize("code, shown", [(2, "sys.exit(2)"), (None, "sys.exit()"), ("bye", "sys.exit('bye')")])
def test_system_exit_in_an_item_becomes_item_exit_error(code, shown):
    def f(x):
        if x == 1:
            raise SystemExit(code)
        return x

    job = make_job(range(3), f)
    run_all(job, 3)
    err = job.error
    assert isinstance(err, ItemExitError), type(err)
    assert re.search(item_named(1, "1") + re.escape(f" called {shown} in its worker"), str(err)), str(err)
    assert isinstance(err.__cause__, SystemExit) and err.__cause__.code == code
    assert job.report.errors[1] is err
    assert not isinstance(err, SystemExit)


def test_keyboard_interrupt_in_an_item_becomes_item_exit_error():
    def f(x):
        raise KeyboardInterrupt

    job = make_job(range(2), f, keep_going=True)
    run_all(job, 2)
    errs = job.report.errors
    assert all(isinstance(e, ItemExitError) for e in errs.values())
    assert "raised KeyboardInterrupt in its worker" in str(errs[0])
    assert isinstance(job.error, MapFailedError)


def test_an_attempt_that_exited_is_kept_as_item_exit_error_too():
    """--retries: item 1 called sys.exit() on its first attempt (and KeyboardInterrupt on its
    second): report.attempts kept the raw SystemExit and KeyboardInterrupt beside the final
    ItemExitError, so re-raising an attempt's error ended the script or read as Ctrl-C."""
    tries = []

    def f(x):
        if x == 1 and len(tries) < 2:
            tries.append(x)
            raise SystemExit(4) if len(tries) == 1 else KeyboardInterrupt
        return x

    job = make_job(range(3), f, retries=2)
    run_all(job, 1)
    assert job.report.results == [0, 1, 2]
    kept = job.report.attempts[1]
    assert [type(e) for e in kept] == [ItemExitError, ItemExitError], kept
    assert isinstance(kept[0].__cause__, SystemExit) and isinstance(kept[1].__cause__, KeyboardInterrupt)

    def g(x):
        if x == 1:
            raise SystemExit(5)
        return x

    job = make_job(range(3), g, retries=1, keep_going=True)
    run_all(job, 1)
    assert [type(e) for e in job.report.attempts[1]] == [ItemExitError, ItemExitError]


def test_a_type_error_on_a_tuple_item_hints_at_star():
    job = make_job([(1, 2), (3, 4)], add)
    run_all(job)
    assert isinstance(job.error, TypeError)
    hint = [n for n in notes(job.error) if "--star" in n]
    assert hint, notes(job.error)
    assert "tuple of 2 values" in hint[0] and "takes 2 arguments" in hint[0]


@pytest.mark.parametrize(
    "func, items, options",
    [
        (add, [(1, 2)], {"star": True}),  # already --star
        (square, [(1, 2)], {}),  # the function takes one argument: no arity match
        (lambda a, b, c: a, [(1, 2)], {}),  # needs 3
        (lambda a, b=0: a, [(1,)], {}),  # a 1-tuple is not a sign of starmap
        (lambda a, b: a, ["ab"], {}),  # not a tuple
    ],
)
def test_no_star_hint_when_it_does_not_fit(func, items, options):
    job = make_job(items, func, **options)
    take(job, 1)
    exc = TypeError("wrong")
    job.items_failed([0], exc, items, 0)
    assert not [n for n in notes(exc) if "--star" in n], notes(exc)


def test_no_star_hint_for_other_errors():
    job = make_job([(1, 2)], add)
    take(job, 1)
    exc = ValueError("not a TypeError")
    job.items_failed([0], exc, [(1, 2)], 0)
    assert not [n for n in notes(exc) if "--star" in n]


def test_an_error_is_noted_once():
    job = make_job(range(4), keep_going=True)
    a = take(job, 4)
    exc = RuntimeError("same object for several items")
    job.items_failed([0, 1, 2, 3], exc, a[1], a[0])
    assert len([n for n in notes(exc) if n.startswith("poolmagic: item")]) == 1



def test_a_first_failure_that_overtook_earlier_items_says_so():
    """Item 3 failed while items 0 and 1 still ran on another worker: the map raised item 3's
    error where the plain loop raises item 0's or 1's (if they fail), without a word."""
    def f(x):
        if x == 3:
            raise KeyError(x)
        return x

    job = make_job(range(6), f)
    first, second = take(job, 2), take(job, 2)
    answer(job, second)  # items 2, 3 come back first
    err = job.error
    assert isinstance(err, KeyError)
    said = [n for n in notes(err) if "had not finished" in n]
    assert said and "(0, 1)" in said[0] and "plain loop" in said[0], notes(err)
    answer(job, first)  # late: kept, the error stays the one raised

    job = make_job(range(6), f)
    run_all(job, 2)  # in order: nothing before item 3 was unfinished
    assert not [n for n in notes(job.error) if "had not finished" in n]
