"""Memory that must never kill the kernel: a per-worker limit and an always-on guard.

When N workers each take a few GB, the machine runs out and the OOM killer
picks the biggest process — often the kernel, with hours of notebook state.
The manager thread looks at its workers' resident memory every
``PERIOD_S`` while a map runs (one ``/proc/PID/statm`` read per worker, a few
µs each) and stops a worker before that happens:

* ``--max-memory SIZE``: a worker above SIZE is stopped; its item fails with
  ``WorkerMemoryError`` naming the item, its memory and the limit.
* always on: when the memory this kernel may use (its cgroup's limit in a
  container, v1 or v2, else the machine's) has less than ``reserve()``
  left, the largest busy worker is stopped and the reason said, with what
  the maps' results already hold in the kernel.

Linux only (``/proc``); elsewhere both are off and the docs say so.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

PERIOD_S = 0.1
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SUPPORTED = Path("/proc/self/statm").exists()
ROOT = "/"  # where /proc and /sys are read from (tests point it at files of their own)


def parse_size(value: Any) -> int:
    """``"500MB"``, ``"4GB"``, ``"1.5G"``, ``"2GiB"`` or a number of bytes -> bytes (units of 1024)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(value).upper())
        if not m:
            raise ValueError(value)
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(value)
    return n


def fmt_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def rss(pid: int) -> int | None:
    """Resident memory of ``pid`` in bytes (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


# cgroup v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages, 2**63 - 4096 on x86-64)
V1_UNLIMITED = 1 << 60
_cgroup_cache: dict[str, list[tuple[int, Path]]] = {}


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _unescape(field: str) -> str:
    r"""mountinfo writes a space, tab, newline or backslash in a path as octal (\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(root: Path) -> tuple[tuple[str, Path] | None, tuple[str, Path] | None]:
    """(cgroup v2 mount, cgroup v1 memory mount), each as (its root in the hierarchy, where it is mounted)."""
    v2 = v1 = None
    for line in (_text(root / "proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        hier_root, point = (_unescape(f) for f in fields[3:5])
        where = root / point.lstrip("/")
        if tail[0] == "cgroup2" and v2 is None:
            v2 = (hier_root, where)
        elif tail[0] == "cgroup" and "memory" in tail[2].split(",") and v1 is None:
            v1 = (hier_root, where)
    return v2, v1


def _inside(mount: tuple[str, Path], path: str) -> Path:
    """The directory of cgroup ``path`` under ``mount`` (whose hierarchy root may be a sub-tree)."""
    hier_root, point = mount
    base = hier_root.rstrip("/")
    if path == hier_root or path.startswith(base + "/"):
        path = path[len(base):]
    d = point / path.lstrip("/")
    return d if d.is_dir() else point  # a cgroup namespace shows "/" or a path outside the mount


def cgroup_dirs(root: str | os.PathLike = "/") -> list[tuple[int, Path]]:
    """This process's memory cgroup and its visible ancestors, innermost first, as (version, dir).

    Read from ``root``/proc/self/cgroup (``0::/path`` for v2; ``N:...memory...:/path``
    for v1) and ``root``/proc/self/mountinfo (where each hierarchy is mounted, and
    which part of it). ``root`` is "/" except in tests. [] when neither is found.
    """
    key = os.fspath(root)
    cached = _cgroup_cache.get(key)
    if cached is not None:
        return cached
    base = Path(root)
    v2_path = v1_path = None
    for line in (_text(base / "proc/self/cgroup") or "").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    v2, v1 = _mounts(base)
    if v1_path is not None:  # a controller lives in one hierarchy: v1 memory wins over a v2 without it
        version, mount, path = 1, v1 or ("/", base / "sys/fs/cgroup/memory"), v1_path
    elif v2_path is not None:
        version, mount, path = 2, v2 or ("/", base / "sys/fs/cgroup"), v2_path
    else:
        _cgroup_cache[key] = []
        return []
    d = _inside(mount, path)
    out = [(version, d)]
    while d != mount[1] and mount[1] in d.parents:
        d = d.parent
        out.append((version, d))
    _cgroup_cache[key] = out
    return out


def _stat(d: Path, name: str) -> int:
    for line in (_text(d / "memory.stat") or "").splitlines():
        k, _, v = line.partition(" ")
        if k == name:
            try:
                return int(v)
            except ValueError:
                return 0
    return 0


def _cgroup_level(version: int, d: Path) -> tuple[int, int] | None:
    """(limit, in use) of one cgroup directory; None when it sets no limit.

    In use is the working set (usage less inactive page cache, which the
    kernel reclaims before it kills anyone), as the kubelet and docker count it.
    """
    if version == 2:
        limit_f, used_f, inactive = "memory.max", "memory.current", "inactive_file"
    else:
        limit_f, used_f, inactive = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
    try:
        limit = int(_text(d / limit_f) or "max")
    except ValueError:  # "max": none
        return None
    if limit >= V1_UNLIMITED:
        return None
    try:
        used = int(_text(d / used_f) or "")
    except ValueError:
        return None
    return limit, max(0, used - _stat(d, inactive))


def cgroup_memory(root: str | os.PathLike = "/") -> tuple[int, int] | None:
    """(bytes left, limit) under the tightest memory limit of this process's cgroups, v1 or v2; None: no limit."""
    best = None
    for version, d in cgroup_dirs(root):
        level = _cgroup_level(version, d)
        if level is not None:
            limit, used = level
            if best is None or limit - used < best[0]:
                best = (limit - used, limit)
    return best


def available(root: str | os.PathLike = "/") -> tuple[int, int] | None:
    """(bytes this kernel may still use, its limit): its cgroup's (v1 or v2), else the machine's."""
    total = avail = None
    try:
        for line in (Path(root) / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    if total is None or avail is None:
        return None
    cg = cgroup_memory(root)
    if cg is not None and cg[1] < total:
        return min(avail, cg[0]), cg[1]
    return avail, total


def reserve(limit: int) -> int:
    """Memory kept free for the kernel: 10% of the limit, at most 1 GB, at least 100 MB.

    ``POOLMAGIC_MEMORY_RESERVE`` (a size) overrides it, e.g. for tests.
    """
    env = os.environ.get("POOLMAGIC_MEMORY_RESERVE")
    if env:
        try:
            return parse_size(env)
        except ValueError:
            pass
    return max(100 << 20, min(limit // 10, 1 << 30))


def over_limit(busy: dict[Any, tuple[int, int | None]], held: int = 0,
               root: str | os.PathLike | None = None) -> list[tuple[Any, int, str]]:
    """(worker, rss, why) for each busy worker to stop now.

    ``busy``: each worker running an item -> (its pid, the per-worker limit of
    the map it runs, or None). Either backend's workers: the local pool's, or
    the dask LocalCluster's that poolmagic started. ``held``: bytes of results
    the running maps have already brought into the kernel. The memory left
    (``available``) counts them, and the workers, as the OS does; ``held`` says
    which of the two filled it, since stopping a worker cannot free the kernel's.
    """
    if not busy or not SUPPORTED:
        return []
    sizes = {p: rss(pid) for p, (pid, _) in busy.items()}
    stop = []
    for p, size in sizes.items():
        limit = busy[p][1]
        if size is not None and limit is not None and size > limit:
            stop.append((p, size, f"its memory ({fmt_size(size)}) passed the --max-memory limit of {fmt_size(limit)}"))
    if stop:
        return stop
    room = available(ROOT if root is None else root)
    if room is None:
        return []
    free, total = room
    keep = reserve(total)
    if free >= keep:
        return []
    p, size = max(((p, s) for p, s in sizes.items() if s is not None), key=lambda t: t[1], default=(None, 0))
    if p is None:
        return []
    why = (
        f"memory was nearly exhausted ({fmt_size(free)} left of {fmt_size(total)}; poolmagic keeps "
        f"{fmt_size(keep)} free so that the kernel is not killed), and this worker was the largest "
        f"at {fmt_size(size)}"
    )
    if held >= 1 << 20:
        why += f"; the results the running maps brought back already hold {fmt_size(held)} in the kernel"
        if held > sum(s for s in sizes.values() if s is not None):
            why += (" (more than the workers: return smaller results, write big ones to files, "
                    "or map the items in parts)")
    return [(p, size, why)]
