"""engine/items.py: where a map's items come from (ItemSource), without processes.

``take`` is the backend's side (its manager thread), ``feed`` the caller's: a
stream (anything but a range, list or tuple) is only ever read by ``feed``.
"""
from __future__ import annotations

import itertools
import sqlite3
import threading
import time

import pytest

from poolmagic import BadInputError
from poolmagic.engine.items import MAX_READ_AHEAD, ItemSource


class Counting:
    """An iterator that records how many items were read from it, and from which thread."""

    def __init__(self, n: int, fail_at: int | None = None, exc: BaseException | None = None):
        self.n, self.fail_at, self.exc = n, fail_at, exc
        self.read = 0
        self.threads: set[int] = set()

    def __iter__(self):
        return self

    def __next__(self):
        self.threads.add(threading.get_ident())
        if self.fail_at is not None and self.read == self.fail_at:
            raise self.exc or ValueError(f"cannot make item {self.read}")
        if self.read >= self.n:
            raise StopIteration
        self.read += 1
        return self.read - 1


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


# ---------------------------------------------------------------- sequences


@pytest.mark.parametrize("seq", [range(10), list(range(10)), tuple(range(10))])
def test_sequences_are_sliced_without_feeding(seq):
    src = ItemSource(seq)
    assert not src.is_stream
    assert src.length == 10 and src.remaining() == 10
    assert not src.needs_feed()
    assert src.has_items()
    assert src.take(4) == (0, seq[0:4])
    assert type(src.take(4)[1]) is type(seq)
    assert src.remaining() == 2
    assert src.take(4) == (8, seq[8:10])
    assert src.exhausted and not src.has_items()
    assert src.take(4) is None
    assert src.items_for_sampling() is seq


def test_a_range_chunk_is_a_range():
    src = ItemSource(range(5, 100, 5))
    start, items = src.take(3)
    assert start == 0 and items == range(5, 20, 5) and type(items) is range


def test_an_exact_take_of_the_last_items_exhausts_the_sequence():
    src = ItemSource([1, 2, 3])
    assert src.take(3) == (0, [1, 2, 3])
    assert src.exhausted


def test_an_empty_sequence_is_exhausted_at_once():
    src = ItemSource([])
    assert src.exhausted and not src.has_items()
    assert src.take(5) is None


def test_only_exact_sequence_types_are_sliced():
    """A subclass of list may override __getitem__ with user code: it is a stream."""

    class MyList(list):
        pass

    src = ItemSource(MyList([1, 2, 3]))
    assert src.is_stream
    assert src.length == 3  # len() is known all the same
    assert src.take(3) is None  # nothing fed yet
    assert src.feed() is None
    assert src.take(3) == (0, [1])  # want defaults to 1


# ---------------------------------------------------------------- streams


def test_a_generator_is_not_read_by_take():
    it = Counting(100)
    src = ItemSource(it)
    assert src.is_stream and src.length is None and src.remaining() is None
    src.set_want(8)
    assert src.take(5) is None
    assert src.take(5) is None
    assert it.read == 0, "take() read the stream"
    assert not src.has_items() and not src.exhausted
    assert src.needs_feed()
    assert src.feed() is None
    assert it.read == 8
    assert src.take(5) == (0, [0, 1, 2, 3, 4])
    assert it.read == 8, "take() read the stream"


def test_feed_reads_up_to_want_and_no_more():
    it = Counting(1000)
    src = ItemSource(it)
    src.set_want(10)
    src.feed()
    assert it.read == 10 and src.read == 10
    assert not src.needs_feed()
    src.feed()  # already full: reads nothing
    assert it.read == 10
    src.take(6)
    assert src.needs_feed()  # 4 left, less than half of 10
    src.feed()
    assert it.read == 16, "feed tops the buffer up to want"
    assert src.take(100) == (6, list(range(6, 16)))


def test_set_want_is_clamped():
    src = ItemSource(iter([]))
    src.set_want(0)
    assert src.want == 1
    src.set_want(10**12)
    assert src.want == MAX_READ_AHEAD


def test_callbacks_fire():
    it = Counting(100)
    src = ItemSource(it)
    low, arrived = [], []
    src.on_low = lambda: low.append(src.pos)
    src.on_items = lambda: arrived.append(src.read)
    src.set_want(4)
    src.feed()
    assert arrived and arrived[-1] == 4, "on_items did not fire when items arrived"
    assert src.take(1) == (0, [0])
    assert low == [], "3 of 4 left is not low"
    assert src.take(1) == (1, [1])
    assert low == [], "2 of 4 left is not low"
    assert src.take(1) == (2, [2])
    assert low == [3], "on_low did not fire when the buffer fell under half of want"


def test_on_low_does_not_fire_once_the_stream_ended():
    src = ItemSource(iter(range(3)))
    low = []
    src.on_low = lambda: low.append(1)
    src.set_want(10)
    src.feed()
    assert src.stream_done
    assert src.take(1) == (0, [0])
    assert low == []


def test_a_stream_ends():
    src = ItemSource(Counting(5))
    src.set_want(3)
    src.feed()
    assert src.take(3) == (0, [0, 1, 2])
    assert not src.exhausted
    src.feed()  # reads the last 2 and the end
    assert src.stream_done
    assert src.take(10) == (3, [3, 4])
    assert src.exhausted
    assert src.take(10) is None
    assert not src.needs_feed()


def test_a_stream_of_exactly_want_items_ends_on_the_next_feed():
    src = ItemSource(Counting(4))
    src.set_want(4)
    src.feed()
    assert not src.stream_done
    assert src.take(4) == (0, [0, 1, 2, 3])
    assert not src.exhausted
    src.feed()
    assert src.stream_done and src.exhausted
    assert src.take(1) is None


def test_a_stream_whose_len_is_zero_is_still_read():
    """A DataFrame without rows has len() 0 but yields its column names: the source was
    exhausted at once, and the map gave [] where the loop gives one result per column."""
    pd = pytest.importorskip("pandas")
    src = ItemSource(pd.DataFrame({"a": [], "b": []}))
    assert not src.exhausted
    src.set_want(10)
    src.feed()
    assert src.take(10) == (0, ["a", "b"])
    assert src.exhausted
    assert ItemSource(pd.DataFrame({"a": range(10), "b": range(10), "c": range(10)})).length == 3
    empty = ItemSource({})  # an empty stream still ends
    empty.feed()
    assert empty.exhausted and empty.take(1) is None


def _one_buffer(n: int):
    buf = [0]
    for i in range(n):
        buf[0] = i
        yield buf


@pytest.mark.parametrize("fast", [False, True])
def test_a_stream_yielding_one_object_again_is_refused_at_the_repeat(fast):
    """A generator that refills one buffer per item: read ahead, every buffered item was that
    object with its last contents (a map gave [[5], [5], ...] where the loop gives 0..5)."""
    src = ItemSource(itertools.chain(({"k": i} for i in range(40)), _one_buffer(3)))
    src._fast = fast
    src.set_want(100)
    err = src.feed()
    assert isinstance(err, BadInputError) and "yielded item 41 as the very object it yielded for item 40" in str(err)
    start, items = src.take(100)
    assert items[:40] == [{"k": i} for i in range(40)] and len(items) == 41  # the items before it stay
    assert src.error is err


def test_a_tuple_holding_one_object_again_is_refused():
    """enumerate(a generator refilling one buffer): tuples are new each time, the buffer is not."""
    src = ItemSource(enumerate(_one_buffer(3)))
    src.set_want(10)
    err = src.feed()
    assert isinstance(err, BadInputError) and "yielded item 1 as the very object it yielded for item 0" in str(err)
    model = [1]
    for fine in (enumerate([[0], [1]]), zip(itertools.repeat(model), range(3)), itertools.product([model], range(3))):
        src = ItemSource(fine)  # new lists; one unchanged object passed with each item on purpose
        src.set_want(10)
        assert src.feed() is None and len(src.take(10)[1]) >= 2


def test_one_unchanged_object_repeated_or_immutable_items_are_not_refused():
    import enum

    np = pytest.importorskip("numpy")
    color = enum.Enum("Color", "RED BLUE")
    for stream in (itertools.repeat([1], 3), (0 for _ in range(3)), (("a", 1) for _ in range(3)),
                   iter(np.array([True, True, False])),  # np.True_ is one object
                   iter([color.RED] * 3), iter([int] * 3)):
        src = ItemSource(stream)
        src.set_want(10)
        assert src.feed() is None and len(src.take(10)[1]) == 3


def test_the_sample_kept_for_tune_is_bounded_in_bytes():
    """A stream of big arrays: the first 2000 were kept alive with the pool's last map (the
    sample --tune re-maps), 40 GB for 20 MB items, where a loop holds one at a time."""
    np = pytest.importorskip("numpy")
    src = ItemSource(np.zeros(50) for _ in range(20))  # 400 bytes each
    src.SAMPLE_BYTES = 1000
    src.set_want(100)
    src.feed()
    assert len(src.take(100)[1]) == 20
    assert len(src.sample) == 2
    big = ItemSource(iter([np.zeros(1000)]))  # bigger than the budget: still one, for --tune
    big.SAMPLE_BYTES = 1000
    big.feed()
    assert len(big.sample) == 1


def test_groupby_groups_are_read_with_their_item():
    """Advancing a groupby empties the group before it: read ahead, each group reached the workers
    empty (a map of len(list(g)) gave 0s). Each group is taken as it is read."""
    src = ItemSource(itertools.groupby([1, 1, 2, 3, 3, 3]))
    src.set_want(10)
    src.feed()
    assert [(k, list(g)) for k, g in src.take(10)[1]] == [(1, [1, 1]), (2, [2]), (3, [3, 3, 3])]


def test_an_iterable_raising_midway_names_the_item_and_keeps_the_items_before():
    it = Counting(100, fail_at=3)
    src = ItemSource(it)
    src.set_want(10)
    err = src.feed()
    assert isinstance(err, ValueError) and str(err) == "cannot make item 3"
    assert any("producing item 3" in n for n in notes(err)), notes(err)
    assert src.stream_done
    assert src.take(10) == (0, [0, 1, 2])
    assert src.exhausted


def test_the_position_counts_items_read_by_earlier_feeds():
    src = ItemSource(Counting(100, fail_at=7))
    src.set_want(5)
    assert src.feed() is None
    src.take(5)
    err = src.feed()
    assert any("producing item 7" in n for n in notes(err)), notes(err)
    assert src.take(10) == (5, [5, 6])


def test_an_iterable_failing_at_once_exhausts_the_source():
    src = ItemSource(Counting(10, fail_at=0))
    err = src.feed()
    assert any("producing item 0" in n for n in notes(err))
    assert src.exhausted and src.take(1) is None


def test_keyboard_interrupt_in_the_iterable_propagates():
    src = ItemSource(Counting(10, fail_at=2, exc=KeyboardInterrupt()))
    src.set_want(5)
    with pytest.raises(KeyboardInterrupt):
        src.feed()


def test_close_drops_the_buffer():
    it = Counting(100)
    src = ItemSource(it)
    src.set_want(10)
    src.feed()
    src.close()
    assert src.exhausted and src.stream_done
    assert src.take(5) is None
    assert not src.needs_feed()
    assert src.feed() is None
    assert it.read == 10, "a closed source read on"


def test_close_a_sequence():
    src = ItemSource(range(10))
    src.take(2)
    src.close()
    assert src.take(2) is None


def test_sample_keeps_the_first_items():
    src = ItemSource(iter(range(5000)))
    src.set_want(1500)
    while not src.stream_done:
        src.feed()
        while src.take(700):
            pass
    assert src.sample == list(range(ItemSource.SAMPLE_SIZE))
    assert src.items_for_sampling() == src.sample


def test_a_short_stream_is_sampled_whole():
    src = ItemSource(x * x for x in range(7))
    src.set_want(100)
    src.feed()
    assert src.sample == [x * x for x in range(7)]


def test_a_sqlite3_cursor_fed_in_the_creating_thread():
    """sqlite3 objects refuse other threads: the caller's thread reads, the backend only takes."""
    con = sqlite3.connect(":memory:")
    try:
        con.execute("create table t (i integer, sq integer)")
        con.executemany("insert into t values (?, ?)", [(i, i * i) for i in range(50)])
        cursor = con.execute("select i, sq from t order by i")
        src = ItemSource(cursor)
        assert src.is_stream and src.length is None
        src.set_want(64)

        taken, errors = [], []

        def backend():  # the manager thread: takes, never reads the cursor
            try:
                while not src.exhausted:
                    got = src.take(7)
                    if got is not None:
                        taken.append(got)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        assert src.feed() is None  # in the creating thread
        t = threading.Thread(target=backend)
        t.start()
        t.join(5)
        assert not t.is_alive() and not errors, errors
        rows = [row for _, items in taken for row in items]
        assert rows == [(i, i * i) for i in range(50)]
        assert [start for start, _ in taken] == list(range(0, 50, 7))

        # the control: reading the same kind of cursor from another thread fails
        other = con.execute("select i from t")
        failed = []
        t = threading.Thread(target=lambda: failed.append(_next_error(other)))
        t.start()
        t.join(5)
        assert failed and isinstance(failed[0], sqlite3.ProgrammingError)
    finally:
        con.close()


def _next_error(cursor):
    try:
        next(cursor)
    except Exception as exc:
        return exc
    return None


def test_a_feeder_thread_and_a_taker_thread_hand_over_every_item_once():
    """An async map: a feeder thread feeds when woken, the manager thread takes."""
    n = 5_000
    src = ItemSource(iter(range(n)))
    src.set_want(256)
    wake = threading.Event()
    src.on_low = wake.set
    done = threading.Event()

    def feeder():
        while not src.stream_done and not done.is_set():
            if src.needs_feed():
                src.feed()
            else:
                wake.wait(0.01)
                wake.clear()

    t = threading.Thread(target=feeder)
    t.start()
    got = []
    try:
        while not src.exhausted:
            c = src.take(37)
            if c is None:
                time.sleep(0.0005)
            else:
                assert c[0] == len(got)
                got.extend(c[1])
    finally:
        done.set()
        t.join(5)
    assert got == list(range(n))
