"""MapOptions: every option of one map, typed and validated once.

Built from API keywords (``pool.map(f, xs, timeout=5)``) or from the magic
line (``%%poolmap --timeout 5``), carried whole by the Job to the backend and
to the worker. Each field declares its own command-line spelling and help, so
the magic's parser, ``%%poolmap?`` and the README's table all come from here.

Adding an option: a field here (with ``opt(...)``), a check in ``_check`` if
its type alone does not say enough, and the code that uses it.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import BadInputError


def opt(default: Any, *names: str, help: str, metavar: str = "", kind: str = "") -> Any:
    """A MapOptions field with its command-line names (none: API only)."""
    return field(default=default, metadata={"names": names, "help": help, "metavar": metavar, "kind": kind})


@dataclass(frozen=True)
class MapOptions:
    star: bool = opt(False, "--star", help="starmap: each item is a tuple of arguments")
    chunksize: int | None = opt(None, "-c", "--chunksize", metavar="N",
                                help="items per chunk (default: adaptive, from measured item time)")
    workers: int | None = opt(None, "-n", "--workers", metavar="N", help="use N workers for this cell only")
    timeout: float | None = opt(None, "--timeout", metavar="SECONDS",
                                help="fail an item that runs longer than SECONDS (its worker is replaced)")
    keep_going: bool = opt(False, "--keep-going",
                           help="run every item; raise one error summarising all failures at the end")
    kwargs: dict | None = opt(None, "--kw", metavar="NAME=EXPR", kind="kw",
                              help="constant keyword argument, evaluated in the notebook (repeatable)")
    repeat: int | None = opt(None, "--repeat", metavar="N",
                             help="call a zero-argument function N times (no ITERABLE)")
    seed: int | None = opt(None, "--seed", metavar="S",
                           help="seed random and numpy per item: reproducible, independent streams")
    threads: int | None = opt(None, "--threads", metavar="N",
                              help="native threads (BLAS, OpenMP) per worker (default: cores ÷ workers)")
    max_memory: int | None = opt(None, "--max-memory", metavar="SIZE", kind="size",
                                 help="stop a worker whose memory passes SIZE (500MB, 4GB); its item fails")
    checkpoint: str | None = opt(None, "--checkpoint", metavar="PATH", kind="text",
                                 help="append each result to the file PATH as it arrives; the same map with the "
                                      "same PATH in a new kernel runs only what is missing")
    retries: int | None = opt(None, "--retries", metavar="N",
                              help="run an item that raised, crashed or timed out up to N more times")
    retry_on: tuple | None = opt(None, "--retry-on", metavar="EXC[,EXC]", kind="exceptions",
                                 help="with --retries N: retry only these exception types (e.g. ConnectionError)")
    errstate: tuple | None = opt(None, help="numpy's floating-point error handling while the items run, as "
                                            "(name, action) pairs of np.seterr: the kernel's when it is not "
                                            "numpy's default (np.seterr(all='raise') makes 1/0 raise in a loop)")
    warning_filters: tuple | None = opt(None, help="the warning filters while the items run (warnings.filters): "
                                                   "the kernel's (warnings.simplefilter('error') makes a "
                                                   "RuntimeWarning raise in a loop)")
    settings: tuple | None = opt(None, help="library settings while the items run, as (library, value) "
                                            "pairs: the kernel's decimal context, numpy print options and "
                                            "pandas options where they differ from the defaults "
                                            "(core/settings.py)")

    def __post_init__(self) -> None:
        if isinstance(self.retry_on, type):  # one class: a tuple of one
            object.__setattr__(self, "retry_on", (self.retry_on,))
        if self.max_memory is not None and not isinstance(self.max_memory, int):
            # here, not at the top: a worker (and the forkserver that preloads it) never
            # parses a size, and memory.py's pathlib is ~4 ms of the server's boot
            from .memory import parse_size

            try:  # "500MB", "4GB": stored as bytes
                object.__setattr__(self, "max_memory", parse_size(self.max_memory))
            except ValueError:
                raise BadInputError(
                    f"max_memory must be a size such as 500MB or 4GB, not {self.max_memory!r}"
                ) from None
        for f in fields(self):
            _check(f.name, getattr(self, f.name), f.type)
        if self.retry_on is not None and self.retries is None:  # it would retry nothing, silently
            raise BadInputError("--retry-on (retry_on=) only limits --retries N (retries=) to some exceptions: "
                                "give both, e.g. --retries 2 --retry-on ConnectionError")

    @classmethod
    def from_kwargs(cls, options: dict) -> "MapOptions":
        """From API keywords; an unknown keyword is named with the known ones.

        A cell re-run passes the same options: validated once, then reused
        (validating costs ~15 µs of a ~0.4 ms cell).
        """
        try:  # the types are part of the key: True == 1, yet workers=True is refused
            return _cached(frozenset((k, type(v), v) for k, v in options.items()))
        except TypeError:  # an unhashable value (kwargs): no cache
            return _build(options)

    def with_(self, **changes: Any) -> "MapOptions":
        return replace(self, **changes)


def _build(options: dict) -> MapOptions:
    known = {f.name for f in fields(MapOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BadInputError(f"unknown map option {unknown[0]!r}; the options are: {', '.join(sorted(known))}")
    return MapOptions(**options)


@functools.lru_cache(maxsize=256)
def _cached(items: frozenset) -> MapOptions:
    return _build({k: v for k, _t, v in items})



# options that are tuples of tuples: name -> (each tuple's length, what they must be)
_TUPLES_OF = {
    "errstate": (2, "(name, action) pairs as np.seterr takes them"),
    "settings": (2, "(library, value) pairs as core/settings.py reads them"),
    "warning_filters": (5, "entries of warnings.filters"),
}

def _check(name: str, value: Any, annotation: str) -> None:
    if value is None:
        return
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise BadInputError(f"{name} must be True or False, not {value!r}")
        return
    if name == "retry_on":
        ok = isinstance(value, tuple) and value and all(
            isinstance(c, type) and issubclass(c, BaseException) for c in value
        )
        if not ok:
            raise BadInputError(f"retry_on must be a tuple of exception classes, not {value!r}")
        return
    if name in _TUPLES_OF:  # the kernel's state, as prepare_map reads it
        size, what = _TUPLES_OF[name]
        if not (isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == size for p in value)):
            raise BadInputError(f"{name} must be {what}, not {value!r}")
        return
    if name == "checkpoint":
        if not isinstance(value, (str, os.PathLike)):
            raise BadInputError(f"checkpoint must be a file path, not {value!r}")
        return
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise BadInputError(f"{name} must be a string, not {value!r}")
        return
    if "dict" in annotation:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise BadInputError(f"{name} must be a dict of keyword arguments, not {value!r}")
        return
    if "float" in annotation:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            raise BadInputError(f"{name} must be a number more than 0, not {value!r}")
        return
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadInputError(f"seed must be a non-negative whole number, not {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInputError(f"{name} must be a whole number, at least 1, not {value!r}")


def cli_fields() -> list:
    """The fields that have a command-line spelling, in declaration order."""
    return [f for f in fields(MapOptions) if f.metadata.get("names")]
