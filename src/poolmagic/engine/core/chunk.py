"""Running one chunk of items: the loop every backend's worker uses.

``run_chunk`` is independent of how the chunk arrived, so a local worker and
a dask task run chunks exactly alike: print() captured per item, exceptions
packed with their frames, per-item timing and seeding where asked, progress
reported from long chunks. ``pack_results`` pickles what the chunk produced,
the same way on every backend: a result that cannot travel (an open file,
a socket, a lock, a generator) becomes an error naming its item.
"""
from __future__ import annotations

import _thread
import io
import itertools
import os
import socket
import sys
import time
import types
from collections import ChainMap
from typing import Any, Callable

import cloudpickle

from ... import errors as _errors
from ...sentinel import NOT_DONE
from .. import protocol as P
from .. import seeds

PKG_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # poolmagic/


class _Capture(io.TextIOBase):
    """A stdout/stderr stand-in that files each write under the current item."""

    def __init__(self, name: str, records: list, locate):
        self.name = name
        self._records = records
        self._locate = locate

    def write(self, s: str) -> int:
        if s:
            idx = self._locate()
            rec = self._records
            if rec and rec[-1][0] == idx and rec[-1][1] == self.name:
                rec[-1] = (idx, self.name, rec[-1][2] + s)
            else:
                rec.append((idx, self.name, s))
        return len(s)

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"

    def isatty(self) -> bool:
        return False


def run_chunk(
    fn, items, start: int, *, star: bool = False, timed: bool = False, keep_going: bool = False,
    seed: int | None = None, progress=None, indices=None, redirect=None, meter=None,
    progress_s: float | None = None,
) -> tuple[list, float, float, list | None, list, list]:
    """Run ``fn`` over one chunk: (results, t0, t1, item times, output records, packed errors).

    Independent of how the chunk arrived, so any backend's worker (a dask
    task, say) runs chunks exactly as the local workers do. ``progress(done)``
    is called every PROGRESS_S while a timed chunk runs; with ``progress_s``, at
    least that often in any chunk, checked before each item (the parent's clock
    for each item under --timeout). ``indices``: each
    item's position in the user's ITERABLE when it is not ``start + k`` (a
    re-run of some items); a seeded item's numbers come from it.
    ``redirect(stdout, stderr)``: installs the two captures and returns what
    undoes that; by default they replace sys.stdout/sys.stderr (a worker
    process runs one chunk at a time; the threads backend runs several).
    ``meter()``: called right before the first item and right after the last,
    so that what the caller measures (CPU time, waits for a CPU) covers the
    items' t0..t1 and nothing around them.
    """
    seeds.clear()
    n = len(items)
    out: list = []
    errors: list = []
    records: list = []
    times: list | None = [] if timed else None
    state = {"it": None, "i": start}
    explicit = timed or seed is not None or (progress is not None and progress_s is not None)
    if explicit:
        locate = lambda: state["i"]  # noqa: E731
    else:
        locate = lambda: start + n - state["it"].__length_hint__() - 1  # noqa: E731
    captures = _Capture("stdout", records, locate), _Capture("stderr", records, locate)
    if redirect is None:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = captures
    else:
        undo = redirect(*captures)
    if meter is not None:
        meter()
    t0 = time.perf_counter()
    try:
        if explicit:
            _run_explicit(fn, items, start, star, seed, keep_going, out, errors, times, state, progress, indices,
                          P.PROGRESS_S if progress_s is None else progress_s)
        else:
            it = iter(items)
            state["it"] = it
            mapper = itertools.starmap if star else map
            while True:
                try:
                    out.extend(mapper(fn, it))  # keeps what finished if an item raises
                    break
                except BaseException as exc:
                    errors.append((start + len(out), _errors.pack_exception(exc, PKG_DIR)))
                    out.append(NOT_DONE)
                    if not keep_going:
                        break
    finally:
        t1 = time.perf_counter()
        if meter is not None:
            meter()
        if redirect is None:
            sys.stdout, sys.stderr = old
        else:
            undo()
        seeds.clear()
        if seed is not None:  # the next map, seeded or not, starts from no item's streams
            seeds.fresh()
    return out, t0, t1, times, records, errors


def _run_explicit(fn, items, start, star, seed, keep_going, out, errors, times, state, progress=None,
                  indices=None, progress_s: float = P.PROGRESS_S) -> None:
    """The per-item loop: index known, per-item times, seeds and progress possible."""
    clock = time.perf_counter
    report_at = clock() + progress_s
    for offset, x in enumerate(items):
        if progress is not None and offset and clock() >= report_at:
            progress(offset)
            report_at = clock() + progress_s
        i = start + offset
        state["i"] = i
        if seed is not None:
            seeds.seed_item(seed, i if indices is None else indices[offset])
        t = clock()
        try:
            out.append(fn(*x) if star else fn(x))
        except BaseException as exc:
            out.append(NOT_DONE)
            errors.append((i, _errors.pack_exception(exc, PKG_DIR)))
            if times is not None:
                times.append(clock() - t)
            if not keep_going:
                return
            continue
        if times is not None:
            times.append(clock() - t)


# ---------------------------------------------------------------- sending results back


def _refuse(what: "str | Callable[[Any], str]", fix: str) -> Callable[[Any], Any]:
    """A pickler reducer that refuses its object, saying what it is and what to return instead."""

    def reduce(obj: Any) -> Any:
        raise TypeError(f"{what(obj) if callable(what) else what} cannot be sent between processes: {fix}")

    return reduce


def _file_name(f) -> str:
    name = getattr(f, "name", None)
    mode = getattr(f, "mode", None)
    return "an open file" + (f" ({name!r}" + (f", mode {mode!r})" if mode else ")") if name is not None else "")


_CLOUDPICKLE_TABLE = cloudpickle.Pickler.dispatch_table
_file_reduce = _CLOUDPICKLE_TABLE.get(io.TextIOWrapper)
_refuse_file = _refuse(_file_name, "return its path, or what you read from it")


def _reduce_text_file(f):
    # cloudpickle would read a file opened for reading into an io.StringIO copy, silently
    if (f is sys.__stdout__ or f is sys.__stderr__) and _file_reduce is not None:
        return _file_reduce(f)  # sys.stdout inside an object (a log handler) pickles as a reference
    return _refuse_file(f)


_REFUSED = {
    io.TextIOWrapper: _reduce_text_file,
    io.BufferedReader: _refuse_file,
    io.BufferedWriter: _refuse_file,
    io.BufferedRandom: _refuse_file,
    io.FileIO: _refuse_file,
    socket.socket: _refuse("an open socket", "return its address, or the data you received"),
    _thread.LockType: _refuse("a lock", "return the value it guards"),
    _thread.RLock: _refuse("a lock", "return the value it guards"),
    types.GeneratorType: _refuse("a generator", "return list(...) of it, or compute its values in the function"),
}
if isinstance(_CLOUDPICKLE_TABLE, ChainMap):  # as deep as cloudpickle's own table: no cost per object
    _TABLE = ChainMap({**_CLOUDPICKLE_TABLE.maps[0], **_REFUSED}, *_CLOUDPICKLE_TABLE.maps[1:])
else:
    _TABLE = ChainMap(_REFUSED, _CLOUDPICKLE_TABLE)


class _ResultPickler(cloudpickle.Pickler):
    """cloudpickle, except for objects that cannot mean the same in another process."""

    dispatch_table = _TABLE


def dumps_result(obj, protocol: int = 5, buffer_callback=None) -> bytes:
    """Pickle what a worker sends back; objects tied to this process raise TypeError."""
    with io.BytesIO() as file:
        _ResultPickler(file, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def pack_results(out: list, records: list, errors: list, start: int, items, indices=None) -> tuple[bytes, list]:
    """(body, out-of-band frames) of a chunk's results, output and errors.

    A result that does not pickle is replaced by NOT_DONE and an error naming
    its item (index and value): found only when the whole chunk failed to
    pickle, so ordinary results pay nothing for the check.
    """
    try:
        return P.dumps_oob((out, records, errors), dumps_result)
    except Exception:
        out, errors = _strip_unpicklable(out, errors, start, items, indices)
        return P.dumps_oob((out, records, errors), dumps_result)


def _strip_unpicklable(out: list, errors: list, start: int, items=None, indices=None) -> tuple[list, list]:
    """Replace each result that cannot be pickled by an error naming its item."""
    from ...serialize import describe

    out, errors = list(out), list(errors)
    for k, value in enumerate(out):
        try:
            dumps_result(value)
        except Exception as exc:
            out[k] = NOT_DONE
            idx = start + k if indices is None else indices[k]
            what = f"item {idx}"
            if items is not None and k < len(items):
                what += f" (value {_errors.short_repr(items[k])})"
            err = _errors.ItemPicklingError(
                f"the result of {what} is {describe(value)}, which cannot be pickled to send it back: "
                f"{_errors.safe_str(exc)}"
            )
            errors.append((start + k, _errors.pack_exception(err, PKG_DIR)))
    errors.sort(key=lambda e: e[0])
    return out, errors
