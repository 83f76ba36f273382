"""How many cores this process may really use.

``os.cpu_count()`` reports the host's CPUs; a container limited to 2 CPUs on a
64-core host would then get 64 workers fighting over 2 cores. The answer is
the smallest of the CPU affinity mask and the cgroup CPU quota.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        try:
            return len(os.sched_getaffinity(0))
        except OSError:
            pass
    return os.cpu_count() or 1


def _quota_from_files(root: Path) -> float | None:
    """CPU quota in cores from cgroup v2 ``cpu.max`` or v1 ``cfs_quota/period``."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_quota(root: Path = _CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores, or None when unlimited."""
    # cgroup v2: the process's own group is named in /proc/self/cgroup ("0::/path").
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = root / line[3:].lstrip("/")
                q = _quota_from_files(own)
                if q is not None:
                    return q
                break
    except OSError:
        pass
    return _quota_from_files(root)


def available_cores() -> int:
    """Cores this process may use: affinity mask, capped by the cgroup quota."""
    env = os.environ.get("POOLMAGIC_CORES")
    if env:
        return max(1, int(env))
    n = _affinity_count()
    quota = cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)
