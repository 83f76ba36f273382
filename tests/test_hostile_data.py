"""What data scientists map (numpy, pandas, random streams), against the plain loop
``[f(x) for x in items]``: each test is a difference a hostile round found.

Real pools and, for the magics, the session's real InteractiveShell (``ip``).
"""
from __future__ import annotations

import sys
import time

import cloudpickle
import numpy as np
import pandas  # noqa: F401  (imports numpy.random: the forkserver preloads it, as in a notebook)
import pytest

from poolmagic import Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _unseeded_draw(i: int) -> tuple[int, int]:
    time.sleep(0.02)  # long enough that both workers take items
    import os
    return os.getpid(), int(np.random.randint(2 ** 62))


@pytest.mark.timeout(60)
def test_workers_do_not_share_numpy_global_stream():
    """Unseeded ``np.random.*``: a loop draws one stream that never repeats; workers forked from
    a forkserver that had imported numpy all started on its one state, so each worker drew the
    same numbers (a Monte Carlo map summed the same samples twice)."""
    with Pool(2) as pool:
        out = pool.map(_unseeded_draw, range(12), chunksize=1)
    pids = {pid for pid, _ in out}
    draws = [d for _, d in out]
    assert len(pids) == 2, "both workers should have run items"
    assert len(set(draws)) == len(draws), sorted(draws)


@pytest.mark.timeout(60)
def test_seed_reaches_functions_imported_from_random_and_numpy_random(ip):
    """``from numpy.random import randint``, ``from random import randint``: methods of the global
    generators. They were pickled with a copy of the kernel's generator: --seed did not seed them
    (another run, other numbers) and every worker repeated the others' draws."""
    ip.run_cell("from numpy.random import randint as h3_nrandint\nfrom random import randint as h3_rrandint\n")
    cell = ("%%poolmap -c 1 --seed 5 range(6)\n"
            "def h3_draws(i):\n"
            "    import time\n"
            "    time.sleep(0.02)\n"
            "    return int({}(1000)), {}(0, 1000)\n")
    runs = [ip.run_cell(cell.format("h3_nrandint", "h3_rrandint")) for _ in range(2)]
    by_module = ip.run_cell(cell.format("np.random.randint", "random.randint").replace(
        "import time", "import time, random\n    import numpy as np"))
    for r in (*runs, by_module):
        assert r.error_in_exec is None, r.error_in_exec
    assert runs[0].result == runs[1].result == by_module.result
    assert len(set(runs[0].result)) == 6, runs[0].result


@pytest.mark.timeout(60)
def test_a_notebook_generator_the_function_draws_from_is_named_in_a_note(ip):
    """``rng = np.random.default_rng(0)`` in the notebook, drawn from in the function: each worker
    drew from its own copy, so the workers repeated each other's numbers where a loop draws on;
    nothing said so. np.random, random and item_rng() (fresh per worker, seeded by --seed) need no note."""
    ip.run_cell("import random\nimport numpy as np\nh3_rng = np.random.default_rng(0)\ndef h3_helper():\n    return h3_rng.random()\n")
    r = ip.run_cell("%%poolmap range(4)\ndef h3_gen(i):\n    return h3_helper()\n")
    assert r.error_in_exec is None, r.error_in_exec
    report = ip.user_ns["_poolmap"]
    assert any("the global 'h3_rng' (of h3_helper()), a numpy.random.Generator" in n and "copy" in n
               for n in report.notes), report.notes
    assert "h3_rng" in report.summary()
    r = ip.run_cell("%%poolmap --kw g=random.Random(1) range(4)\ndef h3_kw(i, g):\n    return g.random()\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert any("the --kw value 'g', a random.Random" in n for n in ip.user_ns["_poolmap"].notes)
    r = ip.run_cell("%%poolmap --seed 1 range(4)\ndef h3_fine(i):\n"
                    "    import poolmagic\n"
                    "    return np.random.rand() + random.random() + poolmagic.item_rng().random()\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert not ip.user_ns["_poolmap"].notes


@pytest.mark.timeout(60)
def test_a_dataframe_without_rows_maps_its_columns_like_the_loop():
    """Iterating a DataFrame gives its column names, whatever len() (its rows) says: one without
    rows mapped to [] (and a report of 0 items) where the loop gives a result per column."""
    import pandas as pd
    from poolmagic import pmap

    df = pd.DataFrame({"a": [], "b": []})
    assert pmap(str.upper, df) == [c.upper() for c in df] == ["A", "B"]
    with Pool(1) as pool:
        assert pool.map(str.upper, df) == ["A", "B"]
        assert pool.run(str.upper, pd.DataFrame({"a": [1], "b": [2], "c": [3]})).results == ["A", "B", "C"]
    assert pmap(str.upper, {}) == []


@pytest.mark.timeout(60)
def test_a_failed_map_over_a_dataframe_counts_its_columns_and_resumes(ip):
    """A map over a 10-row, 3-column DataFrame that failed early read "2/10 items", kept 10
    places in .results, and --resume then refused: "the ITERABLE now has 3 items"."""
    ip.run_cell("import pandas as pd\nh3_df = pd.DataFrame({'a': range(10), 'b': range(10), 'c': range(10)})\n"
                "H3_FAIL = {'a'}\n")
    cell = ("%%poolmap {}-c 1 -n 1 h3_df\n"
            "def h3_cols(c):\n"
            "    if c in H3_FAIL:\n"
            "        raise ValueError(c)\n"
            "    return c.upper()\n")
    r = ip.run_cell(cell.format(""))
    assert isinstance(r.error_in_exec, ValueError), r.error_in_exec
    report = ip.user_ns["_poolmap"]
    assert report.items == 3 and len(report.results) == 3, (report.items, report.results)
    assert "/10" not in report.summary(), report.summary()
    ip.user_ns["H3_FAIL"].clear()
    r = ip.run_cell(cell.format("--resume "))
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result == ["A", "B", "C"]


@pytest.mark.timeout(60)
def test_a_function_that_changes_its_argument_and_returns_nothing_is_named_in_a_note(ip):
    """``def norm(a): a -= a.mean()``: a loop normalises the notebook's arrays; mapped, each worker
    changed its copy, the arrays stayed as they were and the results were all None, without a word."""
    ip.run_cell("import numpy as np\nh3_arrs = [np.arange(3.0) for _ in range(3)]\n")
    r = ip.run_cell("%%poolmap h3_arrs\ndef h3_norm(a):\n    a -= a.mean()\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result == [None, None, None]
    assert all((a == np.arange(3.0)).all() for a in ip.user_ns["h3_arrs"])  # unchanged, unlike the loop
    report = ip.user_ns["_poolmap"]
    assert any("h3_norm() returns nothing and changes its argument 'a' in place" in n for n in report.notes)
    assert "changes its argument" in report.summary()
    r = ip.run_cell("%%poolmap h3_arrs\ndef h3_norm2(a):\n    a -= a.mean()\n    return a\n")
    assert r.error_in_exec is None and not ip.user_ns["_poolmap"].notes


@pytest.mark.timeout(60)
def test_seed_says_it_does_not_reach_a_generator_made_without_a_seed(ip):
    """``np.random.default_rng()`` in a --seed map: fresh entropy, so another run drew other
    numbers, while --seed promises reproducible ones; nothing said so."""
    ip.run_cell("import numpy as np\nimport poolmagic\n"
                "def h3_noise():\n    return np.random.default_rng().random()\n")
    r = ip.run_cell("%%poolmap --seed 3 range(3)\ndef h3_unseeded(i):\n    return h3_noise()\n")
    assert r.error_in_exec is None, r.error_in_exec
    notes = ip.user_ns["_poolmap"].notes
    assert any("h3_unseeded() calls default_rng() without a seed: --seed does not reach it" in n for n in notes), notes
    r = ip.run_cell("%%poolmap --seed 3 range(3)\ndef h3_seeded(i):\n"
                    "    return np.random.default_rng(poolmagic.item_seed()).random() + poolmagic.item_rng().random()\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert not ip.user_ns["_poolmap"].notes
    r = ip.run_cell("%%poolmap range(3)\ndef h3_unseeded_map(i):\n    return h3_noise()\n")
    assert r.error_in_exec is None and not ip.user_ns["_poolmap"].notes  # no --seed: fresh numbers are the loop's


@pytest.mark.timeout(60)
def test_a_generator_refilling_one_array_and_a_groupby_are_not_mapped_wrongly(ip):
    """Items are read ahead of the workers: a generator that refills one array for each item
    gave [9, 9, 9, 9, 12, 15] where the loop gives [0, 3, 6, 9, 12, 15], and a groupby's groups
    reached the workers empty ([('a', 0), ('b', 0)]): both without a word."""
    ip.run_cell("import itertools\nimport numpy as np\n"
                "def h3_refill(n=6):\n    buf = np.empty(3)\n    for i in range(n):\n        buf[:] = i\n        yield buf\n"
                "h3_rows = [('a', 1), ('a', 2), ('b', 3)]\n")
    r = ip.run_cell("%%poolmap h3_refill()\ndef h3_sum(a):\n    return float(a.sum())\n")
    assert r.error_in_exec is not None and "yielded item 1 as the very object it yielded for item 0" in str(
        r.error_in_exec) and "buf.copy()" in str(r.error_in_exec), r.error_in_exec
    r = ip.run_cell("%%poolmap itertools.groupby(h3_rows, key=lambda r: r[0])\n"
                    "def h3_group(kg):\n    k, g = kg\n    return k, len(list(g))\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert r.result == [("a", 2), ("b", 1)]


@pytest.mark.timeout(60)
def test_a_function_that_fills_a_notebook_global_is_named_in_a_note(ip):
    """``out.append(x)`` or ``memo[x] = ...`` in the function: a loop fills the notebook's list;
    mapped, each worker filled its copy and the notebook's stayed empty, without a word (a global
    assigned with ``global`` already had its note)."""
    ip.run_cell("h3_out = []\n")
    r = ip.run_cell("%%poolmap range(4)\ndef h3_fill(x):\n    h3_out.append(x)\n    return x\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert ip.user_ns["h3_out"] == []  # the loop would have [0, 1, 2, 3]
    notes = ip.user_ns["_poolmap"].notes
    assert any("h3_fill() changes the global 'h3_out' in place in the workers" in n for n in notes), notes


def _reciprocal(x: float) -> float:
    return np.float64(1.0) / x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["local", "threads"])
def test_the_kernel_s_numpy_error_handling_holds_in_the_items(backend):
    """``np.seterr(all='raise')`` (or ``with np.errstate(divide='raise')``) in the notebook: a loop
    raises FloatingPointError at 1/0; workers (and threads: numpy keeps it per thread) ran with
    numpy's default and gave inf, with a warning at most."""
    with Pool(2, backend=backend) as pool:
        with np.errstate(divide="raise"):
            with pytest.raises(FloatingPointError):
                [_reciprocal(x) for x in [1.0, 0.0]]
            with pytest.raises(FloatingPointError):
                pool.map(_reciprocal, [1.0, 0.0])
        assert pool.map(_reciprocal, [2.0])[0] == 0.5
        with np.errstate(divide="ignore"):  # back to the default: the workers follow
            assert pool.map(_reciprocal, [0.0, 1.0]) == [np.inf, 1.0]


@pytest.mark.timeout(60)
def test_an_iterator_the_function_takes_from_is_named_in_a_note(ip):
    """``counter = itertools.count()`` and ``next(counter)`` in the function: a loop numbers the
    items 0, 1, 2 ...; each worker took from its own copy, so the map gave 0, 0, 1, 1, 2, 2."""
    ip.run_cell("import itertools\nh3_counter = itertools.count()\n")
    r = ip.run_cell("%%poolmap range(4)\ndef h3_next(i):\n    return next(h3_counter)\n")
    assert r.error_in_exec is None, r.error_in_exec
    notes = ip.user_ns["_poolmap"].notes
    assert any("the global 'h3_counter', an itertools.count: each worker draws from a copy" in n
               for n in notes), notes


@pytest.mark.timeout(60)
def test_a_function_that_hashes_is_told_that_workers_hash_str_otherwise(ip):
    """``hash(word) % 8`` (feature hashing): each worker process has its own str hash seed, so the
    map's buckets differ from the loop's, without a word."""
    from poolmagic.loopnotes import _random_hash_seed

    if not _random_hash_seed():
        pytest.skip("this process started with a fixed PYTHONHASHSEED, as its workers do: they hash alike")
    ip.run_cell("def h3_bucket_of(w):\n    return hash(w) % 8\n")
    r = ip.run_cell("%%poolmap ['a', 'b']\ndef h3_bucket(w):\n    return h3_bucket_of(w)\n")
    assert r.error_in_exec is None, r.error_in_exec
    assert any("h3_bucket() calls hash()" in n for n in ip.user_ns["_poolmap"].notes)
    r = ip.run_cell("%%poolmap ['a', 'b']\ndef h3_no_hash(w):\n    return len(w)\n")
    assert not ip.user_ns["_poolmap"].notes


@pytest.mark.timeout(60)
def test_a_map_without_seed_says_the_notebooks_seed_does_not_reach_the_global_streams(ip):
    """``np.random.seed(0)`` in the notebook, then a map of a function drawing ``np.random.rand()``:
    a loop's numbers are the seeded stream's, a map's each worker's own (other in every run),
    and nothing said so."""
    ip.run_cell("import random\nimport numpy as np\nnp.random.seed(0)\n")
    r = ip.run_cell("%%poolmap range(4)\ndef h3_draws(i):\n    return np.random.rand() + random.random()\n")
    assert r.error_in_exec is None, r.error_in_exec
    notes = ip.user_ns["_poolmap"].notes
    assert any("h3_draws() draws from np.random.rand(), random.random() without --seed" in n
               and "np.random.seed() in the notebook does not reach" in n for n in notes), notes
    r = ip.run_cell("%%poolmap --seed 1 range(4)\ndef h3_seeded_draws(i):\n    return np.random.rand()\n")
    assert r.error_in_exec is None and not ip.user_ns["_poolmap"].notes
