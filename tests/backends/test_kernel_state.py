"""What the kernel's loop runs under, the items run under too, on every backend: its warning filters
(MapOptions.warning_filters) and numpy's error handling (MapOptions.errstate)."""
from __future__ import annotations

import sys
import warnings

import cloudpickle
import numpy as np
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def inverse(x):
    return float(np.float64(1.0) / np.float64(x))


def warn_once(x):
    warnings.warn(f"item {x}", UserWarning)
    return x


def test_a_warning_the_kernel_makes_an_error_fails_the_item_as_in_a_loop(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning):
            [inverse(x) for x in [1, 0]]  # the loop
        with pytest.raises(RuntimeWarning, match="divide by zero"):
            backend.run(inverse, [1, 0, 2], chunksize=1)
    assert backend.run(inverse, [1, 2]).results == [1.0, 0.5]  # the kernel's filters back as they were


def test_warnings_the_kernel_ignores_are_not_printed_by_the_items(backend, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = backend.run(warn_once, range(3))
    assert report.results == [0, 1, 2]
    assert "item 1" not in "".join(capfd.readouterr())


def test_a_filter_on_a_warning_class_of_the_notebook_is_left_out_not_a_broken_map(backend):
    ns = {"__name__": "__main__"}
    exec("class NotebookWarning(UserWarning):\n    pass\n", ns)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ns["NotebookWarning"])  # its class cannot be imported by a worker
        assert backend.run(inverse, [1, 2]).results == [1.0, 0.5]
