"""Classes for test_identity.py, imported by the test and by the fresh interpreters it starts
(as a notebook's class definitions run in every kernel that opens it)."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any


@dataclass
class Point:
    x: int
    label: str


@dataclass
class Other:
    x: int
    label: str


@dataclass(frozen=True, slots=True)
class Slotted:
    a: Any
    b: Any


Pair = collections.namedtuple("Pair", "left right")


class Plain:
    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: Any) -> bool:
        return type(other) is Plain and self.value == other.value
