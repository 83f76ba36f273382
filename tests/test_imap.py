"""imap and imap_unordered (imap.py): results lazily, errors in place, bounded memory."""
from __future__ import annotations

import gc
import os
import time

import pytest
from conftest import wait_for

from poolmagic import BadInputError, Pool
from poolmagic.errors import ItemTimeoutError


def double(x):
    return 2 * x


def raise_on(x, bad=(2, 5)):
    if x in bad:
        raise ValueError(f"bad {x}")
    return x


def test_imap_streams_with_errors_in_place():
    with Pool(2) as p:
        it = p.imap(raise_on, iter(range(8)))
        got = []
        for _ in range(8):
            try:
                got.append(next(it))
            except ValueError as exc:
                got.append(str(exc))
        assert got == [0, 1, "bad 2", 3, 4, "bad 5", 6, 7]
        with pytest.raises(StopIteration):
            next(it)
        assert sorted(p.imap_unordered(double, range(100), 7)) == [2 * x for x in range(100)]


def test_imap_memory_stays_bounded_on_a_long_stream():
    """Results are handed over, not kept: RSS does not grow with the items consumed.

    Regression (flaky under load): each item's 8-byte --resume key was kept for a stream
    (15 MB over these 2M items, 80 MB at 10⁷) though an imap keeps no result to resume;
    with up to ~200k results waiting for a consumer starved by the load, 1M items came
    within a few MB of the old 16 MB bound. The producer waits for its consumer (at most
    64k items ahead), so what waits is bounded and the figure is what is kept.
    """
    n = 2_000_000  # 10⁷ in docs/design.md; a kept list of this size would add ~72 MB
    consumed = 0

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def producer():
        for i in range(n):
            if i % 4096 == 0:
                wait_for(lambda: consumed >= i - 65536, timeout=60, what="the consumer")
            yield -i

    with Pool(2) as p:
        total = 0
        for v in p.imap(abs, producer()):
            total += v
            consumed += 1
            if consumed == 100_000:
                gc.collect()
                base = rss()
        gc.collect()
        grown = rss() - base
    assert total == sum(range(n))
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB over {n:,} items"


def test_resuming_an_imap_is_refused_for_what_it_is():
    """An imap keeps no results: resuming its report said "nothing to resume: all 10 items of
    the earlier run finished" (a stream cut short said so too), now it says why."""
    with Pool(2) as p:
        it = p.imap(abs, (x for x in range(10)))
        assert list(it) == list(range(10))
        with pytest.raises(BadInputError, match="cannot resume an imap: it hands its results out and keeps none"):
            p.run(abs, range(10), resume=it.report)


def fails_first_time(x, folder, bad=(3, 7), always=(5,)):
    """Items in ``bad`` raise on their first attempt only (a marker file per item); ``always`` every time."""
    mark = os.path.join(folder, f"ran-{x}")
    if x in always or (x in bad and not os.path.exists(mark)):
        open(mark, "w").close()
        raise ConnectionError(f"flaky {x}")
    return 10 * x


def _drain(it, errors: type = ConnectionError) -> list:
    out = []
    while True:
        try:
            out.append(next(it, StopIteration))
        except errors as exc:
            out.append("timeout" if isinstance(exc, ItemTimeoutError) else str(exc))
        if out and out[-1] is StopIteration:
            return out[:-1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["local", "threads"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_with_retries_hands_out_every_result_once(tmp_path, backend, chunksize):
    """A retried item not last in its chunk: imap skipped the rest of its chunk (items 4 and 5 of
    3..5) waiting for them ever after, and imap_unordered lost them: both hung for good."""
    want = [0, 10, 20, 30, 40, "flaky 5", 60, 70, 80, 90]
    with Pool(2, backend=backend) as p:
        for ordered in (True, False):
            for f in tmp_path.iterdir():
                f.unlink()
            imap = p.imap if ordered else p.imap_unordered
            got = _drain(imap(fails_first_time, range(10), chunksize, retries=1, kwargs={"folder": str(tmp_path)}))
            assert (got if ordered else sorted(got, key=str)) == (want if ordered else sorted(want, key=str))


def stalls(x, folder, once=(2,), always=(4,)):
    """Items in ``once`` stall on their first attempt only (a marker file); those in ``always`` every time."""
    mark = os.path.join(folder, f"stalled-{x}")
    if x in always or (x in once and not os.path.exists(mark)):
        open(mark, "w").close()
        time.sleep(60)
    return 10 * x


@pytest.mark.timeout(90)
def test_imap_unordered_with_retries_gives_a_timed_out_item_its_last_attempt_once(tmp_path):
    """An item past --timeout and queued again was handed out as failed at its first timeout
    (an item that then succeeded gave its error too) and again at its last: 9 answers for 8 items."""
    with Pool(2) as p:
        got = _drain(p.imap_unordered(stalls, range(8), 3, timeout=1, retries=1,
                                      kwargs={"folder": str(tmp_path)}), errors=ItemTimeoutError)
    assert sorted(map(str, got)) == sorted(["0", "10", "20", "30", "50", "60", "70", "timeout"]), got


def first_quick(x, folder):
    """Item 0 returns at once; the others run 30 s (and leave a mark if let finish)."""
    if x:
        time.sleep(30)
        open(os.path.join(folder, f"done-{x}"), "w").close()
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["local", "threads"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_loop_that_breaks_out_of_imap_stops_its_map(tmp_path, backend, stream):
    """``for r in pool.imap(...): break`` left the map running to the end of its ITERABLE (here
    19 items of 30 s) for results no one could read any more, and the next map waited behind it."""
    items = range(20) if not stream else (x for x in range(20))
    with Pool(2, backend=None if backend == "local" else backend) as p:
        for meth in ("imap", "imap_unordered"):
            for r in getattr(p, meth)(first_quick, items, chunksize=1, kwargs={"folder": str(tmp_path)}):
                assert r == 0
                break
            # at once: the items after the break do not run (a held thread is replaced by a fresh one)
            assert p.map(double, range(4)) == [0, 2, 4, 6]
            items = range(20) if not stream else (x for x in range(20))
    assert not list(tmp_path.glob("done-*"))
