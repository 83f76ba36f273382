"""core.runchunk.run_chunk: the one reader of a map's options in a worker (every backend's)."""
from __future__ import annotations

import random

from poolmagic import NOT_DONE
from poolmagic.engine import seeds
from poolmagic.engine.core.runchunk import run_chunk
from poolmagic.engine.mapoptions import MapOptions


def fails_on_two(x):
    if x == 2:
        raise ValueError(x)
    return x * 10


def test_it_reads_star_keep_going_and_seed_from_the_options():
    r = run_chunk(lambda a, b: a + b, [(1, 2), (3, 4)], MapOptions(star=True), start=0, timed=False)
    assert r.out == [3, 7] and r.errors == []

    r = run_chunk(fails_on_two, [1, 2, 3], MapOptions(keep_going=True), start=5, timed=False)
    assert r.out == [10, NOT_DONE, 30] and [i for i, _ in r.errors] == [6]
    r = run_chunk(fails_on_two, [1, 2, 3], MapOptions(), start=5, timed=False)
    assert r.out == [10, NOT_DONE] and [i for i, _ in r.errors] == [6]

    r = run_chunk(lambda x: random.random(), [0, 0], MapOptions(seed=7), start=3, timed=False)
    want = []
    for i in (3, 4):
        seeds.seed_item(7, i)
        want.append(random.random())
    seeds.clear()
    assert r.out == want


def test_it_measures_cpu_and_wait_for_every_backend():
    r = run_chunk(lambda x: sum(range(20_000)), range(5), MapOptions(), start=0, timed=True)
    assert r.cpu_s is not None and r.cpu_s > 0
    assert r.waited_s is None or 0.0 <= r.waited_s <= r.t1 - r.t0
    assert r.times is not None and len(r.times) == 5
