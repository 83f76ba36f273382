"""Errors poolmagic raises, and how a worker's exception crosses back intact.

A user who writes ``except ValueError:`` around a map must catch the
``ValueError`` their function raised in a worker, and the traceback must point
at *their* cell lines, not at poolmagic's internals. The worker sends the
exception (pickled when possible) with its frames as (file, line, function);
the parent re-creates real traceback entries for those frames, so IPython shows
``Cell In[3], line 4, in work`` with the source, exactly as for a local error.
"""
from __future__ import annotations

import pickle
import reprlib
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .report import RunReport

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = 4


def short_repr(value: Any) -> str:
    try:
        return _short.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


class PoolmapError(Exception):
    """Base class of poolmagic's own errors; ``.report`` keeps every finished result."""

    report: "RunReport | None" = None


class WorkerCrashedError(PoolmapError):
    """A worker process died (os._exit, segfault, OOM killer) while running items."""

    def __init__(self, message: str, indices: list[int], exitcode: int | None):
        super().__init__(message)
        self.indices = indices
        self.exitcode = exitcode


class WorkerMemoryError(PoolmapError, MemoryError):
    """A worker was stopped for its memory (``--max-memory``, or the kernel's own was nearly gone)."""

    def __init__(self, message: str, indices: list[int], rss: int, limit: int | None):
        super().__init__(message)
        self.indices = indices
        self.rss = rss
        self.limit = limit


class ItemTimeoutError(PoolmapError, TimeoutError):
    """An item ran longer than ``--timeout``; its worker was killed and replaced."""

    def __init__(self, message: str, index: int, timeout: float):
        super().__init__(message)
        self.index = index
        self.timeout = timeout


class ItemPicklingError(PoolmapError, pickle.PicklingError):
    """An item (argument) or a result could not be pickled."""


def pickling_error(message: str, cause: BaseException) -> ItemPicklingError:
    """An ItemPicklingError that is also an instance of what pickling raised.

    ``except RuntimeError`` around a map (what multiprocessing lets through when
    an item's ``__reduce__`` raises it) keeps working, as does
    ``except poolmagic.ItemPicklingError``.
    """
    cls = _PICKLING.get(type(cause))
    if cls is None:
        try:
            cls = type("ItemPicklingError", (ItemPicklingError, type(cause)), {"__module__": __name__})
        except TypeError:  # an incompatible layout (OSError's): poolmagic's class alone
            cls = ItemPicklingError
        _PICKLING[type(cause)] = cls
    try:
        return cls(message)
    except Exception:
        return ItemPicklingError(message)


_PICKLING: dict[type, type] = {}


class MapFailedError(PoolmapError):
    """``--keep-going``: several items failed; each exception is in ``.errors``."""

    def __init__(self, message: str, errors: dict[int, BaseException]):
        super().__init__(message)
        self.errors = errors


class ItemExitError(PoolmapError):
    """An item called ``sys.exit()`` (or raised KeyboardInterrupt) in a worker.

    Re-raised as itself it would end the caller's script with status 0, or look
    like an interrupt of the kernel; the original exception is ``__cause__``.
    """


class MapCancelledError(PoolmapError):
    """The map was cancelled (``handle.cancel()``); finished results are in ``.report``."""


class NestedPoolError(PoolmapError):
    """A poolmagic pool was asked to start inside one of poolmagic's own workers."""


class BadInputError(PoolmapError, ValueError):
    """Bad input caught before any work starts (the magic shows it as a UsageError)."""


class BadArgumentsError(BadInputError, TypeError):
    """The function cannot take what the map would pass it, or the ITERABLE is not iterable, or a
    Pool size is not a number: a TypeError, as the loop (or multiprocessing) would raise."""


class SerializationError(BadInputError):
    """The function, or something it captures, cannot be sent to a worker."""


class RemoteError(PoolmapError):
    """Stands in for a worker exception whose class could not be re-created here."""


def safe_str(obj: Any) -> str:
    """``str(obj)``, or a placeholder when its ``__str__`` raises."""
    try:
        return str(obj)
    except BaseException as exc:  # noqa: BLE001  (user code: anything can happen)
        return f"<str() of {type(obj).__name__} raised {type(exc).__name__}>"


def exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        import signal

        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


# ---------------------------------------------------------------- worker side


_CHAIN_DEPTH = 8  # links of an error's __cause__/__context__ chain sent back with it


def pack_exception(exc: BaseException, skip_prefix: str, _depth: int = 0) -> dict:
    """Everything the parent needs to re-raise ``exc`` faithfully.

    Its ``__cause__`` and ``__context__`` too (pickle keeps neither): the plain
    loop's traceback shows the error it was raised from, the root cause.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        co = tb.tb_frame.f_code
        frames.append((co.co_filename, tb.tb_lineno, co.co_name, co.co_firstlineno))
        tb = tb.tb_next
    # Drop poolmagic's own frames at the top (the chunk loop, wrappers).
    while frames and frames[0][0].startswith(skip_prefix):
        frames.pop(0)
    import cloudpickle

    blob = cls_blob = state = None
    try:
        blob = cloudpickle.dumps(exc)
        pickle.loads(blob)  # must round-trip, or the parent gets a broken object
    except BaseException:  # noqa: BLE001  (a user's __reduce__ may raise anything)
        blob = None
        try:  # the class alone, so `except ThatError:` still works in the parent
            cls_blob = cloudpickle.dumps(type(exc))
            state = _state_blob(exc)
        except BaseException:  # noqa: BLE001
            pass
    packed = {
        "blob": blob,
        "cls": cls_blob,
        "state": state,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": safe_str(exc),
        "frames": frames,
        "text": _format(exc),
    }
    if _depth < _CHAIN_DEPTH:
        cause, context = exc.__cause__, exc.__context__
        if cause is not None:
            packed["cause"] = pack_exception(cause, skip_prefix, _depth + 1)
        if context is not None and context is not cause and not exc.__suppress_context__:
            packed["context"] = pack_exception(context, skip_prefix, _depth + 1)
        packed["suppress"] = exc.__suppress_context__
    return packed


def _state_blob(exc: BaseException) -> bytes | None:
    """An exception's args and attributes that pickle, for one that does not unpickle whole
    (an ``__init__`` that wants other arguments than ``args``): rebuilt without calling it."""
    import cloudpickle

    def sendable(value: Any) -> bool:
        try:
            pickle.loads(cloudpickle.dumps(value))
            return True
        except BaseException:  # noqa: BLE001
            return False

    args = exc.args if sendable(exc.args) else None
    attrs = {k: v for k, v in getattr(exc, "__dict__", {}).items() if sendable(v)}
    return cloudpickle.dumps((args, attrs))


def _format(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: BLE001  (a __str__ that raises)
        return f"{type(exc).__module__}.{type(exc).__qualname__}: {safe_str(exc)}"


# ---------------------------------------------------------------- parent side


def _frame_tb(exc: BaseException, filename: str, lineno: int, name: str):
    """A real traceback entry that says ``filename:lineno in name``."""
    import linecache

    line = linecache.getline(filename, lineno)
    stripped = line.strip()
    # Make the raise statement exactly as wide as the original line, so that
    # tracebacks underline the whole line rather than a meaningless part of it.
    var = "__exc__" + "_" * max(0, len(stripped) - len("raise __exc__"))
    code = compile("\n" * max(lineno - 1, 0) + f"raise {var}", filename, "exec")
    try:
        code = code.replace(co_name=name)
    except (AttributeError, TypeError):
        pass
    # Raising sets __traceback__ (chained to any existing one) and __context__:
    # keep neither, or tracebacks loop and engine internals leak into the chain.
    context, suppress = exc.__context__, exc.__suppress_context__
    exc.__traceback__ = None
    tb = None
    try:
        exec(code, {var: exc, "__name__": "poolmagic.worker"})
    except BaseException:
        tb = sys.exc_info()[2].tb_next
    exc.__context__, exc.__suppress_context__ = context, suppress
    if tb is not None:
        tb.tb_next = None
    return tb


def rebuild_exception(packed: dict, filenames: Callable[[str, int], str | None] | None = None) -> BaseException:
    """The worker's exception, same type, with a traceback of the worker's frames.

    cloudpickle ships code without its file name (``<dynamic-code>``);
    ``filenames(name, firstlineno)`` finds it again from the parent's copy of
    the code, so the traceback shows the notebook cell's lines.
    """
    exc: BaseException | None = None
    if packed.get("blob") is not None:
        try:
            exc = pickle.loads(packed["blob"])
        except Exception:
            exc = None
    if exc is None and packed.get("cls") is not None:
        try:  # an exception that does not pickle: same class, its args and attributes that do
            cls = pickle.loads(packed["cls"])
            exc = cls.__new__(cls)
            args, attrs = pickle.loads(packed["state"]) if packed.get("state") else (None, {})
            exc.args = (packed["message"],) if args is None else args
            for k, v in attrs.items():
                setattr(exc, k, v)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(f"{packed['type']}: {packed['message']}\n\n{packed['text']}")
    head = prev = None
    for filename, lineno, name, first in packed.get("frames", ()):
        if filename == "<dynamic-code>" and filenames is not None:
            filename = filenames(name, first) or filename
        tb = _frame_tb(exc, filename, lineno or 1, name)
        if tb is None:
            continue
        if prev is None:
            head = tb
        else:
            prev.tb_next = tb
        prev = tb
    exc.__traceback__ = head
    if packed.get("cause") is not None:
        exc.__cause__ = rebuild_exception(packed["cause"], filenames)
    if packed.get("context") is not None:
        exc.__context__ = rebuild_exception(packed["context"], filenames)
    if "suppress" in packed:
        exc.__suppress_context__ = packed["suppress"]
    return exc


def point_at_function(exc: BaseException, func: Any) -> BaseException:
    """Give an error of poolmagic's own a traceback that ends at the user's function.

    A crash, a timeout or an interrupt has no frame of the user's code; the
    definition of the mapped function is the most useful place to point at.
    """
    import functools

    while True:
        if isinstance(func, functools.partial):
            func = func.func
        elif hasattr(func, "func") and not hasattr(func, "__code__"):
            func = func.func  # poolmagic's own wrappers (repeat)
        else:
            break
    code = getattr(func, "__code__", None)
    if code is not None:
        tb = _frame_tb(exc, code.co_filename, code.co_firstlineno, code.co_name)
        if tb is not None:
            exc.__traceback__ = tb
    return exc


def add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: IPython reads __notes__ all the same
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]

