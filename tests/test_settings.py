"""The kernel's library settings reach the items on every backend (engine/core/settings.py).

A worker starts with each library's defaults: a kernel's decimal precision,
numpy print options or pandas options made a loop and a map differ without a word.
So did the interpreter's and the process's own: the recursion limit, the int
digits limit, the locale and the umask, set in the kernel after the pool was warm.
"""
from __future__ import annotations

import decimal
import locale
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from poolmagic.engine.core import settings
from poolmagic.errors import BadInputError, PoolmapError


@pytest.fixture
def kernel_settings():
    """Non-default settings in this process, put back afterwards."""
    with decimal.localcontext() as ctx, np.printoptions(precision=3), \
            pd.option_context("display.precision", 2, "display.max_columns", 3):
        ctx.prec = 50
        ctx.rounding = decimal.ROUND_DOWN
        ctx.traps[decimal.Inexact] = True
        yield


def seventh(x):
    """What each setting changes: digits of a Decimal, an array's str, a DataFrame's str."""
    try:
        d = str(decimal.Decimal(x + 1) / decimal.Decimal(7))
    except decimal.Inexact:
        d = "inexact"
    with decimal.localcontext() as c:
        c.traps[decimal.Inexact] = False
        digits = str(decimal.Decimal(x + 1) / decimal.Decimal(7))
    return d, digits, str(np.array([1 / 3, x])), str(pd.DataFrame({"a": [1.123456], "b": [x], "c": [1], "d": [2]}))


def test_defaults_are_not_carried():
    assert settings.read() is None


def test_the_kernels_settings_are_read(kernel_settings):
    got = dict(settings.read())
    assert got["decimal"][:2] == (50, decimal.ROUND_DOWN) and "Inexact" in got["decimal"][-1]
    assert got["numpy.print"] == (("precision", 3),)
    assert dict(got["pandas"]) == {"display.precision": 2, "display.max_columns": 3}


def test_items_run_under_the_kernels_settings(backend, kernel_settings):
    loop = [seventh(x) for x in range(4)]
    assert loop[0][0] == "inexact" and len(loop[0][1]) > 40  # the settings are in force here
    assert backend.map(seventh, range(4)) == loop


def test_a_map_after_the_settings_are_back_runs_on_the_defaults(backend):
    with decimal.localcontext() as ctx:
        ctx.prec = 5
        assert backend.map(seventh, range(2)) == [seventh(x) for x in range(2)]
    assert backend.map(seventh, range(2)) == [seventh(x) for x in range(2)]
    assert len(backend.map(seventh, range(1))[0][1]) > 20


def fails_on_2_at_default_precision(x):
    if x == 2 and decimal.getcontext().prec == 28:
        raise ValueError("28 digits")
    return str(decimal.Decimal(1) / decimal.Decimal(7))


def test_resume_says_when_the_settings_changed(local_pool):
    with pytest.raises(PoolmapError) as failed:
        local_pool.run(fails_on_2_at_default_precision, range(4), keep_going=True)
    first = failed.value.report
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        again = local_pool.run(fails_on_2_at_default_precision, range(4), resume=first)
    assert any("library settings" in n and "3 results" in n for n in again.notes), again.notes
    with pytest.raises(PoolmapError) as same:  # the same settings: item 2 fails again, and no note
        local_pool.run(fails_on_2_at_default_precision, range(4), resume=first, keep_going=True)
    assert not any("library settings" in n for n in same.value.report.notes), same.value.report.notes


def test_a_checkpoint_says_when_the_settings_changed(local_pool, tmp_path):
    ck = str(tmp_path / "run.ck")
    with pytest.raises(PoolmapError):
        local_pool.run(fails_on_2_at_default_precision, range(4), keep_going=True, checkpoint=ck)
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        again = local_pool.run(fails_on_2_at_default_precision, range(4), checkpoint=ck)
    assert any("library settings" in n and "3 results" in n for n in again.notes), again.notes
    ck2 = str(tmp_path / "same.ck")
    with pytest.raises(PoolmapError):
        local_pool.run(fails_on_2_at_default_precision, range(4), keep_going=True, checkpoint=ck2)
    with pytest.raises(PoolmapError) as same:  # the same settings: item 2 fails again, and no note
        local_pool.run(fails_on_2_at_default_precision, range(4), keep_going=True, checkpoint=ck2)
    assert not any("library settings" in n for n in same.value.report.notes), same.value.report.notes


def depth(n):
    return 0 if n == 0 else 1 + depth(n - 1)


def limits(x):
    """What sys.setrecursionlimit and sys.set_int_max_str_digits change: an error, or an answer."""
    try:
        deep = depth(2000 + x)
    except RecursionError:
        deep = "RecursionError"
    try:
        digits = len(str(10 ** (5000 + x)))
    except ValueError:
        digits = "ValueError"
    return deep, digits


def test_the_kernels_recursion_and_int_digit_limits_reach_the_items(backend):
    backend.map(limits, range(2))  # warm: the workers started with the defaults
    was = sys.getrecursionlimit(), sys.get_int_max_str_digits()
    sys.setrecursionlimit(10_000)
    sys.set_int_max_str_digits(0)
    try:
        loop = [limits(x) for x in range(3)]
        assert loop[0] == (2000, 5001)
        assert backend.map(limits, range(3), chunksize=1) == loop
    finally:
        sys.setrecursionlimit(was[0])
        sys.set_int_max_str_digits(was[1])
    assert backend.map(limits, range(2)) == [limits(x) for x in range(2)] == [("RecursionError", "ValueError")] * 2


@pytest.fixture(scope="module")
def grouping_locale(tmp_path_factory):
    """A locale whose numbers have a thousands separator (one installed, or one localedef builds
    under a LOCPATH, which the workers get with the environment); its name and LOCPATH."""
    was = locale.setlocale(locale.LC_ALL)
    try:
        for name in ("de_DE.UTF-8", "de_DE.utf8", "en_US.UTF-8", "en_US.utf8", "fr_FR.UTF-8"):
            try:
                locale.setlocale(locale.LC_NUMERIC, name)
                return name, None
            except locale.Error:
                pass
        folder = tmp_path_factory.mktemp("locales")
        if shutil.which("localedef") is None or subprocess.run(
                ["localedef", "-i", "de_DE", "-f", "UTF-8", str(folder / "de_DE.UTF-8")],
                capture_output=True).returncode not in (0, 1):
            pytest.skip("no locale with a thousands separator, and localedef cannot build one")
        return "de_DE.UTF-8", str(folder)
    finally:
        locale.setlocale(locale.LC_ALL, was)


def formatted(x):
    """What the locale changes: '{:n}', the order of strxfrm, the decimal point atof reads."""
    return "{:n}".format(1234567 + x), sorted(["b", "B", "a", "A"], key=locale.strxfrm), locale.localeconv()["decimal_point"]


def test_the_kernels_locale_reaches_the_items(backend, grouping_locale, monkeypatch):
    name, locpath = grouping_locale
    if locpath:
        monkeypatch.setenv("LOCPATH", locpath)
    backend.map(formatted, range(2))  # warm, in the "C" locale
    was = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_ALL, name)
        loop = [formatted(x) for x in range(3)]
        assert loop[0][0] != "1234567"  # grouped: the locale is in force here
        assert backend.map(formatted, range(3), chunksize=1) == loop
    finally:
        locale.setlocale(locale.LC_ALL, was)
    assert backend.map(formatted, range(2)) == [formatted(x) for x in range(2)]
    assert backend.map(formatted, range(1))[0][0] == "1234567"


def file_mode(folder, x):
    path = os.path.join(folder, f"item{x}")
    with open(path, "w") as f:
        f.write("x")
    mode = os.stat(path).st_mode & 0o777
    os.remove(path)
    return mode


def test_files_the_items_write_get_the_kernels_umask(backend, tmp_path):
    backend.map(file_mode, [(str(tmp_path), 0)], star=True)  # warm, with the umask the kernel started with
    was = os.umask(0o027)
    try:
        loop = [file_mode(str(tmp_path), x) for x in range(3)]
        assert loop == [0o640] * 3
        assert backend.map(file_mode, [(str(tmp_path), x) for x in range(3)], star=True, chunksize=1) == loop
    finally:
        os.umask(was)
    assert backend.map(file_mode, [(str(tmp_path), 0)], star=True) == [file_mode(str(tmp_path), 9)]


def shown(x):
    return str(np.array([1 / 3, x])), str(pd.DataFrame({"a": [1 / 3 + x]}))


def test_formatter_functions_reach_the_items(backend):
    """Options whose value is a function were left out: a kernel's float_format or numpy formatter
    printed 0.33 in a loop and 0.333333 in a map (on threads too: numpy's options are per thread)."""
    backend.map(shown, range(2))
    with np.printoptions(formatter={"float": "{:.2f}".format}), \
            pd.option_context("display.float_format", lambda v: f"<{v:.1f}>"):
        loop = [shown(x) for x in range(3)]
        assert loop[0] == ("[0.33 0.00]", "      a\n0 <0.3>")
        assert dict(settings.read())["numpy.print"][0][0] == "formatter"
        assert backend.map(shown, range(3), chunksize=1) == loop
    assert backend.map(shown, range(2)) == [shown(x) for x in range(2)]


def test_a_formatter_that_cannot_be_sent_is_refused_before_any_work(backend, tmp_path):
    with open(tmp_path / "f.txt", "w") as f:
        with pd.option_context("display.float_format", f.write):  # a method of an open file
            with pytest.raises(BadInputError, match="display.float_format.*cannot be sent"):
                backend.map(shown, range(2))
    assert backend.map(shown, range(1)) == [shown(0)]


def test_a_worker_without_numpy_or_pandas_runs_chunks_under_the_kernels_settings():
    """A remote cluster's worker may lack a library the kernel set options of: its chunks failed
    on the import before their first item, though the items did not use it."""
    from conftest import run_script

    out, err, code = run_script("""
        import sys
        sys.modules["numpy"] = sys.modules["pandas"] = None  # not installed here
        from poolmagic.engine.core.runchunk import run_chunk
        from poolmagic.engine.mapoptions import MapOptions
        options = MapOptions.from_kwargs({}).with_(
            errstate=(("divide", "raise"),),
            settings=(("numpy.print", (("precision", 3),)), ("pandas", (("display.precision", 2),)),
                      ("sys", (2000, 0))))
        run = run_chunk(lambda x: (x + 1, sys.getrecursionlimit()), [1, 2], options, start=0, timed=False,
                        own_filters=True)
        print(run.out, run.errors)
    """)
    assert code == 0, err
    assert out.strip() == "[(2, 2000), (3, 2000)] []"


def logs(x):
    import logging

    logging.getLogger("notebook.items").info("item %s", x)
    return x


def test_an_items_log_records_print_as_the_kernels_logging_says(backend, capsys):
    """``logging.basicConfig(level=logging.INFO)`` in the kernel: an item's info records printed in
    a loop and vanished in a map (a worker's root logger: WARNING, no handler)."""
    import logging

    backend.map(logs, range(2))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("REC {levelname} {message}", style="{"))
    root = logging.getLogger()
    was = root.level, list(root.handlers)
    root.handlers, _ = [handler], root.setLevel(logging.INFO)
    try:
        loop = [logs(x) for x in range(3)]
        assert capsys.readouterr().err.count("REC INFO item") == 3  # the loop's records print
        assert backend.map(logs, range(3), chunksize=1) == loop
        got = capsys.readouterr().err
        assert sorted(line for line in got.splitlines() if line.startswith("REC")) == \
            ["REC INFO item 0", "REC INFO item 1", "REC INFO item 2"], got
    finally:
        root.handlers = was[1]
        root.setLevel(was[0])
    backend.map(logs, range(2))
    assert "item" not in capsys.readouterr().err


def default_timeout(x):
    import socket

    return socket.getdefaulttimeout()


def test_the_kernels_socket_timeout_reaches_the_items(backend):
    """``socket.setdefaulttimeout(5)``: a loop's connections time out after 5 s, a map's waited for ever."""
    import socket

    backend.map(default_timeout, range(2))
    socket.setdefaulttimeout(5)
    try:
        assert [default_timeout(x) for x in range(2)] == backend.map(default_timeout, range(2), chunksize=1) == [5.0] * 2
    finally:
        socket.setdefaulttimeout(None)
    assert backend.map(default_timeout, range(2)) == [None, None]


def mp_seventh(x):
    import mpmath

    return str(mpmath.mpf(x + 1) / 7), repr(mpmath.mpf(1) / 3)


def test_mpmaths_precision_reaches_the_items(backend):
    """``mpmath.mp.dps = 50`` is decimal's case: 50 digits in a loop, 15 in a map."""
    mpmath = pytest.importorskip("mpmath")
    backend.map(mp_seventh, range(2))
    was = mpmath.mp.prec, mpmath.mp.pretty
    mpmath.mp.dps, mpmath.mp.pretty = 50, True
    try:
        loop = [mp_seventh(x) for x in range(3)]
        assert len(loop[0][0]) > 50 and loop[0][1].startswith("0.333")
        assert backend.map(mp_seventh, range(3), chunksize=1) == loop
    finally:
        mpmath.mp.prec, mpmath.mp.pretty = was
    assert backend.map(mp_seventh, range(2)) == [mp_seventh(x) for x in range(2)]


def log_gamma(x):
    import scipy.special as sc

    try:
        return float(sc.gammaln(x))
    except sc.SpecialFunctionError as e:
        return f"raised: {e}"


def test_scipy_specials_error_handling_reaches_the_items(backend):
    """``sc.seterr(all="raise")``: gammaln(0) raised in a loop and gave inf in a map, silently."""
    sc = pytest.importorskip("scipy.special")
    backend.map(log_gamma, [1])
    with sc.errstate(singular="raise"):
        loop = [log_gamma(x) for x in (0, 1)]
        assert loop[0].startswith("raised")
        assert dict(settings.read())["scipy.special"]
        assert backend.map(log_gamma, [0, 1], chunksize=1) == loop
    assert backend.map(log_gamma, [0]) == [float("inf")]


def scaled(x):
    from sklearn.preprocessing import StandardScaler

    out = StandardScaler().fit_transform(np.array([[1.0 + x], [2.0], [3.0]]))
    return type(out).__name__


def test_sklearns_configuration_reaches_the_items(backend):
    """``sklearn.set_config(transform_output="pandas")``: a loop's transformers returned DataFrames,
    a map's arrays (on threads too: sklearn keeps its configuration per thread)."""
    sklearn = pytest.importorskip("sklearn")
    backend.map(scaled, range(2))
    with sklearn.config_context(transform_output="pandas"):
        loop = [scaled(x) for x in range(3)]
        assert loop == ["DataFrame"] * 3
        assert backend.map(scaled, range(3), chunksize=1) == loop
    assert backend.map(scaled, range(2)) == ["ndarray"] * 2
