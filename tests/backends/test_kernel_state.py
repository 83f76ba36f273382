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


def shows(x):
    display(f"item {x}")  # noqa: F821  (IPython's builtin in a notebook)
    return x


def test_display_a_notebook_builtin_works_in_the_items(backend, capfd, monkeypatch):
    """A loop in the notebook finds IPython's display() among the builtins; an item raised NameError."""
    import builtins

    shown = []
    monkeypatch.setattr(builtins, "display", lambda *objs, **kw: shown.extend(objs), raising=False)
    report = backend.run(shows, range(3))
    assert report.results == [0, 1, 2]
    if backend.name == "threads":  # the kernel's own display, as a loop's
        assert sorted(shown) == ["item 0", "item 1", "item 2"]
    else:
        out = capfd.readouterr().out
        assert all(f"item {x}" in out for x in range(3)), out


class _Shell:
    """Stands for the notebook's shell: get_ipython is a bound method of an object holding locks."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()

    def get(self) -> "_Shell":
        return self


def calls_shell(x):
    return get_ipython() is not None  # noqa: F821  (a global of the notebook, as the kernel puts it)


def test_get_ipython_in_the_items_is_refused_with_a_sentence_where_items_have_no_shell(backend, monkeypatch):
    """It failed on a lock ('cannot pickle _thread.lock'), naming a method and nothing useful."""
    from poolmagic import BadInputError
    from poolmagic.engine.core.transport import OWN_PROCESS

    monkeypatch.setitem(globals(), "get_ipython", _Shell().get)
    if OWN_PROCESS in backend.lacks:  # threads: the items run in the kernel, which has its shell
        assert backend.run(calls_shell, range(2)).results == [True, True]
        return
    with pytest.raises(BadInputError, match=r"calls_shell\(\) calls get_ipython\(\), the notebook's shell"):
        backend.run(calls_shell, range(2))


def test_a_filter_on_a_class_of_a_module_the_workers_lack_is_not_carried(backend):
    """Every kernel filters IPython's ProvisionalCompleterWarning: carried, its class was imported by
    each worker to read the map's options (IPython, before the first item: a warm pool's first map
    took 15 times as long). Only Python's own categories and those of numpy and pandas travel."""
    from IPython.core.completer import ProvisionalCompleterWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvisionalCompleterWarning)
        warnings.simplefilter("error", RuntimeWarning)
        report = backend.run(inverse, [1, 2])
        carried = report.replay[1].warning_filters  # the options the map ran with
        assert ProvisionalCompleterWarning not in {f[2] for f in carried}, carried
        assert ("error", RuntimeWarning) in {(f[0], f[2]) for f in carried}, carried
        with pytest.raises(RuntimeWarning):  # the builtin category's filter still travels
            backend.run(inverse, [0])


def local_hour(x):
    import time

    return time.strftime("%H %Z", time.localtime(3600 * x))


def test_the_kernels_time_zone_reaches_warm_workers(backend, monkeypatch):
    """``os.environ["TZ"] = ...; time.tzset()`` in the kernel: a warm worker got the variable but
    kept the zone it started with, so local times differed from a loop's without a word."""
    import time

    backend.map(local_hour, range(2))  # warm, in the zone the kernel started with
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    assert backend.map(local_hour, range(2)) == [local_hour(x) for x in range(2)]
    monkeypatch.setenv("TZ", "JST-9")  # (POSIX form: no tz database needed)
    time.tzset()
    try:
        loop = [local_hour(x) for x in range(3)]
        assert loop[0] == "09 JST"
        assert backend.map(local_hour, range(3), chunksize=1) == loop
    finally:
        monkeypatch.undo()
        time.tzset()
    assert backend.map(local_hour, range(2)) == [local_hour(x) for x in range(2)]


def warns_numpy(x):
    warnings.warn(f"item {x}", np.exceptions.VisibleDeprecationWarning)
    return x


def test_a_filter_on_a_numpy_warning_class_reaches_the_items(backend):
    """numpy's and pandas' categories travel by name (a remote worker without the library can
    still read the options); where the library is, the filter is in force as in a loop."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.VisibleDeprecationWarning)
        with pytest.raises(np.exceptions.VisibleDeprecationWarning):
            [warns_numpy(x) for x in range(2)]
        with pytest.raises(np.exceptions.VisibleDeprecationWarning, match=r"item \d"):
            backend.run(warns_numpy, range(2))


def test_numpys_error_callback_goes_with_its_error_handling(backend):
    """``np.seterr(all="call")`` with ``np.seterrcall(f)``: a loop called f on 1/0, a map raised
    NameError ("python callback specified ... but no function found"), on threads too."""
    seen = []

    def note(kind, flag):
        seen.append(kind)

    was = np.seterrcall(note), np.seterr(divide="call")
    try:
        loop = [inverse(x) for x in [1, 0]]
        assert seen == ["divide by zero"]
        assert backend.map(inverse, [1, 0, 2], chunksize=1) == [1.0, float("inf"), 0.5] == [*loop, 0.5]
        if backend.name == "threads":  # the kernel's own function, as in a loop
            assert seen == ["divide by zero"] * 2
    finally:
        np.seterrcall(was[0])
        np.seterr(**was[1])
