"""The interpreter's and the process's state a loop in the kernel runs under, carried to the items.

A worker keeps what it started with, so these, set in the kernel once the pool
was warm, made a map differ from a loop: ``sys.setrecursionlimit(10_000)`` (a
deep recursion ran in a loop and raised RecursionError in a map),
``sys.set_int_max_str_digits(0)`` (``str(10**5000)`` likewise: ValueError), the
locale (``locale.setlocale(locale.LC_ALL, "de_DE.UTF-8")``: ``'{:n}'.format``,
``locale.strxfrm``'s order, ``strftime`` and ``atof`` silently differed) and the
umask (the mode of the files the items write, silently), and the root logger's
level and printing handlers (``logging.basicConfig(level=logging.INFO)``: an
item's info records printed in a loop and vanished in a map), and
``socket.setdefaulttimeout`` (an item's connection timed out in a loop and
waited for ever in a map).

``read()`` runs in the kernel before each map, within core/settings.read: each
is compared with what a worker starts with, and only a difference is carried
(~1 µs in all: the two ints ~0.1 µs, the locale ~0.5, the umask ~0.3, since
reading it takes two calls). ``applied(name, value)`` sets one around a chunk,
where the chunk has its process to itself (a local worker, a dask worker of one
thread); on threads they are the kernel's already.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

NAMES = ("sys", "locale", "umask", "logging", "socket")

_HAS_DIGITS = hasattr(sys, "get_int_max_str_digits")  # (Python 3.11+, and some 3.8-3.10 releases)
_DIGITS_FLAG = getattr(sys.flags, "int_max_str_digits", -1)  # PYTHONINTMAXSTRDIGITS, which workers inherit
_DIGITS_DEFAULT = _DIGITS_FLAG if _DIGITS_FLAG >= 0 else getattr(sys.int_info, "default_max_str_digits", 0)


def _interpreter() -> tuple | None:
    """(recursion limit, int max str digits) when either is not what a new interpreter has."""
    limit = sys.getrecursionlimit()
    digits = sys.get_int_max_str_digits() if _HAS_DIGITS else _DIGITS_DEFAULT
    if limit == 1000 and digits == _DIGITS_DEFAULT:
        return None
    return limit, digits


def _umask_now() -> int:
    """The process's umask (set to the strictest for the instant between the two calls: a file
    another thread creates meanwhile is not made more open)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_UMASK_AT_START = _umask_now()  # what workers started from this kernel inherit (mapprep imports this
# module with the API, before any pool starts)
_umask_moved = [False]  # once changed, carried on every map: a worker may have started meanwhile


def _umask() -> int | None:
    mask = _umask_now()
    if mask == _UMASK_AT_START and not _umask_moved[0]:
        return None
    _umask_moved[0] = True
    return mask


try:
    import _locale

    _LC_ALL = _locale.LC_ALL
    _LOCALE_AT_START = _locale.setlocale(_LC_ALL)
except Exception:  # no locale support: nothing to carry
    _locale = None
_locale_cache: list = [None, None]  # [the kernel's setlocale(LC_ALL) string, whether it is carried]


def _locale_now() -> str | None:
    """The kernel's locale, when a category other than LC_CTYPE is not "C" (a worker's start:
    Python sets only LC_CTYPE, from the environment) or LC_CTYPE changed since poolmagic loaded."""
    if _locale is None:
        return None
    now = _locale.setlocale(_LC_ALL)
    if now != _locale_cache[0]:
        parts = [p.partition("=") for p in now.split(";")]
        others = [v for k, _, v in parts if k != "LC_CTYPE"] if ";" in now else [now]
        carried = now != _LOCALE_AT_START or any(v not in ("C", "POSIX") for v in others)
        _locale_cache[:] = [now, carried]
    return now if _locale_cache[1] else None


_STREAMS = ("stderr", "stdout")


def _logging() -> tuple | None:
    """The root logger's level and its handlers that print (to sys.stderr or sys.stdout), as
    (level, ((stream, level, fmt, datefmt, style), ...)), when not a new process's (WARNING, none):
    ``logging.basicConfig(level=logging.INFO)`` printed an item's info records in a loop, and
    nothing in a map. Other handlers (files, sockets) are the kernel's own."""
    logging = sys.modules.get("logging")
    if logging is None:
        return None
    root = logging.root
    if not root.handlers and root.level == logging.WARNING:
        return None
    printing = []
    try:
        for h in root.handlers:
            stream = getattr(h, "stream", None)
            name = next((n for n in _STREAMS if stream is not None
                         and stream in (getattr(sys, n), getattr(sys, f"__{n}__"))), None)
            if name is None or type(h) is not logging.StreamHandler:
                continue
            f = h.formatter or logging._defaultFormatter
            style = next((k for k, v in logging._STYLES.items() if type(f._style) is v[0]), "%")
            printing.append((name, h.level, f._fmt, f.datefmt, style))
    except Exception:  # a logging of another shape: left as the workers have it
        return None
    if not printing and root.level == logging.WARNING:  # (pytest's capturing handler, a file: the kernel's)
        return None
    return root.level, tuple(printing)


def _socket_timeout() -> float | None:
    """``socket.setdefaulttimeout(5)`` in the kernel: an item's connection gave up after 5 s in a
    loop and waited for ever in a map (a worker's default is None)."""
    socket = sys.modules.get("socket")
    return None if socket is None else socket.getdefaulttimeout()


def read() -> tuple:
    """(name, value) pairs of what differs from a new worker's."""
    i, lc, m, lg, so = _interpreter(), _locale_now(), _umask(), _logging(), _socket_timeout()
    if i is None and lc is None and m is None and lg is None and so is None:
        return ()
    return tuple((name, value) for name, value in (("sys", i), ("locale", lc), ("umask", m), ("logging", lg),
                                                   ("socket", so)) if value is not None)


def applied(name: str, value: object) -> contextlib.AbstractContextManager:
    """``name``'s kernel ``value`` in force, for a block run with the process to itself."""
    if name == "sys":
        return _interpreter_set(*value)
    if name == "locale":
        return _locale_set(value)
    if name == "logging":
        return _logging_set(*value)
    if name == "socket":
        return _socket_timeout_set(value)
    return _umask_set(value)


@contextlib.contextmanager
def _socket_timeout_set(seconds: float) -> Iterator[None]:
    import socket

    was = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(was)


_HANDLERS: dict = {}  # the handlers made for a kernel's printing handlers, kept for the next chunks


@contextlib.contextmanager
def _logging_set(level: int, printing: tuple) -> Iterator[None]:
    import logging

    handlers = _HANDLERS.get(printing)
    if handlers is None:
        handlers = _HANDLERS[printing] = [_printing_handler(*spec) for spec in printing]
        if len(_HANDLERS) > 8:
            del _HANDLERS[next(iter(_HANDLERS))]
    root = logging.root
    was = root.level, root.handlers
    root.setLevel(level)
    root.handlers = list(handlers) if handlers else was[1]
    try:
        yield
    finally:
        root.handlers = was[1]
        root.setLevel(was[0])


def _printing_handler(stream: str, level: int, fmt: str | None, datefmt: str | None, style: str):
    """A handler printing to ``sys.<stream>`` as it is when a record comes (the chunk's captured output)."""
    import logging

    class _Printing(logging.StreamHandler):
        @property
        def stream(self):  # noqa: ANN202
            return getattr(sys, stream)

        @stream.setter
        def stream(self, value) -> None:  # noqa: ANN001
            pass

    h = _Printing()
    h.setLevel(level)
    h.setFormatter(logging.Formatter(fmt, datefmt, style))
    return h


@contextlib.contextmanager
def _umask_set(mask: int) -> Iterator[None]:
    was = os.umask(mask)
    try:
        yield
    finally:
        os.umask(was)


@contextlib.contextmanager
def _interpreter_set(limit: int, digits: int) -> Iterator[None]:
    was = sys.getrecursionlimit(), (sys.get_int_max_str_digits() if _HAS_DIGITS else 0)
    try:
        sys.setrecursionlimit(limit)
    except RecursionError:  # lower than this worker's stack already is: left as it is
        pass
    if _HAS_DIGITS:
        sys.set_int_max_str_digits(digits)
    try:
        yield
    finally:
        sys.setrecursionlimit(was[0])
        if _HAS_DIGITS:
            sys.set_int_max_str_digits(was[1])


@contextlib.contextmanager
def _locale_set(name: str) -> Iterator[None]:
    was = _locale.setlocale(_LC_ALL)
    if was == name:
        yield
        return
    try:
        _locale.setlocale(_LC_ALL, name)
    except _locale.Error:
        raise RuntimeError(f"the kernel's locale ({name}) is not installed where this worker runs: "
                           f"the items would format numbers and dates, and sort text, otherwise than "
                           f"a loop in the kernel") from None
    try:
        yield
    finally:
        _locale.setlocale(_LC_ALL, was)

