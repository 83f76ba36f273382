"""Failure plans combined, found by a hostile round: each test is one wrong answer it met.

The plain loop ``[f(x) for x in items]`` is the specification; an option such as
--timeout keeps the meaning its help gives it whatever the chunk size.
"""
from __future__ import annotations

import sys
import time

import cloudpickle
import pytest

from poolmagic import NOT_DONE, Pool
from poolmagic.errors import ItemTimeoutError

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_first(x: int) -> int:
    """Item 0 runs 3 s, then returns; the others return at once."""
    if x == 0:
        time.sleep(3)
    return x


@pytest.mark.timeout(60)
def test_timeout_bounds_each_item_of_a_chunk_of_several():
    """--timeout 1 with chunks of 4: item 0 ran 3 s and came back as a result, where the same
    map in chunks of 1 failed it (the chunk had a budget of 4 s for its 4 items)."""
    with Pool(2) as pool:
        with pytest.raises(ItemTimeoutError) as info:
            pool.run(slow_first, range(8), chunksize=4, timeout=1)
        r = info.value.poolmap_report
        assert list(r.errors) == [0]
        assert r.results[0] is NOT_DONE
        assert [v for v in r.results[4:]] == [4, 5, 6, 7]


def naps(x: int) -> int:
    time.sleep(0.3)
    return x


@pytest.mark.timeout(60)
def test_timeout_fails_no_item_of_a_chunk_that_ran_within_it():
    """Each item 0.3 s under --timeout 1, in chunks of 5 (1.5 s a chunk): none times out."""
    with Pool(2) as pool:
        assert pool.run(naps, range(10), chunksize=5, timeout=1).results == list(range(10))
