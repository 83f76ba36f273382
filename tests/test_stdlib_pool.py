"""CPython's own Pool tests (``test._test_multiprocessing._TestPool``) against poolmagic.Pool.

The tests are imported from the running interpreter, not copied: the standard
library builds its concrete test classes by mixing ``_TestPool`` with a mixin
that sets ``Pool`` and ``TYPE``; this module does the same with
``Pool = poolmagic.Pool`` (forkserver, poolmagic's default on Linux). A test is
skipped here only when it inspects multiprocessing's private internals; each
skip says why (docs/coming-from-multiprocessing.md lists them).
"""
from __future__ import annotations

import unittest

import pytest

import poolmagic

try:
    import test.support  # noqa: F401  (absent from some distributions' Pythons)
    from test import _test_multiprocessing as stdlib_tests
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(f"this interpreter ships no 'test' package ({exc}): CPython's Pool tests cannot run here",
                allow_module_level=True)

# test name -> why it does not apply to poolmagic.Pool
SKIPPED = {
    "test_make_pool": "counts multiprocessing's private list of Process objects (pool._pool); poolmagic "
                      "starts its workers as work arrives, and keeps no such list",
}


class PoolmagicMixin:
    """What the standard library's ProcessesMixin gives _TestPool, with poolmagic's Pool."""

    TYPE = "processes"
    Pool = staticmethod(poolmagic.Pool)


def _skipping(cls: type) -> type:
    for name, why in SKIPPED.items():
        if hasattr(cls, name):
            setattr(cls, name, unittest.skip(why)(getattr(cls, name)))
    return cls


@_skipping
class TestPoolmagicPool(PoolmagicMixin, stdlib_tests._TestPool, unittest.TestCase):
    """The 25 tests of _TestPool, run on poolmagic.Pool."""


def test_the_stdlib_suite_is_all_there():
    """The count the docs quote: a new CPython adding Pool tests shows up here."""
    names = [n for n in dir(stdlib_tests._TestPool) if n.startswith("test_")]
    assert len(names) >= 25, names
    assert set(SKIPPED) <= set(names)
