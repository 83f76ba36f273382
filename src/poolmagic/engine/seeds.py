"""Per-item random streams for ``--seed S``: the same numbers for item i in any run.

Item ``i`` of a map with seed ``S`` gets ``SeedSequence(entropy=S,
spawn_key=(i,))``, spawned into three independent children: one seeds
``random``, one numpy's global ``RandomState`` (``np.random.*``), and one is
the item's own (``item_seed()``, ``item_rng()``). ``i`` is always the item's
position in the user's ITERABLE, never its position in a re-run (``--resume``,
``--checkpoint``, retries), so worker count, chunking, retries and resumes
never change an item's numbers. Without numpy the ``random`` seed and
``item_seed()`` are derived from (S, i) by SHA-256 instead: still independent
and reproducible.

Imported by every worker: numpy is imported only when a seeded item runs.
"""
from __future__ import annotations

import hashlib
import random
import sys
from typing import Any

_RANDOM, _NUMPY, _ITEM = 0, 1, 2  # the children of an item's SeedSequence, in spawn order

# the item running now in this process: (seed, index, its SeedSequence or None, its Generator or None)
_current: list | None = None


def _numpy() -> Any:
    np = sys.modules.get("numpy")
    if np is None:
        try:  # the function may import numpy itself: seed it before it runs
            import numpy as np
        except ImportError:
            return None
    return np


def _hashed(seed: int, index: int, what: str, nbytes: int) -> int:
    digest = hashlib.sha256(f"poolmagic:{seed}:{index}:{what}".encode()).digest()
    return int.from_bytes(digest[:nbytes], "little")


def seed_item(seed: int, index: int) -> None:
    """Seed ``random`` and numpy's global generator for item ``index`` of a map with ``seed``.

    What a worker does before each item of a seeded map, and what
    ``RunReport.rerun`` / ``%pooldebug`` do before re-running one here, so
    both draw the same numbers. ``item_seed()``/``item_rng()`` answer for
    this item until the next call or ``clear()``.
    """
    global _current
    np = _numpy()
    if np is None:
        random.seed(_hashed(seed, index, "random", 32))
        _current = [seed, index, None, None]
        return
    children = np.random.SeedSequence(entropy=seed, spawn_key=(index,)).spawn(3)
    random.seed(int.from_bytes(children[_RANDOM].generate_state(4).tobytes(), "little"))
    np.random.seed(children[_NUMPY].generate_state(4))
    _current = [seed, index, children[_ITEM], None]


def clear() -> None:
    """No seeded item runs now: ``item_seed()``/``item_rng()`` draw fresh entropy."""
    global _current
    _current = None


def item_seed() -> int:
    """The running item's own seed: a 64-bit int, the same for item i in every run with ``--seed S``.

    For any library that takes an int seed: ``torch.manual_seed(item_seed())``,
    ``random.Random(item_seed())``; for one that wants 32 bits (scikit-learn's
    ``random_state``), ``item_seed() % 2**32``. It is independent of the streams
    ``random`` and ``np.random`` were seeded with for the item. Derived from
    ``SeedSequence(entropy=S, spawn_key=(i,))`` (its third child), i being the
    item's position in the ITERABLE, so resumes, retries, chunking and worker
    count never change it. In a map without ``--seed``, or outside a map, each
    call returns a fresh random seed.
    """
    cur = _current
    if cur is None:
        return random.SystemRandom().getrandbits(64)
    if cur[2] is None:
        return _hashed(cur[0], cur[1], "item", 8)
    return int(cur[2].generate_state(1, "uint64")[0])


def item_rng() -> Any:
    """The running item's own ``numpy.random.Generator``, reproducible with ``--seed S``.

    ``np.random.default_rng`` of the item's own ``SeedSequence`` child (see
    ``item_seed``): the best way to draw numbers in a seeded map. Within one
    item every call returns the same Generator (two helpers drawing from it
    continue one stream, they never repeat it). In a map without ``--seed``,
    or outside a map, each call returns a Generator seeded from fresh entropy.
    Needs numpy.
    """
    import numpy as np

    cur = _current
    if cur is None:
        return np.random.default_rng()
    if cur[3] is None:
        cur[3] = np.random.default_rng(cur[2] if cur[2] is not None else _hashed(cur[0], cur[1], "item", 16))
    return cur[3]
