"""Long maps lose nothing: resume what an earlier run left unfinished, and checkpoints.

* ``resume``: a run re-maps only the items an earlier report has no result
  for, and merges them into its results in input order.
* ``Checkpoint``: every finished chunk is appended to a checkpoint file
  (checkpointfile.py: checksummed records, so a kernel killed mid-write
  leaves whole chunks and a torn last record that is ignored). Running the
  same map with the same file in a new kernel loads what is there and runs
  only what is missing.

A chunk is stored as the bytes its worker sent (results pickled with big
buffers out of band, each buffer a blob of its own): no re-pickling, no extra
copy. Each chunk record carries the indices of its items and a hash of their
values, so a changed ITERABLE is refused instead of mixing results; the
function's version is recorded, and a changed function is allowed but
reported.
"""
from __future__ import annotations

import collections
import hashlib
import os
import pickle
import queue
import threading
import time
from typing import Any, Iterable

import cloudpickle

from .checkpointfile import CheckpointFileError, Stored, Writer, read, signing_key
from .engine.events import ChunkFinished, MapFinished
from .engine.items import SEQUENCES
from .errors import BadInputError
from .report import RunReport
from .sentinel import NOT_DONE

def items_hash(items: Any) -> bytes:
    """A hash of the items' values: their pickle, big buffers included."""
    frames: list = []
    if type(items) is range:
        data = pickle.dumps(items)  # no cloudpickle Pickler for a range (~20 µs)
    else:
        data = cloudpickle.dumps(list(items), protocol=5, buffer_callback=frames.append)
    h = hashlib.sha1(data)
    for f in frames:
        h.update(f.raw())
    return h.digest()


def _materialise(iterable: Iterable) -> list | range | tuple:
    return iterable if type(iterable) in SEQUENCES else list(iterable)


def resume_report(prev: RunReport, iterable: Iterable) -> tuple[RunReport, list[int], list]:
    """A report that keeps ``prev``'s results, the positions to run, and their items."""
    if prev.items is None:
        raise BadInputError("nothing to resume: the earlier run never learned how many items it had")
    missing = [i for i, v in enumerate(prev.results) if v is NOT_DONE]
    if not missing:
        raise BadInputError(f"nothing to resume: all {prev.items:,} items of the earlier run finished")
    items = _materialise(iterable)
    if len(items) != prev.items:
        raise BadInputError(
            f"cannot resume: the ITERABLE now has {len(items):,} items, the run to resume had "
            f"{prev.items:,}; resume needs the same items (or run the cell without --resume)"
        )
    report = _continuing(prev.func_name, prev.items, prev.results, {i: e for i, e in prev.errors.items() if i not in set(missing)})
    report.resumed = (prev.items - len(missing), len(missing))
    return report, missing, [items[i] for i in missing]


def _continuing(name: str, n: int, results: list, errors: dict) -> RunReport:
    r = RunReport(func_name=name, items=n, results=list(results), errors=dict(errors))
    r.done = sum(1 for v in r.results if v is not NOT_DONE)
    return r


class Checkpoint:
    """One checkpoint file: load what it holds, and record chunks as they finish (an observer).

    An existing file is read, opened and locked at once, and a new one's
    directory checked, so a place that cannot take it fails before any work;
    all writing then happens on poolmagic's writer thread (one per process,
    started once: starting a thread per map cost ~0.2 ms), which also creates
    a new file, fed in order: the backend's thread only hands over references.
    ``wait()`` (called when the map ends) writes what is still pending itself
    and returns once every finished chunk is written.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.function_changed = False
        self.error: BaseException | None = None
        self._index: list[int] | None = None
        self._committed = threading.Event()  # every chunk of the map is written
        self._done = threading.Event()  # the file is synced and closed
        self._t_open = time.perf_counter()
        self._pending: collections.deque = collections.deque()  # tasks not written yet
        self._write_lock = threading.Lock()
        self._job: Any = None
        self._closing = False
        key = os.path.realpath(self.path)
        earlier = _OPEN.get(key)
        if earlier is not None:  # this kernel's previous map on it: may still be syncing it
            if earlier._job is not None and earlier._job.active:
                raise BadInputError(f"cannot use {self.path!r} as a checkpoint: a running map of this "
                                    f"kernel is writing it")
            earlier._put("close")  # a no-op if it closed; a map prepared but never run did not
            earlier._done.wait(30)
        self._stored: Stored | None = None
        self.file: Writer | None = None
        try:
            if os.path.lexists(self.path):  # a symlink, FIFO or foreign file: refused by read/Writer
                if os.lstat(self.path).st_size:
                    self._stored = read(self.path)  # it may hold results: load() reads them
                self.file = Writer(self.path, self._stored.end if self._stored is not None else 0)
            else:
                # Creating a file costs 0.05-0.3 ms here (ext4): the writer thread does it,
                # once the place is known to take one.
                where = os.path.dirname(os.path.abspath(self.path))
                if not os.path.isdir(where):
                    raise CheckpointFileError(f"there is no directory {where!r}")
                if not os.access(where, os.W_OK | os.X_OK):
                    raise CheckpointFileError(f"the directory {where!r} is not writable")
                signing_key()  # a key that cannot be made or trusted: refused before work
        except (OSError, CheckpointFileError) as exc:
            raise BadInputError(f"cannot use {self.path!r} as a checkpoint: {exc}") from None
        _OPEN[key] = self

    def _put(self, *task: Any) -> None:
        self._pending.append(task)
        _thread_queue("writer").put((self._drain, ()))

    def _drain(self) -> None:
        """Write what is pending, in order (on the writer thread, or the caller's at the end)."""
        with self._write_lock:
            while self._pending:
                self._do(*self._pending.popleft())

    # ------------------------------------------------------------ loading (caller's thread)
    def load(self, iterable: Iterable, name: str, function_key: str) -> tuple[RunReport, list[int] | None, Any]:
        """The report with what the file holds, the positions left to run (None: all), their items.

        Nothing is written to the file unless this succeeds.
        """
        try:
            items = _materialise(iterable)
            report, missing, todo = self._load(items, name, function_key)
        except BaseException:
            self._put("close")
            raise
        self._put("meta", {"items": len(items), "function": function_key})
        return report, missing, todo

    def _load(self, items: Any, name: str, function_key: str) -> tuple[RunReport, list[int] | None, Any]:
        n = len(items)
        stored = self._stored
        if stored is None:
            return RunReport(func_name=name), None, items
        meta = stored.meta
        if "items" in meta and int(meta["items"]) != n:
            raise BadInputError(
                f"the checkpoint {self.path!r} is for {int(meta['items']):,} items and the ITERABLE has {n:,}: "
                f"the ITERABLE changed. Use another PATH, or delete the file to start over."
            )
        self.function_changed = "function" in meta and meta["function"] != function_key
        if not stored.chunks:
            return RunReport(func_name=name), None, items
        results = [NOT_DONE] * n
        try:
            for idx, digest, body, frames in stored.chunks:
                here = items[idx.start : idx.stop] if type(idx) is range else [items[i] for i in idx]
                if items_hash(here) != digest:
                    lo, hi = (idx.start, idx.stop - 1) if type(idx) is range else (min(idx), max(idx))
                    which = f"item {lo} differs" if lo == hi else f"items {lo}–{hi} differ"
                    raise BadInputError(
                        f"the ITERABLE changed since the checkpoint {self.path!r} was written: {which}. "
                        f"Use another PATH, or delete the file to start over."
                    )
                values = pickle.loads(body, buffers=frames)[0]
                for i, v in zip(idx, values):
                    if v is not NOT_DONE:
                        results[i] = v
        except (pickle.UnpicklingError, EOFError, IndexError, TypeError, ValueError) as exc:
            raise BadInputError(f"the checkpoint {self.path!r} cannot be read ({exc}); delete it to start over") from None
        report = _continuing(name, n, results, {})
        missing = [i for i, v in enumerate(results) if v is NOT_DONE]
        if report.done:
            report.resumed = (report.done, len(missing))
            self._index = missing
            return report, missing, [items[i] for i in missing]
        return RunReport(func_name=name), None, items

    # ------------------------------------------------------------ recording (backend's thread)
    def attach(self, job: Any) -> None:
        self._job = job
        self._index = job.index
        job.observers.append(self)

    def __call__(self, event: Any) -> None:
        if type(event) is ChunkFinished and event.items is not None:
            rec = event.record
            pos = range(rec.start, rec.start + rec.count)
            idx: Any = pos if self._index is None else [self._index[p] for p in pos]
            self._put("chunk", idx, event.items, event.raw, event.results)
        elif type(event) is MapFinished:
            self._put("close")

    def wait(self, timeout: float | None = 30.0) -> BaseException | None:
        """Block until every finished chunk is written; the error, if any.

        The results are safe from the kernel's death once written; the fsync
        (for maps of a second or more) follows on a thread of its own.
        """
        self._drain()  # the last chunk: written here, not handed to the writer thread and back
        self._committed.wait(timeout)
        return self.error

    # ------------------------------------------------------------ on the writer thread
    def _do(self, *task: Any) -> None:
        if task[0] == "close":
            self._close()
        elif self.error is None:
            try:
                if self.file is None:
                    self.file = Writer(self.path, 0, new=True)
                if task[0] == "meta":
                    self.file.meta(task[1])
                else:
                    self._write_chunk(*task[1:])
            except BaseException as exc:  # a full disk: the map goes on, the error is said
                self.error = exc

    def _close(self) -> None:
        """Every chunk is written: the map may return. The fsync goes to a thread of its
        own, so that the next map's records never wait behind this file's sync."""
        if self._closing:
            return
        self._closing = True
        self._committed.set()
        _thread_queue("syncer").put((self._sync_and_release, ()))

    def _sync_and_release(self) -> None:
        # a short map's records are not worth an fsync: it stalled the next map's file
        # creation behind the journal (+7 % -> +16 % on the tiny-items benchmark)
        sync = self.error is None and time.perf_counter() - self._t_open >= SYNC_AFTER_S
        try:
            if self.file is not None:  # None: never written (a refused map)
                self.file.close(sync=sync)
        except OSError:
            pass
        key = os.path.realpath(self.path)
        if _OPEN.get(key) is self:
            del _OPEN[key]
        self._done.set()

    def _write_chunk(self, idx: Any, items: Any, raw: tuple | None, results: list) -> None:
        if raw is not None:
            body, frames = raw
        else:  # a backend that keeps no bytes: pickle the results here
            frames_pb: list = []
            body = cloudpickle.dumps((results, [], []), protocol=5, buffer_callback=frames_pb.append)
            frames = [f.raw() for f in frames_pb]
        self.file.chunk(idx, items_hash(items), body, list(frames or ()))


SYNC_AFTER_S = 1.0  # a map that ran this long has its file fsynced when it ends
_OPEN: dict[str, Checkpoint] = {}  # real path -> this kernel's checkpoint writing it
_QUEUES: dict[str, queue.SimpleQueue] = {}
_QUEUE_LOCK = threading.Lock()


def _thread_queue(name: str) -> queue.SimpleQueue:
    """The queue of checkpoint thread ``name`` ("writer", "syncer"), started on first use."""
    q = _QUEUES.get(name)
    if q is None:
        with _QUEUE_LOCK:
            q = _QUEUES.get(name)
            if q is None:
                q = queue.SimpleQueue()
                threading.Thread(target=_serve, args=(q,), name=f"poolmagic-checkpoint-{name}", daemon=True).start()
                _QUEUES[name] = q
    return q


def _serve(q: queue.SimpleQueue) -> None:
    while True:
        fn, args = q.get()
        try:
            fn(*args)
        except BaseException:  # each task keeps its own error; one file never stops the others
            pass


def _forget_in_child() -> None:
    """A forked child has none of these threads and writes none of its parent's files."""
    _QUEUES.clear()
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
