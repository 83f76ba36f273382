"""--seed S gives item i its own numbers, the same in every run (issue 22), on every backend.

Each item returns what ``random``, numpy's global generator and the item's
own generator (``poolmagic.item_rng()``) draw: three independent streams,
equal for item i whatever the worker count, chunk size, retries, resume,
checkpoint or backend, and in ``rerun`` / ``%pooldebug`` in the kernel.
"""
from __future__ import annotations

import math
import os
import random
import sys

import cloudpickle
import numpy as np
import pytest
from conftest import run_script

import poolmagic
from poolmagic import NOT_DONE, MapFailedError, Pool
from poolmagic.engine import seeds

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(180)

N = 20


def draw(x, folder=None, bad=()):
    """Three numbers from three streams; an item in ``bad`` fails on its first attempt (a marker file)."""
    if x in bad:
        marker = os.path.join(folder, str(x))
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ConnectionError(f"item {x} fails once")
    return (random.random(), float(np.random.random()), float(poolmagic.item_rng().random()),
            poolmagic.item_seed())


def pi_piece(_x, n=200_000):
    """Points in the unit square: x from ``random``, y from numpy's global generator."""
    xs = np.array([random.random() for _ in range(n)])
    ys = np.random.random(n)
    zs = poolmagic.item_rng().random(n)
    return int(np.count_nonzero(xs * xs + ys * ys < 1)), int(np.count_nonzero(zs * zs + ys * ys < 1))


@pytest.fixture(scope="module")
def reference(local_pool):
    """Seed 7, fresh, one item per chunk: what every other run must give."""
    return local_pool.map(draw, range(N), seed=7, chunksize=1)


def test_the_three_streams_of_an_item_are_independent(reference):
    for x, (a, b, c, s) in enumerate(reference):
        assert len({a, b, c}) == 3, (x, a, b, c)
        assert isinstance(s, int) and 0 <= s < 2**64
    for k in range(3):  # and items differ from each other
        assert len({row[k] for row in reference}) == N
    assert len({row[3] for row in reference}) == N


@pytest.mark.parametrize("workers,chunksize", [(1, 1), (2, 7), (2, None), (1, 20)])
def test_same_numbers_whatever_workers_and_chunks(backend, reference, workers, chunksize):
    assert backend.map(draw, range(N), seed=7, workers=workers, chunksize=chunksize) == reference


def test_another_seed_gives_other_numbers(local_pool, reference):
    other = local_pool.map(draw, range(N), seed=8)
    assert all(o != r for o, r in zip(other, reference))


def test_keep_going_then_resume_gives_each_item_its_own_numbers(backend, reference, tmp_path):
    bad = (3, 5, 11)
    with pytest.raises(MapFailedError) as info:
        backend.run(draw, range(N), seed=7, chunksize=4, keep_going=True,
                    kwargs={"folder": str(tmp_path), "bad": bad})
    first = info.value.poolmap_report
    assert [x for x, v in enumerate(first.results) if v is NOT_DONE] == list(bad)
    again = backend.run(draw, range(N), seed=7, chunksize=4, resume=first,
                        kwargs={"folder": str(tmp_path), "bad": bad})
    assert again.results == reference  # item 5 re-run at position 1 still gets item 5's numbers


def test_retried_items_keep_their_numbers(backend, reference, tmp_path):
    r = backend.run(draw, range(N), seed=7, chunksize=6, retries=1,
                    kwargs={"folder": str(tmp_path), "bad": (0, 4, 13)})
    assert r.retried == 3 and r.results == reference


def test_checkpoint_resume_gives_each_item_its_own_numbers(local_pool, reference, tmp_path):
    path = tmp_path / "ck.pmck"
    folder = tmp_path / "m"
    folder.mkdir()
    kw = {"folder": str(folder), "bad": (2, 9)}
    with pytest.raises(MapFailedError):
        local_pool.run(draw, range(N), seed=7, keep_going=True, checkpoint=str(path), kwargs=kw)
    r = local_pool.run(draw, range(N), seed=7, keep_going=True, checkpoint=str(path), kwargs=kw)
    assert r.results == reference


def test_rerun_in_the_kernel_draws_the_workers_numbers(local_pool, reference):
    r = local_pool.run(draw, range(N), seed=7, chunksize=5)
    for i in (0, 6, 19):
        assert r.rerun(i) == reference[i]
    # and afterwards the kernel is not left on an item's stream
    assert poolmagic.item_seed() != reference[19][3]


def test_monte_carlo_pi_with_a_seed(backend):
    n = 200_000
    counts = backend.map(pi_piece, range(N), seed=7, kwargs={"n": n})
    for k in range(2):
        pi = 4 * sum(c[k] for c in counts) / (n * N)
        assert abs(pi - math.pi) < 0.01, pi


def test_item_streams_outside_a_seeded_map_are_fresh():
    seeds.clear()
    assert poolmagic.item_seed() != poolmagic.item_seed()
    assert poolmagic.item_rng().random() != poolmagic.item_rng().random()
    seeds.seed_item(7, 3)
    try:
        rng = poolmagic.item_rng()
        assert poolmagic.item_rng() is rng  # one stream per item, continued, never repeated
    finally:
        seeds.clear()


def test_without_numpy_a_worker_draws_the_same_random_numbers():
    """A numpy-less process seeds ``random`` and ``item_seed()`` with the same SeedSequence
    algorithm (written in Python): the same numbers as a process with numpy."""
    out, err, code = run_script(
        """
        import sys
        sys.modules["numpy"] = None  # import numpy fails, as where it is not installed
        import random
        from poolmagic.engine import seeds
        def pair(i):
            seeds.seed_item(7, i)
            return (random.random(), seeds.item_seed())
        print(repr([pair(i) for i in (0, 1, 2, 5, 19, 2**32 + 3)]))
        """
    )
    assert code == 0, err

    def pair(i):
        seeds.seed_item(7, i)
        try:
            return (random.random(), poolmagic.item_seed())
        finally:
            seeds.clear()

    assert eval(out) == [pair(i) for i in (0, 1, 2, 5, 19, 2**32 + 3)]


@pytest.mark.parametrize("entropy", [0, 7, 2**32 - 1, 2**32, 2**127 + 12345])
def test_the_python_seed_sequence_is_numpys(entropy):
    for key in [(), (0,), (3, 2), (2**32 + 1, 0), (2**70, 1, 5)]:
        ours = seeds.PySeedSequence(entropy, key)
        theirs = np.random.SeedSequence(entropy, spawn_key=key)
        assert ours.generate_state(8) == [int(w) for w in theirs.generate_state(8)], key
        assert ([c.generate_state(3) for c in ours.spawn(3)]
                == [[int(w) for w in c.generate_state(3)] for c in theirs.spawn(3)])


def draw2(x, y):
    return draw(x)


def test_star_and_async_maps_give_the_same_numbers(local_pool, reference):
    assert local_pool.starmap(draw2, [(x, -x) for x in range(N)], seed=7, chunksize=3) == reference
    assert local_pool.map_async(draw, range(N), seed=7, chunksize=4).get() == reference


def test_magic_seed_keep_going_then_resume(ip, tmp_path, reference):
    """The issue's cell: --seed 7 --keep-going with item 3 failing once, then --resume."""
    ip.user_ns.update(SEED_FOLDER=str(tmp_path), draw=draw)
    body = "def seed_resume_cell(x):\n    return draw(x, SEED_FOLDER, (3, 5))\n"
    ip.run_cell("%%poolmap -q -o seed_first --seed 7 --keep-going -c 2 range(20)\n" + body)
    first = ip.user_ns["_poolmap"]
    assert sorted(first.errors) == [3, 5]
    ip.run_cell_magic("poolmap", "-q -o seed_again --seed 7 --keep-going --resume -c 2 range(20)", body)
    assert ip.user_ns["seed_again"] == reference


def test_resume_with_another_seed_is_refused(local_pool, tmp_path):
    """Resuming a seed-7 run with seed 8 kept seed 7's results beside seed 8's, silently: a list
    no single seed gives (nor no seed). Refused before any work; the same seed still resumes."""
    kw = {"folder": str(tmp_path), "bad": (3,)}
    with pytest.raises(MapFailedError) as info:
        local_pool.run(draw, range(N), seed=7, keep_going=True, kwargs=kw)
    first = info.value.poolmap_report
    for other in (8, None):
        with pytest.raises(poolmagic.BadInputError, match="seed"):
            local_pool.run(draw, range(N), resume=first, kwargs=kw, **({"seed": other} if other else {}))
    assert local_pool.run(draw, range(N), seed=7, resume=first, kwargs=kw).resumed == (N - 1, 1)


def test_checkpoint_with_another_seed_is_refused(local_pool, tmp_path):
    """A checkpoint written with --seed 7 and run again with --seed 8 kept seed 7's results and
    drew the missing ones with seed 8, without a word (a changed function is at least said)."""
    path = str(tmp_path / "ck.pmck")
    folder = tmp_path / "m"
    folder.mkdir()
    kw = {"folder": str(folder), "bad": (2,)}
    with pytest.raises(MapFailedError):
        local_pool.run(draw, range(N), seed=7, keep_going=True, checkpoint=path, kwargs=kw)
    for other in (8, None):
        with pytest.raises(poolmagic.BadInputError, match="seed"):
            local_pool.run(draw, range(N), checkpoint=path, kwargs=kw, **({"seed": other} if other else {}))
    r = local_pool.run(draw, range(N), seed=7, checkpoint=path, kwargs=kw)
    assert r.resumed == (N - 1, 1) and r.results == local_pool.map(draw, range(N), seed=7)


def plain_draw(_x):
    return random.random(), float(np.random.random())


def test_an_unseeded_map_after_a_seeded_one_draws_fresh_numbers(backend):
    """A worker kept the last seeded item's streams: an unseeded map after a --seed map drew the
    same numbers in every session (repeated simulations gave identical 'random' replicates)."""
    runs = []
    for _ in range(2):
        backend.pool.map(plain_draw, range(2), seed=7, workers=1, chunksize=1)
        runs.append(backend.pool.map(plain_draw, range(3), workers=1, chunksize=1))
    assert not set(runs[0]) & set(runs[1]), runs
