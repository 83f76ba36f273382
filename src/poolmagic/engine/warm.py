"""The heavy modules workers get up front when the kernel uses them.

Preloaded by the forkserver (every worker, replacements too, is a fork that
already has them), imported by each worker at start under spawn. A worker
that starts without any of them has no native thread pool to limit yet.
"""
from __future__ import annotations

import sys

WARM_MODULES = ("numpy", "pandas")


def warm_modules() -> list[str]:
    """The heavy modules of WARM_MODULES this process has imported."""
    return [m for m in WARM_MODULES if m in sys.modules]
