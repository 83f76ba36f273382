"""The kernel's library settings reach the items on every backend (engine/core/settings.py).

A worker starts with each library's defaults: a kernel's decimal precision,
numpy print options or pandas options made a loop and a map differ without a word.
"""
from __future__ import annotations

import decimal

import numpy as np
import pandas as pd
import pytest

from poolmagic.engine.core import settings
from poolmagic.errors import PoolmapError


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
