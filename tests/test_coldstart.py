"""Cold start (issue 26): what ``%load_ext`` and the first map wait for.

The first map of a fresh kernel waits for the forkserver's boot, then for its
workers' first chunk. These tests pin the steps taken off that path: the
forkserver's launch does not wait for the GIL while ``%load_ext`` imports the
rest, the server preloads nothing a plain map does not use, and a fresh worker
does not look at the modules it started with (their files, their native
libraries) on its first chunk.
"""
from __future__ import annotations

import sys
import types

import pytest

from conftest import run_script
from poolmagic.engine import context as context_mod
from poolmagic.engine import processes
from poolmagic.engine import protocol as P
from poolmagic.engine import worker as worker_mod
from poolmagic.engine.context import ContextApplier
from poolmagic.engine.worker import Worker

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkserver and /proc")


def _context(threads: int | None) -> P.SetContext:
    import os

    return P.SetContext("k", os.getcwd(), dict(os.environ), list(sys.path), threads)


# ================================================================ a fresh worker's first chunk


def test_a_fresh_worker_looks_only_at_modules_imported_after_it_started(monkeypatch, tmp_path):
    """Its first reply once resolved the file of every module it started with (~6 ms)."""
    looked: list[str] = []
    real = worker_mod._is_user_file
    monkeypatch.setattr(worker_mod, "_is_user_file", lambda path: looked.append(path) or real(path))
    w = Worker(None, 0)
    w._started_with(sys.modules)
    assert w._new_modules() is None and looked == []
    (tmp_path / "coldstart_user_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "coldstart_user_mod", raising=False)
    import coldstart_user_mod  # noqa: F401

    found = w._new_modules()
    assert list(found) == ["coldstart_user_mod"] and len(looked) == 1, (found, looked)


def _spy_limits(monkeypatch) -> list:
    pytest.importorskip("threadpoolctl")
    import threadpoolctl

    calls: list = []
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda limits: calls.append(limits))
    return calls


def test_no_thread_pool_walk_until_modules_are_imported(monkeypatch):
    """A worker that started without numpy has no BLAS to limit: threadpoolctl's walk
    of the shared libraries (~1.5 ms of its first chunk) waits for an import."""
    calls = _spy_limits(monkeypatch)
    applier = ContextApplier()
    applier.no_thread_pools_yet()
    applier.apply(_context(1))
    applier.limit_threads_if_new_libraries()
    applier.apply(_context(2))  # a new limit: still nothing loaded to limit
    applier.limit_threads_if_new_libraries()
    assert calls == []
    monkeypatch.setitem(sys.modules, "coldstart_fake_blas", types.ModuleType("coldstart_fake_blas"))
    applier.limit_threads_if_new_libraries()
    assert calls == [2]


def test_a_worker_that_starts_with_numpy_limits_its_threads_on_the_first_chunk(monkeypatch):
    calls = _spy_limits(monkeypatch)
    monkeypatch.setitem(sys.modules, "numpy", sys.modules.get("numpy") or types.ModuleType("numpy"))
    w = Worker(None, 0)
    w._started_with(sys.modules)
    w.applier.apply(_context(1))
    w.applier.limit_threads_if_new_libraries()
    assert calls == [1]


# ================================================================ the forkserver's boot


def test_the_forkserver_preloads_threadpoolctl_only_with_numpy_or_pandas(monkeypatch):
    for name in ("numpy", "pandas"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert processes.forkserver_preload() == [processes.WORKER_MODULE, processes.SERVER_HOOKS]
    monkeypatch.setitem(sys.modules, "numpy", types.ModuleType("numpy"))
    assert processes.forkserver_preload() == [processes.WORKER_MODULE, processes.SERVER_HOOKS,
                                              "threadpoolctl", "numpy"]


def test_the_worker_module_does_not_load_openssl():
    """hashlib (``_hashlib`` loads OpenSSL, ~3 ms) is the kernel's, for context keys."""
    out, err, code = run_script("""
        import sys
        import poolmagic.engine.worker
        print("LOADED", "_hashlib" in sys.modules, "hashlib" in sys.modules)
    """)
    assert code == 0, err
    assert "LOADED False False" in out, out
    assert len(context_mod.make_context(1).key) == 20  # and the kernel still hashes its contexts


@linux_only
def test_prestart_launches_the_forkserver_with_a_short_switch_interval_then_restores_it():
    """The forkserver's boot is the longest step of a cold start: prestart()'s thread
    launches it while %load_ext goes on importing, and used to wait up to 5 ms (the
    GIL's switch interval) each time it needed the GIL back. Until it has launched the
    server, the interval is short; then it is what it was."""
    out, err, code = run_script("""
        import sys, time
        from multiprocessing import forkserver
        from poolmagic.engine import processes
        sys.setswitchinterval(0.004)
        usual = sys.getswitchinterval()
        with forkserver._forkserver._lock:  # the launch waits for this lock: no clock in this test
            processes.prestart("forkserver")
            print("DURING", abs(sys.getswitchinterval() - processes.PRESTART_SWITCH_S) < 1e-6, flush=True)
        deadline = time.monotonic() + 20
        while sys.getswitchinterval() != usual and time.monotonic() < deadline:
            time.sleep(0.005)
        print("AFTER", sys.getswitchinterval() == usual, forkserver._forkserver._forkserver_pid is not None, flush=True)
        processes.stop_helper_processes(tracker=True)
    """)
    assert code == 0, err[-2000:]
    assert "DURING True" in out and "AFTER True True" in out, out


def test_prestart_puts_the_switch_interval_back_when_its_thread_cannot_start(monkeypatch):
    import threading

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    usual = sys.getswitchinterval()
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError):
        processes.prestart("forkserver")
    assert sys.getswitchinterval() == usual
