"""Memory that must never kill the kernel: a per-worker limit and an always-on guard.

When N workers each take a few GB, the machine runs out and the OOM killer
picks the biggest process — often the kernel, with hours of notebook state.
The manager thread looks at its workers' resident memory every
``PERIOD_S`` while a map runs (one ``/proc/PID/statm`` read per worker, a few
µs each) and stops a worker before that happens:

* ``--max-memory SIZE``: a worker above SIZE is stopped; its item fails with
  ``WorkerMemoryError`` naming the item, its memory and the limit.
* always on: when the memory this kernel may use (its cgroup's limit in a
  container, else the machine's) has less than ``reserve()`` left, the
  largest busy worker is stopped and the reason said.

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


def _cgroup_dir() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    except OSError:
        pass
    return None


def available() -> tuple[int, int] | None:
    """(bytes this kernel may still use, its limit): the cgroup's, else the machine's."""
    total = avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    if total is None or avail is None:
        return None
    d = _cgroup_dir()
    if d is not None:
        try:
            limit = (d / "memory.max").read_text().strip()
            if limit != "max":
                used = int((d / "memory.current").read_text())
                cap = int(limit)
                if cap < total:
                    return min(avail, cap - used), cap
        except (OSError, ValueError):
            pass
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


def over_limit(busy: dict[Any, tuple[int, int | None]]) -> list[tuple[Any, int, str]]:
    """(worker, rss, why) for each busy worker to stop now.

    ``busy``: each worker running an item -> (its pid, the per-worker limit of
    the map it runs, or None). Either backend's workers: the local pool's, or
    the dask LocalCluster's that poolmagic started.
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
    room = available()
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
    return [(p, size, why)]
