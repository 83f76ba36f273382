"""Helpers shared by test_longrun.py, test_resume.py and test_checkpointing.py: what a
mapped function records of its calls, the functions those tests map, and their ``pool`` fixture.

Pickled *by value*, like notebook code (workers never import this module).
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from conftest import shutdown_and_check

from poolmagic import Pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def pool():
    """One warm two-worker pool for the API tests of a module; no worker may outlive it."""
    p = Pool(2).start()
    yield p
    shutdown_and_check(p)


def log_call(path: str | Path, x) -> None:
    """Runs in the worker: record one call of item ``x`` (one line, one O_APPEND write)."""
    with open(path, "a") as fh:
        fh.write(f"{x}\n")


def calls(path: str | Path) -> list[int]:
    """Every recorded call, in the order the lines were written."""
    p = Path(path)
    return [int(s) for s in p.read_text().split()] if p.exists() else []


def attempts_of(path: str | Path, x) -> int:
    """How many times item ``x`` has been called so far (read from inside the worker)."""
    try:
        with open(path) as fh:
            return sum(1 for line in fh if line.strip() == str(x))
    except FileNotFoundError:
        return 0


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def ident_value(d, path, bad):
    log_call(path, d["v"] if isinstance(d, dict) else d)
    v = d["v"] if isinstance(d, dict) else d
    if v in bad:
        raise ValueError(v)
    return v


def calls_str(path: str | Path) -> list[str]:
    p = Path(path)
    return p.read_text().split() if p.exists() else []


def ck_wait_for(x, path, gate):
    """Logs the call, then waits until the file ``gate`` exists (the test lets it go)."""
    log_call(path, x)
    while not os.path.exists(gate):
        time.sleep(0.01)
    return x
