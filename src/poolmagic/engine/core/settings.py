"""Library settings a loop in the kernel runs under, carried to the items.

A worker process (and a new thread, for what is kept per thread) starts with
each library's defaults. In the kernel, ``decimal.getcontext().prec = 50``
made a loop compute with 50 digits while a map computed with 28. Likewise,
``np.set_printoptions(precision=3)`` made ``str(array)`` differ, and
``pd.set_option("future.no_silent_downcasting", True)`` changed the dtypes
that pandas returns, and ``mpmath.mp.dps = 50`` mpmath's digits. Those
differences were silent.

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
    pairs = tuple(sorted((k, pack_value(v, f"np.set_printoptions({k}=...)")) for k, v in now.items()
                         if k in defaults and v is not defaults[k] and v != defaults[k])) or None
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
                        "legacy": False, "formatter": None, "override_repr": None}


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
            if value is not option.defval and value != option.defval and not key.startswith("display.html"):
                pairs.append((key, value))
    except Exception:  # another pandas' layout: its options are not carried
        return None
    packed = tuple((key, pack_value(value, f"pd.set_option({key!r}, ...)")) for key, value in pairs)
    _pandas_cache[:] = [mark, packed]
    return packed or None


class Packed(bytes):
    """A setting's value that the options' plain pickle cannot carry, cloudpickled: a formatter
    function (``pd.options.display.float_format = "{:.2f}".format``, ``np.set_printoptions(
    formatter=...)``). Left out, ``str(df)`` and ``str(array)`` silently differed from a loop's."""

    def __repr__(self) -> str:  # short: a checkpoint records the settings' repr (checkpointing.settings_words)
        import hashlib

        return f"Packed({hashlib.sha1(self).hexdigest()[:16]})"


def pack_value(value: object, what: str) -> object:
    """``value`` as the options can carry it: as it is when simple, else cloudpickled (once per
    change of the settings: the callers cache their result)."""
    if isinstance(value, _SIMPLE):
        return value
    try:
        import cloudpickle

        packed = Packed(cloudpickle.dumps(value, protocol=5))
    except Exception as e:
        from ...errors import BadInputError

        raise BadInputError(f"{what} is set in this kernel to {value!r}, which cannot be sent to the "
                            f"workers ({type(e).__name__}: {e}): the items would run otherwise than a loop "
                            f"here; set it to a function of the notebook or a module, or reset it") from None
    _UNPACKED[packed] = value  # (a thread of this process runs with the object itself, not a copy)
    if len(_UNPACKED) > 16:
        del _UNPACKED[next(iter(_UNPACKED))]
    return packed


_UNPACKED: dict = {}  # Packed -> its value: in the kernel the original, in a worker its unpickled copy


def unpack_value(value: object) -> object:
    if type(value) is not Packed:
        return value
    got = _UNPACKED.get(value, _UNPACKED)
    if got is _UNPACKED:
        import cloudpickle

        got = _UNPACKED[value] = cloudpickle.loads(value)
        if len(_UNPACKED) > 16:
            del _UNPACKED[next(iter(_UNPACKED))]
    return got


def _mpmath() -> tuple | None:
    """mpmath's precision and printing (``mpmath.mp.dps = 50``: exactly decimal's case), when not
    its defaults (53 bits, not pretty)."""
    mpmath = sys.modules.get("mpmath")
    if mpmath is None:
        return None
    try:
        mp = mpmath.mp
        prec, pretty = mp.prec, mp.pretty
    except Exception:
        return None
    return None if prec == 53 and not pretty else (prec, pretty)


def _scipy_special() -> tuple | None:
    """scipy.special's error handling (``sc.seterr(all="raise")``: ``gammaln(0)`` raised in a loop
    and gave inf in a map, on threads too: scipy keeps it per thread), when the kernel imported
    scipy.special and it is not the default (ignore, but "raise" on memory). ~0.7 µs."""
    special = sys.modules.get("scipy.special")
    if special is None:
        return None
    try:
        state = special.geterr()
    except Exception:
        return None
    if all(v == ("raise" if k == "memory" else "ignore") for k, v in state.items()):
        return None
    return tuple(sorted(state.items()))


def _sklearn() -> tuple | None:
    """scikit-learn's configuration (``sklearn.set_config(transform_output="pandas")``: a loop's
    transformers returned DataFrames, a map's arrays, on threads too: sklearn keeps it per
    thread), as the pairs that differ from its module defaults. ~0.3 µs when sklearn is loaded."""
    config = sys.modules.get("sklearn._config")
    if config is None:
        return None
    try:
        now, defaults = config.get_config(), config._global_config
        if now == defaults:
            return None
        changed = sorted((k, v) for k, v in now.items() if k not in defaults or defaults[k] != v)
    except Exception:  # another sklearn's layout: its configuration is not carried
        return None
    return tuple((k, pack_value(v, f"sklearn.set_config({k}=...)")) for k, v in changed) or None


def read() -> tuple | None:
    """The kernel's settings that differ from the libraries' defaults, as (library, value) pairs."""
    d, n, p, m, sp, sk, proc = (_decimal(), _numpy_print(), _pandas(), _mpmath(), _scipy_special(), _sklearn(),
                                process_state())
    if d is None and n is None and p is None and m is None and sp is None and sk is None and not proc:
        return None
    return tuple((name, value) for name, value in (("decimal", d), ("numpy.print", n), ("pandas", p),
                                                   ("mpmath", m), ("scipy.special", sp), ("sklearn", sk))
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
                np = _library("numpy")
                if np is not None:
                    stack.enter_context(np.printoptions(**{k: unpack_value(v) for k, v in value}))
            elif name == "pandas" and process_wide:
                pd = _library("pandas")
                if pd is not None:
                    stack.enter_context(pd.option_context(*(x for k, v in value for x in (k, unpack_value(v)))))
            elif name == "scipy.special":
                try:
                    import scipy.special as special
                except ImportError:  # not where this worker runs: nor can the items use it
                    continue
                stack.enter_context(special.errstate(**dict(value)))
            elif name == "sklearn":  # (per thread: on threads too)
                sklearn = _library("sklearn")
                if sklearn is not None:
                    stack.enter_context(sklearn.config_context(**{k: unpack_value(v) for k, v in value}))
            elif name == "mpmath" and process_wide:  # (mpmath.mp is the process's, not per thread)
                mpmath = _library("mpmath")
                if mpmath is not None:
                    stack.enter_context(_mpmath_set(mpmath.mp, *value))
            elif name in PROCESS_STATE and process_wide:
                stack.enter_context(process_applied(name, value))
        yield


@contextlib.contextmanager
def _mpmath_set(mp: object, prec: int, pretty: bool) -> Iterator[None]:
    was = mp.prec, mp.pretty
    mp.prec, mp.pretty = prec, pretty
    try:
        yield
    finally:
        mp.prec, mp.pretty = was


def _library(name: str) -> object | None:
    """The library ``name``, or None where it is not installed (a remote cluster's worker): the
    items cannot use it there either, and a chunk failed on the import before its first item."""
    try:
        return __import__(name)
    except ImportError:
        return None
