"""--retries never drops a result (issue 22), on every backend (tests/conftest.py's backend fixture).

An item that fails once and then succeeds is re-run alone; the items after it
in its chunk, which its worker never reached, must run too. Each item's
attempts are counted through marker files (one per item and attempt), so a
re-run knows what the item will do and the test knows what ran.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cloudpickle
import pytest
from conftest import runs

import poolmagic
from poolmagic import NOT_DONE, MapFailedError, Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def note_attempt(x, folder) -> int:
    """Leave a file for this attempt at item ``x``; returns how many came before it."""
    attempt = len([n for n in os.listdir(folder) if n.startswith(f"{x}.")])
    open(os.path.join(folder, f"{x}.{attempt}"), "w").close()
    return attempt


def fail_first_attempt(x, folder, bad=(2,), always=()):
    """Item ``x`` in ``bad`` raises on its first attempt, then returns 10 x; in ``always``, every time."""
    attempt = note_attempt(x, folder)
    if x in always or (x in bad and attempt == 0):
        raise ConnectionError(f"item {x} fails once")
    return 10 * x




@pytest.mark.parametrize("keep_going", [False, True])
@pytest.mark.parametrize("chunksize", [10, 7, 20])
def test_a_retried_item_loses_none_of_its_chunk(backend, tmp_path, chunksize, keep_going):
    r = backend.run(fail_first_attempt, range(20), chunksize=chunksize, retries=1, keep_going=keep_going,
                    kwargs={"folder": str(tmp_path)})
    assert r.results == [10 * x for x in range(20)]
    assert NOT_DONE not in r.results
    assert (r.status, r.done, r.failed, r.retried) == ("done", 20, 0, 1)
    # the item that needed a retry is visible: its failed attempt is kept
    assert {i: [type(e) for e in es] for i, es in r.attempts.items()} == {2: [ConnectionError]}
    assert runs(tmp_path) == {x: 2 if x == 2 else 1 for x in range(20)}


def test_several_retried_items_in_one_chunk(backend, tmp_path):
    bad = (0, 3, 9, 10, 19)
    r = backend.run(fail_first_attempt, range(20), chunksize=10, retries=2,
                    kwargs={"folder": str(tmp_path), "bad": bad})
    assert r.results == [10 * x for x in range(20)]
    assert (r.done, r.retried) == (20, len(bad))
    assert runs(tmp_path) == {x: 2 if x in bad else 1 for x in range(20)}


def test_a_retry_that_fails_again_still_stops_the_map(backend, tmp_path):
    """The control: retries exhausted, the map fails; what ran is kept, and counted right."""
    with pytest.raises(ConnectionError) as info:
        backend.run(fail_first_attempt, range(20), chunksize=10, retries=1,
                    kwargs={"folder": str(tmp_path), "always": (2,)})
    r = info.value.poolmap_report
    assert r.status == "failed" and list(r.errors) == [2]
    assert r.done == sum(v is not NOT_DONE for v in r.results)
    assert [type(e) for e in r.attempts[2]] == [ConnectionError, ConnectionError]
    assert runs(tmp_path)[2] == 2


def test_every_retry_counted_is_an_attempt_kept_when_a_map_stops_with_retries_pending(backend, tmp_path):
    """Items that failed and waited to run again when the map stopped at another's last failure:
    ``retried`` counted their retries and ``.attempts`` held only the failing item's (a map read
    '6 retried' beside one item's three). Every failed attempt that was counted is kept."""
    with pytest.raises(ConnectionError) as info:
        backend.run(fail_first_attempt, range(3), chunksize=1, retries=3,
                    kwargs={"folder": str(tmp_path), "always": (0, 1, 2)})
    r = info.value.poolmap_report
    failed_attempts = sum(len(v) - (i in r.errors) for i, v in r.attempts.items())
    assert failed_attempts == r.retried, (r.retried, {i: len(v) for i, v in r.attempts.items()}, list(r.errors))
    assert all(type(e) is ConnectionError for v in r.attempts.values() for e in v)


def test_keep_going_retries_exhausted_keeps_every_other_result(backend, tmp_path):
    with pytest.raises(MapFailedError) as info:
        backend.run(fail_first_attempt, range(20), chunksize=10, retries=1, keep_going=True,
                    kwargs={"folder": str(tmp_path), "always": (2,), "bad": (5,)})
    r = info.value.poolmap_report
    assert r.results == [NOT_DONE if x == 2 else 10 * x for x in range(20)]
    assert (r.done, r.failed, r.retried) == (19, 1, 2)


def test_pmap_with_retries_and_chunks(tmp_path):
    got = poolmagic.pmap(fail_first_attempt, range(20), chunksize=10, retries=1,
                         kwargs={"folder": str(tmp_path)})
    assert got == [10 * x for x in range(20)]


def test_magic_with_retries_and_chunks(ip, tmp_path):
    ip.user_ns["RETRY_FOLDER"] = str(tmp_path)
    ip.user_ns["fail_first_attempt"] = fail_first_attempt
    ip.run_cell_magic("poolmap", "-q -o retry_r -c 10 --retries 1 range(20)",
                      "def retry_chunk_cell(x):\n"
                      "    return fail_first_attempt(x, RETRY_FOLDER)\n")
    assert ip.user_ns["retry_r"] == [10 * x for x in range(20)]
    report = ip.user_ns["_poolmap"]
    assert (report.status, report.done, report.retried) == ("done", 20, 1)


def crash_first_attempt(x, folder, bad=2):
    """Item ``bad`` kills its worker on its first attempt (os._exit), then returns 10 x."""
    attempt = note_attempt(x, folder)
    if x == bad and attempt == 0:
        os._exit(3)
    return 10 * x


@pytest.mark.parametrize("chunksize", [1, 5])
def test_an_item_that_crashes_its_worker_once_is_retried_alone(backend, tmp_path, chunksize):
    """The crash is the culprit's alone, and counted alike on both backends.

    A chunk of several items whose worker died is first run again item by item
    to find the culprit (not a retry: its items' results died with the worker);
    here the culprit's second run then succeeds. One item alone is retried.
    """
    backend.need("crash-isolation")
    r = backend.run(crash_first_attempt, range(10), chunksize=chunksize, retries=1,
                    kwargs={"folder": str(tmp_path)})
    assert r.results == [10 * x for x in range(10)]
    assert (r.status, r.done, r.failed) == ("done", 10, 0)
    assert r.retried == (1 if chunksize == 1 else 0)
    # the retried item's failed attempt is kept (a chunk's item-by-item re-run is no attempt)
    assert {i: [type(e).__name__ for e in es] for i, es in r.attempts.items()} == (
        {2: ["WorkerCrashedError"]} if chunksize == 1 else {})


class _Watch:
    """A live display's counts (live.Progress), fed by the map's events."""

    def attach(self, job):
        from poolmagic.live import Progress

        self.progress = Progress(20, 2)
        job.observers.append(self.progress)

    def tick(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("chunksize", [1, 10])
def test_live_progress_counts_a_retried_item_once(backend, tmp_path, chunksize):
    """The progress a user watches said 22 of 20 done, 2 failed, for a map that succeeded."""
    watch = _Watch()
    r = backend.run(fail_first_attempt, range(20), chunksize=chunksize, retries=1, watch=watch,
                    kwargs={"folder": str(tmp_path), "bad": (2, 13)})
    assert r.retried == 2 and r.done == 20
    p = watch.progress
    assert (p.done, p.failed, p.finished) == (20, 0, 20)


def hang_first_attempt(x, folder, bad=2):
    """Item ``bad`` hangs on its first attempt (past any --timeout here), then returns 10 x."""
    attempt = note_attempt(x, folder)
    if x == bad and attempt == 0:
        import time

        time.sleep(60)
    return 10 * x


def test_an_item_that_times_out_once_in_a_chunk_is_retried_alone(backend, tmp_path):
    """A chunk of 4 timed out: its items are re-run one by one; only the one that hung is retried."""
    backend.need("kill-on-timeout")
    r = backend.run(hang_first_attempt, range(8), chunksize=4, timeout=2, retries=1,
                    kwargs={"folder": str(tmp_path)})
    assert r.results == [10 * x for x in range(8)]
    assert (r.status, r.done, r.failed, r.attempts, r.retried) == ("done", 8, 0, {}, 0)
    assert runs(tmp_path)[2] == 2
