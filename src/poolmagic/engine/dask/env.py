"""A remote cluster's workers against the kernel: packages, environment variables, paths.

Workers of a cluster someone else started share neither the kernel's disk nor
its environment. Before a function's first map there, ``check_packages`` asks
every worker (one ``Client.run`` of ``probe``) whether it can import each
installed package the function uses, and at which version:

* a package a worker cannot import, or numpy/pandas of another major version
  (their pickles do not load across it), is an error before any work, naming
  the package, the worker and both versions;
* any other difference of version is a note (``%poolsize`` and the summary).

``overlay`` is what follows a map to a remote worker from the kernel's
environment: the variables the user set or changed since the kernel started
(``%env``, ``os.environ``), not the whole environment, nor the working
directory, ``sys.path`` or native-thread limits (those describe this machine).
``relative_paths`` finds items that name files relative to the kernel's
working directory, which the workers would not find.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import os
import sys
from typing import Any, Iterable

from ...errors import BadInputError
from .. import protocol as P
from ..context import EnvOverlay

#: packages whose pickles do not load across a major version
BREAKS_ACROSS_MAJOR = ("numpy", "pandas", "pyarrow", "scipy", "sklearn")
#: variables the kernel itself sets at start-up, not the user: never sent
_KERNEL_SET = frozenset({"MPLBACKEND", "TERM", "CLICOLOR", "FORCE_COLOR", "PAGER", "GIT_PAGER",
                         "PYDEVD_USE_FRAME_EVAL", "PYDEVD_IPYTHON_COMPATIBLE_DEBUGGING"})
PATHS_CHECKED = 100  # items looked at for relative paths (a sequence's first ones)


# ------------------------------------------------------------------ on the workers
def probe(packages: dict[str, str | None]) -> dict:
    """On a worker: Python's version and, per import name, (importable, version)."""
    found: dict[str, tuple[bool, str | None]] = {}
    for top, dist in packages.items():
        try:  # the worker imports it to run the function anyway: a broken install shows here
            importlib.import_module(top)
            ok = True
        except Exception:
            ok = False
        version = None
        if ok:
            try:
                version = importlib.metadata.version(dist or top)
            except Exception:
                version = getattr(sys.modules.get(top), "__version__", None)
        found[top] = (ok, version)
    return {"python": "%d.%d.%d" % sys.version_info[:3], "packages": found}


# ------------------------------------------------------------------ in the kernel
@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    try:
        return dict(importlib.metadata.packages_distributions())
    except Exception:
        return {}


def kernel_versions(tops: Iterable[str]) -> dict[str, tuple[str | None, str | None]]:
    """Import name -> (distribution, version) in the kernel."""
    out = {}
    for top in tops:
        dist = (_distributions().get(top) or [None])[0]
        version = None
        try:
            version = importlib.metadata.version(dist or top)
        except Exception:
            version = getattr(sys.modules.get(top), "__version__", None)
        out[top] = (dist, version)
    return out


def _major(version: str | None) -> str | None:
    return None if version is None else version.split(".")[0]


def compare(here: dict[str, tuple[str | None, str | None]], there: dict[str, dict]) -> list[str]:
    """Notes for harmless differences; raises BadInputError for one that breaks the map."""
    notes: list[str] = []
    for address, info in sorted(there.items()):
        if not isinstance(info, dict):
            continue
        for top, (ok, theirs) in sorted((info.get("packages") or {}).items()):
            dist, ours = here.get(top, (None, None))
            name = dist or top
            if not ok:
                raise BadInputError(
                    f"the function uses {name}, which the dask worker {address} cannot import: install "
                    f"{name}{'==' + ours if ours else ''} in the workers' environment"
                )
            if ours is None or theirs is None or ours == theirs:
                continue
            if top in BREAKS_ACROSS_MAJOR and _major(ours) != _major(theirs):
                raise BadInputError(
                    f"the dask worker {address} has {name} {theirs} and this kernel {ours}: their pickles do "
                    f"not load across major versions; install {name}=={ours} on the workers"
                )
            notes.append(f"{name} {theirs} on the workers, {ours} here")
    return sorted(set(notes))


@functools.lru_cache(maxsize=1)
def initial_environ() -> dict[str, str]:
    """The environment this process started with (Linux: /proc/self/environ)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(_AT_IMPORT)
    out = {}
    for entry in raw.split(b"\0"):
        k, sep, v = entry.partition(b"=")
        if sep:
            out[os.fsdecode(k)] = os.fsdecode(v)
    return out


_AT_IMPORT = dict(os.environ)  # elsewhere: the environment when poolmagic's dask backend loaded


def overlay_for(context: P.SetContext) -> EnvOverlay:
    """``overlay`` of a map's context, computed once per context version."""
    got = _OVERLAYS.get(context.key)
    if got is None:
        if len(_OVERLAYS) > 16:
            _OVERLAYS.clear()
        got = _OVERLAYS[context.key] = overlay(context.env)
    return got


_OVERLAYS: dict[str, EnvOverlay] = {}


def overlay(env: dict[str, str]) -> EnvOverlay:
    """What a remote worker applies: variables set or changed since start; None: unset."""
    start = initial_environ()
    changed: dict[str, str | None] = {
        k: v for k, v in env.items() if start.get(k) != v and k not in _KERNEL_SET and not k.startswith("JPY_")
    }
    changed.update({k: None for k in start if k not in env and k not in _KERNEL_SET})
    key = hashlib.sha1(repr(sorted(changed.items(), key=lambda kv: kv[0])).encode("utf-8", "surrogateescape"))
    return EnvOverlay("env-" + key.hexdigest()[:16], changed)


def relative_paths(items: Any, cwd: str, star: bool = False) -> None:
    """Refuse items that name files relative to the kernel's folder (the first PATHS_CHECKED of a sequence)."""
    if not isinstance(items, (list, tuple)):
        return
    for i, item in enumerate(items[:PATHS_CHECKED]):
        for value in (item if star and isinstance(item, tuple) else (item,)):
            if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
                path = os.fspath(value)
                if path and not os.path.isabs(path) and len(path) < 4096 and os.path.exists(os.path.join(cwd, path)):
                    raise BadInputError(
                        f"item {i} ({path!r}) is a path relative to this kernel's folder ({cwd}); the remote "
                        f"workers do not share it. Give paths they can open (absolute, on a file system the "
                        f"workers mount), or read the files here and map their contents"
                    )


WORKER_WAIT_S = 10.0  # how long a map's package check waits for a cluster's first worker


def _workers(client: Any) -> tuple[str, ...]:
    try:
        return tuple(sorted(client.scheduler_info(n_workers=-1)["workers"]))
    except Exception:
        return ()


class RemoteEnvironment:
    """What a remote cluster's workers need from this kernel, checked and sent per function.

    Held by the dask backend when the cluster is not its own; the kernel's
    thread calls ``prepare`` before each map, the backend ``close`` at shutdown.
    """

    #: what %poolsize says follows a map to this cluster, and what does not
    FOLLOWS = ("follows each map: the function, what it uses from the notebook, local modules (sent by value), "
               "environment variables you set (%env, os.environ); not the working directory (relative paths in "
               "items are refused), sys.path or native-thread limits")

    def __init__(self) -> None:
        from ...localmodules import ByValue

        self.by_value = ByValue()  # the local modules this kernel sends by value
        self._checked: dict[tuple, list[str]] = {}  # (packages, workers) -> notes
        self.notes: set[str] = set()  # every harmless difference seen, for %poolsize

    def prepare(self, client: Any, func: Any, items: Any, star: bool) -> tuple[Any, list[str]]:
        """Before a map: refuse what cannot work there, and pack local modules with ``func``.

        Returns what to pickle in place of ``func``, and the notes to show.
        """
        from ...localmodules import check_size, modules_used

        sample = items[:1] if isinstance(items, (list, tuple)) else ()
        use = modules_used(func, sample)
        relative_paths(items, os.getcwd(), star)
        notes = self.check_packages(client, use.installed)
        if not use.local:
            return func, notes
        check_size(use.local)
        func, more = self.by_value.pack(func, use.local, use.imported, "fails on the workers")
        return func, notes + more

    def check_packages(self, client: Any, tops: Iterable[str], wait: bool = True) -> list[str]:
        """Compare the installed packages ``tops`` (import names) between here and every worker.

        ``wait``: a cluster with no worker yet is given WORKER_WAIT_S to get one (a map's
        check); without it (on connecting) the check waits for the first map.
        """
        stdlib = getattr(sys, "stdlib_module_names", frozenset())
        tops = tuple(sorted({t for t in tops if t not in stdlib and t not in sys.builtin_module_names}))
        if not tops or client is None:
            return []
        workers = _workers(client)
        if not workers and not wait:
            return []
        if not workers:  # a cluster still starting its workers: wait a little for one to ask
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except Exception:
                return [f"the packages the function uses were not compared with the workers': the cluster had "
                        f"no worker when the map started"]
            workers = _workers(client)
        key = (tops, workers)
        if key not in self._checked:
            here = kernel_versions(tops)
            there = client.run(probe, {t: here[t][0] for t in tops}, workers=list(workers))
            self._checked[key] = compare(here, there)
            self.notes.update(self._checked[key])
        return self._checked[key]

    def describe(self) -> str:
        """%poolsize's lines about this cluster's environment."""
        lines = [self.FOLLOWS]
        if self.by_value.registered:
            lines.append("local modules sent by value: " + ", ".join(sorted(self.by_value.registered)))
        if self.notes:
            lines.append("versions that differ (harmless): " + "; ".join(sorted(self.notes)))
        return "\n".join(lines)

    def close(self) -> None:
        self.by_value.close()
