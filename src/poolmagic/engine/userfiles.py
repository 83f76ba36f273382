"""Which module files are the user's own: the one rule by which a worker reports the modules it
imported (worker.py) and the kernel looks for local modules whose copies may differ (moduleedits.py).

A ``.py`` file outside the interpreter's prefixes, its standard library and site-packages, and
poolmagic itself. The folders are read on the first call (sysconfig loads then, not at start-up).
"""
from __future__ import annotations

import os
import sys

from .core.chunk import PKG_DIR

_SYSTEM_PREFIXES: tuple[str, ...] | None = None


def is_user_file(path: str) -> bool:
    """A module file the user may edit: not stdlib, not site-packages, not poolmagic."""
    global _SYSTEM_PREFIXES
    if _SYSTEM_PREFIXES is None:
        import site
        import sysconfig

        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, PKG_DIR}
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            prefixes.add(sysconfig.get_path(key))
        try:
            prefixes.update(site.getsitepackages())
            prefixes.add(site.getusersitepackages())
        except Exception:
            pass
        _SYSTEM_PREFIXES = tuple(os.path.realpath(p) for p in prefixes if p)
    if not path.endswith(".py"):
        return False
    return not os.path.realpath(path).startswith(_SYSTEM_PREFIXES)
