"""Shared fixtures and helpers: a real IPython shell with poolmagic loaded, leak
checks, polling, pid files, fresh interpreters.

Test modules import the plain helpers (``from conftest import wait_for``);
tests/e2e does too, through e2e_helpers. ``write_pid`` runs inside worker
processes: this module is pickled *by value*, like the test modules, so a
worker never imports it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

import poolmagic
from poolmagic.engine.threads import LACKS as THREADS_LACKS

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 10.0  # how long a poll waits for something that must happen (a hang takes far longer)


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


def shutdown_and_check(pool: "poolmagic.Pool", extra_pids=()) -> None:
    """Shut ``pool`` down; none of its workers (nor ``extra_pids``) may outlive it."""
    pids = set(pool.backend.worker_pids()) | set(extra_pids)
    pool.shutdown()
    left = wait_dead(pids)
    assert not left, f"worker processes outlived pool.shutdown(): {left}"
    assert pool.backend.worker_pids() == []


# ---------------------------------------------------------------- polling


def check_partial(results: list, expected: list, failed: set[int]) -> None:
    """Each result is poolmagic.NOT_DONE or correct; the failed items are poolmagic.NOT_DONE."""
    assert len(results) == len(expected)
    for i, (got, want) in enumerate(zip(results, expected)):
        if i in failed:
            assert got is poolmagic.NOT_DONE, f"item {i} failed but has a result {got!r}"
        else:
            assert got is poolmagic.NOT_DONE or got == want, f"item {i}: {got!r} != {want!r}"


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    """Start ``fn()`` on a thread of its own; the dict gets its "value" or its "error"."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (the test looks at what it was)
            outcome["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, outcome


def wait_for(pred: Callable[[], Any], timeout: float = DEADLINE, what: str | None = None,
             every: float = 0.01) -> Any:
    """Poll ``pred`` until it returns something true, or ``timeout`` s pass.

    Returns its last value (falsy on a timeout, for ``assert wait_for(...), msg``);
    with ``what``, a timeout raises TimeoutError naming ``what`` instead.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    value = pred()
    if not value and what is not None:
        raise TimeoutError(f"{what}: not within {timeout} s")
    return value


# ---------------------------------------------------------------- pid files
# A mapped function calls write_pid(piddir, x) to tell the test, through a file,
# that item x started and in which process; the test reads it with read_pid.


def write_pid(piddir: "str | Path", index: Any) -> None:
    """Write this process's pid to ``piddir/pid-<index>`` (atomically: never read half-written)."""
    tmp = os.path.join(piddir, f".pid-{index}.tmp")
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, os.path.join(piddir, f"pid-{index}"))


def read_pid(piddir: Path, index: Any, timeout: float = DEADLINE) -> int:
    """The pid the worker running item ``index`` wrote (see ``write_pid``); fails if it never did."""
    path = Path(piddir) / f"pid-{index}"
    assert wait_for(path.exists, timeout), f"item {index} never started (no {path})"
    return int(path.read_text())


def runs(folder: Path) -> dict[int, int]:
    """item -> attempts made, from marker files named ``<item>.<attempt>`` (one per call)."""
    out: dict[int, int] = {}
    for p in Path(folder).iterdir():
        x = int(p.name.split(".")[0])
        out[x] = out.get(x, 0) + 1
    return out


def written_pids(piddir: Path) -> dict[int, int]:
    """item -> pid, for every pid file written so far."""
    return {int(p.name[len("pid-"):]): int(p.read_text()) for p in Path(piddir).glob("pid-*")}


@pytest.fixture(scope="session", autouse=True)
def _private_key_home(tmp_path_factory):
    """Checkpoint keys (poolmagic.userkey) go to a directory of the session, never ~/.config;
    subprocesses and kernels the tests start inherit it."""
    home = tmp_path_factory.mktemp("xdg-config")
    home.chmod(0o700)
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(home)
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old


# ---------------------------------------------------------------- conformance: one fixture, every backend
# A suite that every backend must pass (tests/oracle, later tests/backends) takes
# the ``backend`` fixture: a warm pool of each backend in BACKENDS, with the
# capabilities that backend declares it lacks. A new backend (threads) is one
# more entry here; a test that needs a capability calls ``backend.need(...)``
# and is skipped, with the reason, where it is missing.


class BackendUnderTest:
    """A warm pool of one backend, and what that backend cannot do."""

    def __init__(self, name: str, pool: "poolmagic.Pool", lacks: dict[str, str]):
        self.name, self.pool, self.lacks = name, pool, lacks

    def need(self, *capabilities: str) -> None:
        """Skip the test unless this backend has every one of ``capabilities`` (core/transport.py ids)."""
        from poolmagic.engine.core.transport import CAPABILITIES

        for cap in capabilities:
            assert cap in CAPABILITIES, f"unknown capability {cap!r}"  # a typo would never skip
            if cap in self.lacks:
                pytest.skip(f"the {self.name} backend cannot {CAPABILITIES[cap]}: {self.lacks[cap]}")

    def __getattr__(self, name: str) -> Any:
        """The pool's own: ``backend.run(...)``, ``backend.map(...)``, ``backend.backend``."""
        if name in ("name", "pool", "lacks"):
            raise AttributeError(name)
        return getattr(self.pool, name)

    def __repr__(self) -> str:
        return f"<{self.name} backend, {self.pool.size} workers>"


def _local_pool() -> "poolmagic.Pool":
    return poolmagic.Pool(2)


def _dask_pool() -> "poolmagic.Pool":
    pytest.importorskip("distributed", reason='the dask backend needs dask.distributed: pip install "poolmagic[dask]"')
    pool = poolmagic.Pool(2, backend="dask")
    pool.backend.wait_ready(60)
    return pool


def _threads_pool() -> "poolmagic.Pool":
    pool = poolmagic.Pool(2, backend="threads")
    pool.start()
    return pool


# name -> (make a warm pool of 2 workers, {capability it lacks: why}); a backend's
# own declaration (Backend.lacks, shown by %poolsize) is what its tests skip on
BACKENDS: dict[str, tuple[Callable[[], "poolmagic.Pool"], dict[str, str]]] = {
    "local": (_local_pool, {}),
    "dask": (_dask_pool, {}),
    "threads": (_threads_pool, THREADS_LACKS),
}
# POOLMAGIC_TEST_BACKENDS=local runs the conformance suites on those backends only
# (CI runs the dask ones on one interpreter, as it does tests/test_dask.py).
if os.environ.get("POOLMAGIC_TEST_BACKENDS"):
    BACKENDS = {k: v for k, v in BACKENDS.items() if k in os.environ["POOLMAGIC_TEST_BACKENDS"].split(",")}


@pytest.fixture(scope="module")
def local_pool() -> "poolmagic.Pool":
    """A warm local pool of 2 workers, shared by a module's tests."""
    pool = _local_pool()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def dask_pool() -> "poolmagic.Pool":
    """A warm pool of 2 workers on a dask LocalCluster, shared by a module's tests."""
    pool = _dask_pool()
    yield pool
    pool.shutdown()


@pytest.fixture(params=["local", "dask"])
def pool_of_each(request) -> "poolmagic.Pool":
    """``local_pool``, then ``dask_pool``: a behaviour test of the API on both backends."""
    return request.getfixturevalue(f"{request.param}_pool")


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request) -> BackendUnderTest:
    """Each backend in turn, one warm pool per module (a real LocalCluster for dask)."""
    make, lacks = BACKENDS[request.param]
    pool = make()
    yield BackendUnderTest(request.param, pool, lacks)
    pids = pool.backend.worker_pids()
    pool.shutdown()
    assert not wait_dead(pids), f"a {request.param} worker outlived pool.shutdown()"
