"""Library settings a loop in the kernel runs under, carried to the items.

A worker process (and a new thread, for what is kept per thread) starts with
each library's defaults. In the kernel, ``decimal.getcontext().prec = 50``
made a loop compute with 50 digits while a map computed with 28. Likewise,
``np.set_printoptions(precision=3)`` made ``str(array)`` differ, and
``pd.set_option("future.no_silent_downcasting", True)`` changed the dtypes
that pandas returns. Those differences were silent.

``read()`` runs in the kernel before each map. It returns the settings that
differ from the defaults, or None (~3 µs when nothing differs, pandas' ~2). ``applied()``
runs around a chunk, wherever the items run. Only libraries the kernel has
imported are read.

The interpreter's and the process's own (recursion limit, int digits limit,
locale, umask: core/processstate.py) travel with them.

MapOptions.settings carries them; numpy's error handling and the warning
filters have fields of their own (errstate, warning_filters).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from .processstate import NAMES as PROCESS_STATE, applied as process_applied, read as process_state

_DECIMAL_DEFAULT = (28, "ROUND_HALF_EVEN", -999999, 999999, 1, 0, ("DivisionByZero", "InvalidOperation", "Overflow"))
_SIMPLE = (str, int, float, bool, type(None))
_pandas_cache: list = [None, ()]  # [fingerprint of pandas' option values, the pairs that differ]


def _decimal() -> tuple | None:
    dec = sys.modules.get("decimal")
    if dec is None:
        return None
    c = dec.getcontext()
    traps = c.traps
    if (c.prec == 28 and c.rounding == "ROUND_HALF_EVEN" and c.Emax == 999999 and c.Emin == -999999
            and c.capitals == 1 and c.clamp == 0 and traps == _default_traps(dec)):
        return None
    return (c.prec, c.rounding, c.Emin, c.Emax, c.capitals, c.clamp,
            tuple(sorted(k.__name__ for k, on in traps.items() if on)))


def _default_traps(dec) -> dict:
    if _DECIMAL_TRAPS[0] is None:
        _DECIMAL_TRAPS[0] = {s: s.__name__ in _DECIMAL_DEFAULT[-1] for s in dict(dec.Context().traps)}
    return _DECIMAL_TRAPS[0]


_DECIMAL_TRAPS: list = [None]


def _numpy_print() -> tuple | None:
    np = sys.modules.get("numpy")
    if np is None:
        return None
    var = _numpy_var(np)
    raw = var.get() if var is not None else None  # numpy 2: a new dict for each change
    if raw is not None and raw is _numpy_last[0]:
        return _numpy_last[1]
    try:
        now = np.get_printoptions()
    except Exception:
        return None
    defaults = _NUMPY_PRINT_DEFAULT
    pairs = tuple(sorted((k, v) for k, v in now.items()
                         if k in defaults and v != defaults[k] and isinstance(v, _SIMPLE))) or None
    if raw is not None:
        _numpy_last[0:2] = [raw, pairs]
    return pairs


def _numpy_var(np) -> object | None:
    """numpy 2's ContextVar of its print options (None: numpy 1, whose dict changes in place)."""
    if _numpy_last[2] is None:
        core = getattr(np, "_core", None)
        var = getattr(getattr(core, "arrayprint", None), "format_options", None)
        _numpy_last[2] = var if hasattr(var, "get") else False
    return _numpy_last[2] or None


_numpy_last: list = [None, None, None]  # [the options dict last read, its pairs, numpy 2's ContextVar]
_NUMPY_PRINT_DEFAULT = {"edgeitems": 3, "threshold": 1000, "floatmode": "maxprec", "precision": 8,
                        "suppress": False, "linewidth": 75, "nanstr": "nan", "infstr": "inf", "sign": "-",
                        "legacy": False}


def _pandas() -> tuple | None:
    pd = sys.modules.get("pandas")
    if pd is None:
        return None
    try:
        from pandas._config import config

        values = config._global_config
        mark = tuple(tuple(v.values()) if isinstance(v, dict) else v for v in values.values())
        if mark == _pandas_cache[0]:
            return _pandas_cache[1] or None
        pairs = []
        deprecated = getattr(config, "_deprecated_options", {})
        for key, option in config._registered_options.items():
            if key in deprecated:
                continue
            *path, last = key.split(".")
            d = values
            for p in path:
                d = d[p]
            value = d[last]
            if isinstance(value, _SIMPLE) and value != option.defval and not key.startswith("display.html"):
                pairs.append((key, value))
        _pandas_cache[:] = [mark, tuple(pairs)]
        return tuple(pairs) or None
    except Exception:  # another pandas' layout: its options are not carried
        return None


def read() -> tuple | None:
    """The kernel's settings that differ from the libraries' defaults, as (library, value) pairs."""
    d, n, p, proc = _decimal(), _numpy_print(), _pandas(), process_state()
    if d is None and n is None and p is None and not proc:
        return None
    return tuple((name, value) for name, value in (("decimal", d), ("numpy.print", n), ("pandas", p))
                 if value is not None) + proc


@contextlib.contextmanager
def applied(settings: tuple | None, process_wide: bool) -> Iterator[None]:
    """Run the block under ``settings`` (from ``read``). ``process_wide``: this process runs one
    chunk at a time, so pandas' options, which are the process's, may be set for it too."""
    if not settings:
        yield
        return
    with contextlib.ExitStack() as stack:
        for name, value in settings:
            if name == "decimal":
                import decimal

                prec, rounding, emin, emax, capitals, clamp, traps = value
                ctx = decimal.Context(prec=prec, rounding=rounding, Emin=emin, Emax=emax, capitals=capitals,
                                      clamp=clamp, traps=[getattr(decimal, t) for t in traps])
                stack.enter_context(decimal.localcontext(ctx))
            elif name == "numpy.print":
                import numpy as np

                stack.enter_context(np.printoptions(**dict(value)))
            elif name == "pandas" and process_wide:
                import pandas as pd

                stack.enter_context(pd.option_context(*(x for pair in value for x in pair)))
            elif name in PROCESS_STATE and process_wide:
                stack.enter_context(process_applied(name, value))
        yield

