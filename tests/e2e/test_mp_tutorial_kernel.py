"""The multiprocessing tutorial's code, unchanged but for the import, in a real Jupyter kernel.

Its functions are defined in notebook cells (they live in ``__main__``), where
``multiprocessing.Pool`` under forkserver or spawn fails with "Can't get
attribute" (anchors.md); ``from poolmagic import Pool`` runs it, and so does
``poolmagic.Executor`` with concurrent.futures' own helpers.
"""
from __future__ import annotations

import pytest

from e2e_helpers import kernel_spec_manager  # noqa: F401  (a fixture)
from e2e_helpers import evaluate, run_ok, start_kernel, stop_kernel

pytestmark = pytest.mark.timeout(120)

CELLS = [
    "from poolmagic import Pool\nfrom functools import partial\n",
    "def square(x):\n    return x * x\n\ndef power(x, n):\n    return x ** n\n",
    "p = Pool(2)\n",
    "r_map = p.map(square, range(10))\n",
    "r_async = p.map_async(square, range(10)).get()\n",
    "l1, l2 = [1, 2, 3], [4, 5, 6]\nr_star = p.starmap(power, zip(l1, l2))\n",
    "r_partial = p.map(partial(power, n=3), range(5))\n",
    "p.close()\np.join()\n",
]


@pytest.fixture
def kernel(kernel_spec_manager, tmp_path):  # noqa: F811
    km, kc = start_kernel(kernel_spec_manager, tmp_path)
    yield kc
    stop_kernel(km, kc)


def test_tutorial_code_in_a_kernel(kernel):
    for cell in CELLS:
        run_ok(kernel, cell, timeout=60)
    assert evaluate(kernel, "r_map") == [x * x for x in range(10)]
    assert evaluate(kernel, "r_async") == [x * x for x in range(10)]
    assert evaluate(kernel, "r_star") == [1, 32, 729]
    assert evaluate(kernel, "r_partial") == [x ** 3 for x in range(5)]
    # the same functions through the concurrent.futures interface
    run_ok(kernel, "from poolmagic import Executor\nfrom concurrent.futures import as_completed\n"
                   "with Executor(2) as ex:\n"
                   "    fs = [ex.submit(power, x, 2) for x in range(6)]\n"
                   "    r_futures = sorted(f.result() for f in as_completed(fs))\n"
                   "    r_exmap = list(ex.map(square, range(6)))\n", timeout=60)
    assert evaluate(kernel, "r_futures") == [x * x for x in range(6)]
    assert evaluate(kernel, "r_exmap") == [x * x for x in range(6)]
