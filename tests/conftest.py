"""Shared fixtures: a real IPython shell with poolmagic loaded, and leak checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

import poolmagic


@pytest.fixture(scope="session")
def ip():
    """One real InteractiveShell for the session, with the extension loaded."""
    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("poolmagic")
    yield shell
    shell.extension_manager.unload_extension("poolmagic")


@pytest.fixture
def pool_pids():
    """A function returning the live worker pids of the shared pool."""
    return lambda: poolmagic.get_pool().backend.worker_pids()


def descendants() -> list[psutil.Process]:
    """Every live process below this one (zombies excluded)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(params=["forkserver", "spawn"])
def start_method(request):
    """Run a test under both safe start methods."""
    return request.param


def alive(pid: int) -> bool:
    """True while ``pid`` is a running (non-zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_dead(pids, timeout: float = 5.0) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if alive(p)]
    return left


def run_script(script: "str | Path", timeout: float = 30) -> tuple[str, str, int]:
    """Run a script file (a Path) or Python source (a str) in a fresh interpreter
    and its own session; a hang fails the test, and the whole session is killed."""
    args = [str(script)] if isinstance(script, Path) else ["-c", textwrap.dedent(script)]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the script hung (at exit?)\nstdout: {out}\nstderr: {err[-2000:]}")
    return out, err, proc.returncode
