"""A map's process context: what a worker must look like while it runs a map.

Every map runs with the kernel's working directory, environment and sys.path
as they were when the map started (``MapContext``, made in the caller's
thread), and with native thread pools (BLAS, OpenMP) limited so that N
workers do not each start one thread per core.

In the worker, ``ContextApplier`` applies a context before every chunk,
cheaply (a few comparisons when nothing changed), so whatever an item changed
(``os.chdir``, ``os.environ``, ``sys.path``) is undone before the next one.
``ProcessState`` covers what cannot be undone cheaply: signal handlers,
resource limits, a pending timer, threads left running. When an item changes
one of those, the worker is recycled after its chunk.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, NamedTuple

from . import protocol as P

# The variables native libraries read when they load (later imports obey them).
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


class EnvOverlay(NamedTuple):
    """A remote worker's context: only the variables the user set (None: unset them).

    Not a message of the local workers' wire: it travels to dask workers in a task.
    """

    key: str  #: hash of ``env``
    env: dict  #: name -> value, or None to unset


def make_context(threads: int | None) -> P.SetContext:
    """The caller's process context now: cwd, environment, sys.path, thread limit."""
    import hashlib  # here: the worker module imports this one, and _hashlib loads OpenSSL (~3 ms of every cold start)

    cwd = os.getcwd()
    env = dict(os.environ)
    path = list(sys.path)
    h = hashlib.sha1(repr((cwd, sorted(env.items()), path, threads)).encode("utf-8", "surrogateescape"))
    return P.SetContext(h.hexdigest()[:20], cwd, env, path, threads)


class ContextCache:
    """Builds a context only when the caller's state changed since the last map.

    ``dict(os.environ)`` and hashing it cost tens of µs; comparing the raw
    environment, the cwd and sys.path with the last ones costs about one.
    """

    def __init__(self) -> None:
        self._last: P.SetContext | None = None
        self._probe: Any = None

    def get(self, threads: int | None) -> P.SetContext:
        raw = getattr(os.environ, "_data", None)
        probe = (os.getcwd(), dict(raw) if raw is not None else dict(os.environ), list(sys.path), threads)
        if self._last is None or probe != self._probe:
            self._probe = probe
            self._last = make_context(threads)
        return self._last


class ContextApplier:
    """Applies SetContext messages in a worker; a no-op when nothing changed."""

    def __init__(self) -> None:
        self._env_key: str | None = None
        self._env_raw: dict | None = None  # os.environ._data as the context wants it
        self._threads: int | None = None
        self._limited_at = -1  # len(sys.modules) when thread pools were last limited
        self._bare_at = -1  # len(sys.modules) while no native thread pool is loaded (no_thread_pools_yet)
        self._base_env: dict | None = None  # a remote worker's own environment, before any overlay

    def apply(self, ctx: P.SetContext | EnvOverlay) -> None:
        if type(ctx) is EnvOverlay:  # a remote worker: its own folder, paths and threads
            self._apply_env(self._overlaid(ctx))
            return
        try:
            here = os.getcwd()
        except OSError:  # the directory was removed under us
            here = None
        if here != ctx.cwd:
            os.chdir(ctx.cwd)
        if sys.path != ctx.sys_path:
            sys.path[:] = ctx.sys_path
        self._apply_env(ctx)
        if ctx.threads != self._threads:
            self._threads = ctx.threads
            self._limited_at = -1

    def _overlaid(self, ctx: EnvOverlay) -> P.SetContext:
        """The whole environment an overlay asks for: the worker's own (as first seen), changed."""
        if self._base_env is None:
            self._base_env = dict(os.environ)
        want = dict(self._base_env)
        for k, v in ctx.env.items():
            if v is None:
                want.pop(k, None)
            else:
                want[k] = v
        return P.SetContext(ctx.key, "", want, [], None)

    def _apply_env(self, ctx: P.SetContext) -> None:
        if self._env_key != ctx.key:
            want = dict(ctx.env)
            if ctx.threads is not None:
                for var in THREAD_VARS:
                    want[var] = str(ctx.threads)
            self._env_key = ctx.key
            self._env_want = want
            raw = getattr(os.environ, "_data", None)
            self._env_raw = None
            if raw is not None:
                self._env_raw = {os.fsencode(k): os.fsencode(v) for k, v in want.items()}
        raw = getattr(os.environ, "_data", None)
        if raw is not None and self._env_raw is not None:
            if raw == self._env_raw:
                return
        elif dict(os.environ) == self._env_want:
            return
        want = self._env_want
        tz = os.environ.get("TZ")
        for k in [k for k in os.environ if k not in want]:
            del os.environ[k]
        for k, v in want.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
        if want.get("TZ") != tz:  # the C library reads TZ again only when told (time.tzset in the kernel)
            _tzset()

    def no_thread_pools_yet(self) -> None:
        """This process has loaded no native thread pool (BLAS, OpenMP) so far.

        A fresh worker whose start imported no numpy-like module: nothing to
        limit until modules are imported (whatever the thread limit becomes).
        """
        self._bare_at = len(sys.modules)

    def limit_threads_if_new_libraries(self) -> None:
        """Limit native thread pools; again only when modules were imported since.

        threadpoolctl walks the loaded shared libraries (~0.1–1 ms), so it runs
        only when the set of modules grew (a new library may have come with
        them). Libraries loaded later still read the THREAD_VARS set above.
        """
        n = len(sys.modules)
        if self._threads is None or n == self._limited_at or n == self._bare_at:
            return
        self._limited_at = len(sys.modules)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=self._threads)
        except Exception:  # threadpoolctl missing or a library it cannot drive
            pass


def _tzset() -> None:
    """The kernel's TZ in force: a warm worker kept the zone it started with, so after
    ``os.environ["TZ"] = "Asia/Tokyo"; time.tzset()`` a loop's ``time.localtime()`` and
    ``datetime.now()`` were Tokyo's and a map's were not."""
    import time

    if hasattr(time, "tzset"):
        time.tzset()


_SIGNALS = tuple(
    getattr(signal, n)
    for n in ("SIGTERM", "SIGHUP", "SIGALRM", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGPIPE", "SIGINT", "SIGQUIT")
    if hasattr(signal, n)
)
_LIMITS: tuple = ()
try:
    import resource

    _LIMITS = tuple(
        getattr(resource, n)
        for n in ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_NOFILE", "RLIMIT_CPU", "RLIMIT_STACK", "RLIMIT_NPROC", "RLIMIT_FSIZE")
        if hasattr(resource, n)
    )
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


_touched: list[str] = []  # what the function called that may change the process (set by watch_calls)


def watch_calls() -> None:
    """Note calls that change signal handlers, resource limits or timers (in a worker).

    Comparing them all after every chunk costs ~25 µs; a flag set by these
    functions costs nothing until one is called. A C extension changing them
    directly is not seen (documented limit).
    """
    def wrap(mod: Any, name: str) -> None:
        original = getattr(mod, name, None)
        if original is None or getattr(original, "_poolmagic", False):
            return

        def watched(*args: Any, **kwargs: Any) -> Any:
            _touched.append(name)
            return original(*args, **kwargs)

        watched._poolmagic = True  # type: ignore[attr-defined]
        setattr(mod, name, watched)

    for name in ("signal", "setitimer", "alarm", "siginterrupt"):
        wrap(signal, name)
    if resource is not None:
        for name in ("setrlimit", "prlimit"):
            wrap(resource, name)


class ProcessState:
    """Signal handlers, resource limits, timer and thread count of this process."""

    def __init__(self, handlers: tuple, limits: tuple, threads: int):
        self.handlers, self.limits, self.threads = handlers, limits, threads

    @classmethod
    def read(cls) -> "ProcessState":
        handlers = tuple(signal.getsignal(s) for s in _SIGNALS)
        limits = tuple(resource.getrlimit(r) for r in _LIMITS) if resource is not None else ()
        return cls(handlers, limits, threading.active_count())

    def changed(self) -> str | None:
        """Why this process no longer matches the state read at start, or None."""
        if threading.active_count() != self.threads:
            return "a thread the function started is still running"
        if not _touched:
            return None
        _touched.clear()
        for s, h in zip(_SIGNALS, self.handlers):
            if signal.getsignal(s) != h:
                return f"the function changed the handler of {signal.Signals(s).name}"
        if resource is not None:
            for r, lim in zip(_LIMITS, self.limits):
                if resource.getrlimit(r) != lim:
                    return "the function changed a resource limit"
        if hasattr(signal, "getitimer") and signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
            return "the function left a timer (signal.alarm/setitimer) pending"
        return None
