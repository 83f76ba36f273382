"""checks.py: what is refused before any work, and what must not be."""
from __future__ import annotations

import numpy as np
import pytest

from poolmagic import BadInputError, Pool
from poolmagic.checks import check_star


def _add(a, b):
    return a + b


def test_star_takes_numpy_records_as_the_loop_does():
    """``f(*row)`` unpacks a structured array's record (np.void iterates by index, without
    ``__iter__``): --star refused it as 'not a sequence of arguments'."""
    st = np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])
    st["a"] = [1, 2, 3]
    assert list(check_star(st)) == list(st)
    with Pool(1) as pool:
        assert pool.starmap(_add, st) == [_add(*r) for r in st] == [1.0, 2.0, 3.0]
    with pytest.raises(BadInputError, match="item 1 is an int"):
        check_star([(1, 2), 3])
