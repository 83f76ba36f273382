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
    assert r.faults is None or r.faults >= 0
    assert r.times is not None and len(r.times) == 5


def test_the_wait_and_cpu_cover_the_items_and_nothing_around_them(monkeypatch):
    """What is read for a chunk covers t0..t1 only: a wait just before the first item or after the
    last (its thread preempted while installing print() capture, say) is no part of the items' time.
    Read around the whole call, a quarter of a tiny-item map's chunks had "waited" all their time."""
    from poolmagic.engine.core import runchunk

    ns = {"wait": 0, "cpu": 0.0, "faults": 0}
    monkeypatch.setattr(runchunk, "runqueue_wait", lambda: ns["wait"])
    monkeypatch.setattr(runchunk, "thread_faults", lambda: ns["faults"])

    def outside():  # 1 s of waiting, 1 s of CPU and 1,000 page faults outside the items
        ns["wait"] += 1_000_000_000
        ns["cpu"] += 1.0
        ns["faults"] += 1_000

    def redirect(out, err):
        outside()
        return outside

    def item(x):  # each item: 1 ns of waiting, 1 µs of CPU, a page fault
        ns["wait"] += 1
        ns["cpu"] += 1e-6
        ns["faults"] += 1
        return x

    r = run_chunk(item, range(3), MapOptions(), start=0, timed=False, redirect=redirect,
                  clock=lambda: ns["cpu"])
    assert r.out == [0, 1, 2]
    assert r.waited_s == 3e-9
    assert abs(r.cpu_s - 3e-6) < 1e-12
    assert r.faults == 3


def test_a_worker_without_numpy_reads_options_that_filter_a_numpy_warning(tmp_path):
    """Every kernel with numpy has a filter on numpy's RankWarning; pickled as a class, it made
    a remote worker without numpy fail every chunk on unpickling the map's options."""
    import pickle
    import warnings

    import numpy as np

    from conftest import run_script
    from poolmagic.engine.mapoptions import MapOptions
    from poolmagic.mapprep import _with_kernel_state

    with warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.VisibleDeprecationWarning)
        warnings.simplefilter("error", RuntimeWarning)
        options = _with_kernel_state(MapOptions.from_kwargs({}))
    (tmp_path / "options.pickle").write_bytes(pickle.dumps(options, protocol=5))
    out, err, code = run_script(f"""
        import pickle, sys, warnings
        sys.modules["numpy"] = None  # not installed here
        from poolmagic.engine.core.runchunk import run_chunk
        with open({str(tmp_path / "options.pickle")!r}, "rb") as f:
            options = pickle.load(f)
        def item(x):
            warnings.warn("careful", RuntimeWarning)
        run = run_chunk(item, [1], options, start=0, timed=False, own_filters=True)
        print(len(run.errors), "RuntimeWarning" in repr(run.errors[0]))
    """)
    assert code == 0, err
    assert out.split() == ["1", "True"], (out, err)  # the kernel's "error" on RuntimeWarning held
