"""CI's deprecation check is live: a DeprecationWarning attributed to one of
poolmagic's own modules fails the run (pyproject's ``filterwarnings``), and
one attributed to a dependency does not.

warnings attributes a warning to the module of the calling frame, from its
globals' ``__name__``; the code below runs with those globals, so nothing of
poolmagic needs importing.
"""
from __future__ import annotations

import warnings

import pytest

WARN = compile("import warnings\nwarnings.warn('something is deprecated', DeprecationWarning)", "<warn>", "exec")


def warn_as(module: str) -> None:
    exec(WARN, {"__name__": module})


@pytest.mark.parametrize("module", ["poolmagic", "poolmagic.engine.local"])
def test_a_deprecation_warning_from_poolmagic_is_an_error(module):
    with pytest.raises(DeprecationWarning, match="something is deprecated"):
        warn_as(module)


def test_a_deprecation_warning_from_a_dependency_is_not():
    with warnings.catch_warnings(record=True):  # the filters in force, recorded instead of shown
        warn_as("tornado.ioloop")  # raises if it were an error
