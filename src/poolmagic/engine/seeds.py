"""Per-item random streams for ``--seed S``: the same numbers for item i in any run.

Item ``i`` of a map with seed ``S`` gets ``SeedSequence(entropy=S,
spawn_key=(i,))``, spawned into three independent children: one seeds
``random``, one numpy's global ``RandomState`` (``np.random.*``), and one is
the item's own (``item_seed()``, ``item_rng()``). ``i`` is always the item's
position in the user's ITERABLE, never its position in a re-run (``--resume``,
``--checkpoint``, retries), so worker count, chunking, retries and resumes
never change an item's numbers. Without numpy, ``PySeedSequence`` (the same
algorithm in Python) derives the ``random`` seed and ``item_seed()``: a worker
without numpy draws the same ``random`` numbers as one with it.

Imported by every worker: numpy is imported only when a seeded item runs.
"""
from __future__ import annotations

import itertools
import random
import sys
import threading
from typing import Any

_RANDOM, _NUMPY, _ITEM = 0, 1, 2  # the children of an item's SeedSequence, in spawn order

# the item running now in this thread: [seed, index, its own SeedSequence, its Generator] (made when asked).
# Per thread: the threads backend runs items of several maps at once in one process.
_state = threading.local()


def _numpy() -> Any:
    np = sys.modules.get("numpy")
    if np is None:
        try:  # the function may import numpy itself: seed it before it runs
            import numpy as np
        except ImportError:
            return None
    return np


_M32 = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _XSHIFT, _POOL = 0xCA01F9DD, 0x4973F715, 16, 4


def _words(n: int) -> list[int]:
    """A non-negative int as 32-bit words, least significant first (0 is one word)."""
    out = [n & _M32]
    n >>= 32
    while n:
        out.append(n & _M32)
        n >>= 32
    return out


class PySeedSequence:
    """numpy's ``SeedSequence`` (O'Neill's seed_seq hash) for int entropy, in pure Python.

    Only what seeding needs: ``spawn`` and ``generate_state``; the words it
    generates equal numpy's (tests/test_seed.py checks), so a worker without
    numpy seeds ``random`` exactly as one with numpy does.
    """

    def __init__(self, entropy: int, spawn_key: tuple[int, ...] = ()):
        self.entropy, self.spawn_key = entropy, tuple(spawn_key)
        run = _words(entropy)
        spawn = [w for k in self.spawn_key for w in _words(k)]
        if spawn and len(run) < _POOL:
            run += [0] * (_POOL - len(run))
        self.pool = self._mix(run + spawn)

    @staticmethod
    def _mix(entropy: list[int]) -> list[int]:
        h = _INIT_A

        def hashmix(value: int) -> int:
            nonlocal h
            value ^= h
            h = (h * _MULT_A) & _M32
            value = (value * h) & _M32
            return value ^ (value >> _XSHIFT)

        def mix(x: int, y: int) -> int:
            r = (_MIX_L * x - _MIX_R * y) & _M32
            return r ^ (r >> _XSHIFT)

        pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(_POOL)]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        for src in range(_POOL, len(entropy)):
            for dst in range(_POOL):
                pool[dst] = mix(pool[dst], hashmix(entropy[src]))
        return pool

    def spawn(self, n: int) -> list["PySeedSequence"]:
        """The first ``n`` children (this class never counts children already spawned)."""
        return [PySeedSequence(self.entropy, self.spawn_key + (i,)) for i in range(n)]

    def generate_state(self, n_words: int) -> list[int]:
        """``n_words`` 32-bit words, as ``SeedSequence.generate_state(n_words, np.uint32)``."""
        h = _INIT_B
        out = []
        for value in itertools.islice(itertools.cycle(self.pool), n_words):
            value ^= h
            h = (h * _MULT_B) & _M32
            value = (value * h) & _M32
            out.append(value ^ (value >> _XSHIFT))
        return out


def _join(words: Any) -> int:
    return sum(int(w) << (32 * k) for k, w in enumerate(words))


def seed_item(seed: int, index: int) -> None:
    """Seed ``random`` and numpy's global generator for item ``index`` of a map with ``seed``.

    What a worker does before each item of a seeded map, and what
    ``RunReport.rerun`` / ``%pooldebug`` do before re-running one here, so
    both draw the same numbers. ``item_seed()``/``item_rng()`` answer for
    this item until the next call or ``clear()``.
    """
    # child k of SeedSequence(S, spawn_key=(i,)) is SeedSequence(S, spawn_key=(i, k)):
    # made directly, the parent's pool is never mixed, and the item's own only when asked
    np = _numpy()
    if np is None:
        random.seed(_join(PySeedSequence(seed, (index, _RANDOM)).generate_state(4)))
    else:
        words = np.random.SeedSequence(seed, spawn_key=(index, _RANDOM)).generate_state(4)
        random.seed(int.from_bytes(words.tobytes(), "little"))  # = _join(words), 2 µs sooner
        np.random.seed(np.random.SeedSequence(seed, spawn_key=(index, _NUMPY)).generate_state(4))
    _state.current = [seed, index, None, None]


def _item_sequence(cur: list) -> Any:
    """The running item's own SeedSequence (numpy's, or ours without numpy)."""
    if cur[2] is None:
        np = _numpy()
        key = (cur[1], _ITEM)
        cur[2] = PySeedSequence(cur[0], key) if np is None else np.random.SeedSequence(cur[0], spawn_key=key)
    return cur[2]


def save_streams() -> tuple:
    """The process's ``random`` and numpy global streams as they are, for ``restore_streams``.

    Seeded items that run in the kernel (threads backend, ``rerun``) seed its own
    streams: the notebook's next ``random.random()`` would otherwise draw the
    last item's numbers.
    """
    np = sys.modules.get("numpy")
    return random.getstate(), (np.random.get_state() if np is not None else None)


def restore_streams(saved: tuple) -> None:
    """Put back the streams ``save_streams`` saved; numpy imported since gets fresh entropy."""
    state, np_state = saved
    random.setstate(state)
    np = sys.modules.get("numpy")
    if np is not None:
        if np_state is not None:
            np.random.set_state(np_state)
        else:  # imported by a seeded item: as fresh as a first import would be
            np.random.seed()


def fresh() -> None:
    """Fresh OS entropy for ``random`` and numpy's global generator (after a seeded chunk,
    and when a worker starts).

    A worker would otherwise stay on the last seeded item's streams, and an
    unseeded map after a seeded one would draw the same numbers in every session.
    A worker forked from a server that imported ``numpy.random`` (pandas does)
    would start on the server's one state: every worker drew the same numbers.
    ``numpy.random`` not yet imported is left alone: its import seeds it afresh.
    """
    random.seed()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()


def clear() -> None:
    """No seeded item runs now: ``item_seed()``/``item_rng()`` draw fresh entropy."""
    _state.current = None


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
    cur = getattr(_state, "current", None)
    if cur is None:
        return random.SystemRandom().getrandbits(64)
    return _join(_item_sequence(cur).generate_state(2))  # = generate_state(1, np.uint64)[0]


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

    cur = getattr(_state, "current", None)
    if cur is None:
        return np.random.default_rng()
    if cur[3] is None:
        ss = _item_sequence(cur)
        if isinstance(ss, PySeedSequence):  # seeded before numpy could be imported
            ss = np.random.SeedSequence(ss.entropy, spawn_key=ss.spawn_key)
        cur[3] = np.random.default_rng(ss)
    return cur[3]
