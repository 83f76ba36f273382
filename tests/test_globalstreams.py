"""Which global random streams a function draws from (globalstreams.py), for the note a map
without --seed gives: a worker's stream is its own, which the notebook's random.seed() does not reach."""
from __future__ import annotations

import random
from random import choice

import numpy as np

from poolmagic.globalstreams import global_draws

rng = np.random.default_rng(0)


def np_draw(x):
    return np.random.random() + x


def imports_its_own(x):
    import random
    import numpy as np

    return random.random(), np.random.normal()


def through_a_helper(x):
    return np_draw(x) * 2


def bound_method(x):
    return choice([1, 2])


def from_imports(x):
    from numpy.random import default_rng, rand
    from random import Random, shuffle

    return rand(), default_rng(0).random(), Random(1).random(), shuffle


def module_alias(x):
    import numpy.random as npr

    return npr.uniform()


def own_generators(x):
    return rng.random(), random.Random(3).random(), np.random.default_rng(x).random()


def seeds_each_item(x):
    np.random.seed(x)
    random.seed(x)
    return np.random.random(), random.random()


def test_draws_from_the_global_streams_are_named():
    assert global_draws(np_draw) == ("np.random.random",)
    assert global_draws(imports_its_own) == ("random.random", "np.random.normal")
    assert global_draws(through_a_helper) == ("np.random.random",)
    assert global_draws(bound_method) == ("random.choice",)
    assert global_draws(from_imports) == ("np.random.rand", "random.shuffle")
    assert global_draws(module_alias) == ("np.random.uniform",)


def test_own_generators_and_items_that_seed_the_stream_are_not_draws():
    assert global_draws(own_generators) == ()
    assert global_draws(seeds_each_item) == ()
    assert global_draws(len) == ()


def test_a_threads_map_without_seed_says_items_get_the_kernels_numbers_in_another_order():
    """On threads the items draw from the kernel's own stream, in the order the threads run: the
    same numbers as a loop after np.random.seed(0), given to other items, without a word."""
    import poolmagic

    pool = poolmagic.Pool(2, backend="threads")
    try:
        report = pool.run(np_draw, range(4))
        assert any("np_draw() draws from np.random.random() without --seed: the threads draw from the "
                   "notebook's stream in the order they run" in n for n in report.notes), report.notes
        assert not pool.run(np_draw, range(4), seed=1).notes
    finally:
        pool.shutdown()
