"""NOT_DONE: the placeholder for an item that produced no result.

A module of its own so that worker processes can use it without importing
the rest of poolmagic.
"""
from __future__ import annotations

from typing import Any


class _NotDone:
    """Placeholder in ``results`` for an item that did not finish."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_DONE"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self):
        return (_NotDone, ())


NOT_DONE: Any = _NotDone()
