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
import os
import pickle
import queue
import reprlib
import struct
import threading
import time
from array import array
from typing import Any, Iterable

import cloudpickle

from . import identity
from .checkpointfile import Writer, read
from .checkpointformat import CheckpointFileError, Stored, signing_key
from .engine.core.events import ChunkFinished, MapFinished
from .engine.core.items import SEQUENCES
from .errors import BadInputError
from .report import RunReport
from .sentinel import NOT_DONE

_INT64 = (-(1 << 63), 1 << 63)
_RANGE = struct.Struct("<qqq")

def items_hash(items: Any, indices: Any = None) -> bytes:
    """The stored identity of a chunk's items: ``R`` + (start, length, step) for a range of
    int64s, else ``K`` + each item's 8-byte key (identity.py), equal in any process."""
    if type(items) is range:
        packed = _range_key(items)
        if packed is not None:
            return packed
    return b"K" + identity.keys(items, indices, "a checkpoint")


def _range_key(r: range) -> bytes | None:
    n = len(r)
    if not n or not (_INT64[0] <= min(r[0], r[-1]) and max(r[0], r[-1]) < _INT64[1]):
        return None
    return b"R" + _RANGE.pack(r[0], n, r.step if n > 1 else 1)


def _expand(stored: bytes) -> bytes:
    """A stored identity as 8-byte keys, one per item."""
    if stored[:1] == b"R":
        start, n, step = _RANGE.unpack_from(stored, 1)
        return array("q", range(start, start + n * step, step)).tobytes()
    return bytes(stored[1:])


def _legacy(stored: Any) -> bool:
    """A chunk hash of poolmagic before stable identities (a SHA-1 of the items' pickle)."""
    if not isinstance(stored, (bytes, bytearray)):
        return True
    tag = stored[:1]
    return not ((tag == b"R" and len(stored) == 1 + _RANGE.size) or (tag == b"K" and (len(stored) - 1) % identity.KEY == 0))


def _differ_message(which: list[int], items: Any, limit: int = 5) -> str:
    """"item 7 differs (now -1)", "items 3 and 7 differ (now ...)", "12 items differ, the first ..."."""
    now = ", ".join(reprlib.repr(items[i]) for i in which[:limit])
    if len(which) == 1:
        return f"item {which[0]} differs (it is now {now})"
    if len(which) <= limit:
        names = ", ".join(map(str, which[:-1])) + f" and {which[-1]}"
        return f"items {names} differ (now {now})"
    return f"{len(which):,} items differ, the first {', '.join(map(str, which[:limit]))} (now {now}, …)"


def _materialise(iterable: Iterable) -> list | range | tuple:
    return iterable if type(iterable) in SEQUENCES else list(iterable)


def resume_report(prev: RunReport, iterable: Iterable) -> tuple[RunReport, list[int], list]:
    """A report that keeps ``prev``'s results, the positions to run, and their items.

    Refused unless the items behind the ITERABLE are, at every position ``prev``
    kept a result for, the ones ``prev`` mapped (compared by identity.py keys):
    kept results of other items would mix two ITERABLEs silently. An item that
    failed may have changed: its result is computed now.
    """
    if prev.status == "running":
        raise BadInputError("cannot resume: the run to resume is still running; wait for it (or cancel it) first")
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
    seen = prev.identity
    if not isinstance(seen, SeenItems):
        raise BadInputError("cannot resume: the earlier run's items were not recorded (it was not made by a map); "
                            "run the cell without --resume")
    was = seen.result()
    skip = set(missing)
    kept = [i for i in range(len(items)) if i not in skip]
    now = _keys_at(items, kept, "--resume")
    changed = [i for i in identity.differing(was, now) if i not in skip]
    if changed:
        raise BadInputError(
            f"cannot resume: the ITERABLE changed since the run to resume: {_differ_message(changed, items)}. "
            f"The {prev.items - len(missing):,} kept results are of the old items: run the cell without --resume "
            f"to map every item again."
        )
    report = _continuing(prev.func_name, prev.items, prev.results, {i: e for i, e in prev.errors.items() if i not in skip})
    report.resumed = (prev.items - len(missing), len(missing))
    report.identity = now
    return report, missing, [items[i] for i in missing]


def _keys_at(seq: Any, positions: list[int], purpose: str, index: Any = None) -> bytearray:
    """Keys of ``seq`` at ``positions`` (zeros elsewhere), as one buffer of 8 bytes per item;
    ``index`` maps positions in ``seq`` to the map's (a resumed run maps a subset)."""
    k = identity.KEY
    n = (max(index) + 1 if index else 0) if index is not None else len(seq)
    out = bytearray(n * k)
    if index is None and len(positions) * 2 >= len(seq):  # most of it: the whole, by the fast paths
        out[:] = identity.keys(seq, None, purpose)
        return out
    names = positions if index is None else [index[p] for p in positions]
    keys = identity.keys([seq[p] for p in positions], names, purpose)
    for j, i in enumerate(names):
        out[i * k : (i + 1) * k] = keys[j * k : (j + 1) * k]
    return out


class SeenItems:
    """The keys (identity.py) of a map's items, kept on its report for ``--resume``.

    Hashing every item of every map would cost the tiny-items path dearly
    (docs/design.md), so they are computed only when needed, on a thread of
    their own: for a sequence ITERABLE (still held by the report) once the map
    ends with items missing; for a stream, which is gone once read, chunk by
    chunk as results come back. Positions kept from a checkpoint or an earlier
    run start out known (their keys were compared on the way in).
    """

    def __init__(self, job: Any):
        self.job = job
        report = job.report
        pre = report.identity
        self.keys = bytearray(pre) if isinstance(pre, (bytes, bytearray)) else bytearray()
        self.error: BaseException | None = None
        self.ready: threading.Event | None = None  # made when keys are computed after the map (~3 µs)
        self.ending = False  # the map has ended
        report.identity = self
        job.observers.append(self)

    def __call__(self, event: Any) -> None:
        if type(event) is ChunkFinished:
            if self.job.source.is_stream and event.items is not None:
                if self.ready is None:
                    self.ready = threading.Event()
                self._put(self._add, event.record.start, event.items)
        elif type(event) is MapFinished:  # published under the job's lock: a caller that saw the
            r = self.job.report           # map end sees ``ending`` (and ``ready``) too
            if not self.job.source.is_stream and r.items is not None and r.done >= r.items:
                self.job = None  # nothing missing: nothing to resume, no keys needed (the common case)
            else:
                if self.ready is None:
                    self.ready = threading.Event()
                self._put(self._end)
            self.ending = True

    def _put(self, fn: Any, *args: Any) -> None:
        _thread_queue("identity").put((self._guard, (fn, args)))

    def _guard(self, fn: Any, args: tuple) -> None:
        if self.error is not None:
            return
        try:
            fn(*args)
        except identity.IdentityError as exc:
            self.error = exc
        except BaseException as exc:  # never lose the event: resume says what went wrong
            self.error = BadInputError(f"the items could not be identified ({type(exc).__name__}: {exc})")
        finally:
            if fn == self._end:
                self.job = None  # the report outlives the job: hold nothing of it
                self.ready.set()  # type: ignore[union-attr]

    def _add(self, start: int, items: Any, index: Any = None) -> None:
        k = identity.KEY
        keys = identity.keys(items, range(start, start + len(items)) if index is None else index, "--resume")
        if index is None:
            if len(self.keys) < (start + len(items)) * k:
                self.keys.extend(bytes((start + len(items)) * k - len(self.keys)))
            self.keys[start * k : (start + len(items)) * k] = keys
        else:
            for j, i in enumerate(index):
                self.keys[i * k : (i + 1) * k] = keys[j * k : (j + 1) * k]

    def _end(self) -> None:
        job = self.job
        r = job.report
        if job.source.is_stream or r.items is None or r.done >= r.items:
            return  # a stream was hashed as it went; a map with nothing missing needs no keys
        seq, index, k = job.source.seq, job.index, identity.KEY
        # with a result now, or handed to a worker: a result on its way when the map ended (a
        # cancel, a failure) is kept when it lands later, and --resume must know its item too
        handed = min(len(seq), job.source.pos)
        done = [p for p in range(len(seq))
                if p < handed or r.results[p if index is None else index[p]] is not NOT_DONE]
        if len(self.keys) < r.items * k:
            self.keys.extend(bytes(r.items * k - len(self.keys)))
        got = _keys_at(seq, done, "--resume", index)  # only the kept items: a map that failed at once hashes little
        if index is None:  # a fresh map: nothing was known before
            self.keys[: len(got)] = got
            return
        for p in done:
            self.keys[index[p] * k : (index[p] + 1) * k] = got[index[p] * k : (index[p] + 1) * k]

    def settle(self) -> None:
        """Once the map has ended, wait for its keys: a sequence changed in place after
        ``run`` returns must not be hashed as the items the map ran."""
        if self.ending and self.ready is not None:
            self.ready.wait()

    def result(self) -> bytes:
        """The keys, once known (raises what made them unknowable)."""
        if self.ready is not None:
            self.ready.wait()
        if self.error is not None:
            raise BadInputError(f"cannot resume: {self.error}; run the cell without --resume") from None
        return bytes(self.keys)


def _continuing(name: str, n: int, results: list, errors: dict) -> RunReport:
    r = RunReport(func_name=name, items=n, results=list(results), errors=dict(errors))
    r.done = sum(1 for v in r.results if v is not NOT_DONE)
    return r


def _record_at(exc: BaseException) -> str:
    """Which record the file reader was at when ``exc`` was raised: "the record at byte N"."""
    tb, at = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code is read.__code__:
            at = tb.tb_frame.f_locals.get("pos")
        tb = tb.tb_next
    return f"the record at byte {at:,}" if isinstance(at, int) else "a record"


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
        self.notes: list[str] = []  # said under the map's summary (damaged records)
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
        except Exception as exc:  # the reader choked on a malformed record (struct.error, UnpicklingError...)
            raise BadInputError(
                f"cannot use {self.path!r} as a checkpoint: {_record_at(exc)} is malformed "
                f"({type(exc).__name__}: {exc}). Delete it to start over."
            ) from None
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
        if stored is None or not stored.chunks:
            if n:  # a first item that cannot be identified is refused before any work
                identity.keys(items[:1], [0], "a checkpoint")
        if stored is None:
            return RunReport(func_name=name), None, items
        meta = stored.meta
        if "items" in meta and int(meta["items"]) != n:
            raise BadInputError(
                f"the checkpoint {self.path!r} is for {int(meta['items']):,} items and the ITERABLE has {n:,}: "
                f"the ITERABLE changed. Use another PATH, or delete the file to start over."
            )
        self.function_changed = "function" in meta and meta["function"] != function_key
        damaged = getattr(stored, "damaged", 0)
        if damaged:
            self.notes.append(f"{damaged:,} checkpoint record{'s were' if damaged != 1 else ' was'} damaged; "
                              f"{'their' if damaged != 1 else 'its'} items ran again")
        if not stored.chunks:
            return RunReport(func_name=name), None, items
        results = [NOT_DONE] * n
        known = bytearray(n * identity.KEY)  # the items' keys where the file holds results (for --resume)
        changed: list[int] = []
        for k, (idx, digest, body, frames) in enumerate(stored.chunks):
            where = f"chunk record {k + 1} of {len(stored.chunks)}"
            try:
                positions = idx if type(idx) is range else list(idx)
                if not positions or min(positions) < 0 or max(positions) >= n:
                    raise IndexError(f"it holds items {min(positions, default='-')}–{max(positions, default='-')}")
                if _legacy(digest):
                    raise BadInputError(
                        f"the checkpoint {self.path!r} was written by an earlier poolmagic, which identified items "
                        f"in a way that changes between kernels. Delete it to start over."
                    )
                here = items[idx.start : idx.stop] if type(idx) is range else [items[i] for i in idx]
                # compared as keys: a range written, a list read (or the reverse) are the same items
                was, now = _expand(digest), _expand(items_hash(here, positions))
                if was != now:
                    if len(was) != len(now):
                        raise ValueError(f"it holds {len(was) // identity.KEY} keys for {len(positions)} items")
                    differ = identity.differing(was, now)
                    if differ:
                        changed += [positions[j] for j in differ]
                        continue
                values = pickle.loads(body, buffers=frames)[0]
                if len(values) != len(positions):
                    raise ValueError(f"it holds {len(values)} results for {len(positions)} items")
            except BadInputError:
                raise
            except Exception as exc:  # a malformed record: one plain error naming the file and the record
                raise BadInputError(
                    f"the checkpoint {self.path!r} cannot be read: {where} is malformed "
                    f"({type(exc).__name__}: {exc}). Delete it to start over."
                ) from None
            for i, v in zip(positions, values):
                if v is not NOT_DONE:
                    results[i] = v
            k8 = identity.KEY
            if type(idx) is range:
                known[idx.start * k8 : idx.stop * k8] = now
            else:
                for j, i in enumerate(positions):
                    known[i * k8 : (i + 1) * k8] = now[j * k8 : (j + 1) * k8]
        if changed:
            changed.sort()
            raise BadInputError(
                f"the ITERABLE changed since the checkpoint {self.path!r} was written: "
                f"{_differ_message(changed, items)}. Use another PATH, or delete the file to start over."
            )
        report = _continuing(name, n, results, {})
        missing = [i for i, v in enumerate(results) if v is NOT_DONE]
        if report.done:
            report.resumed = (report.done, len(missing))
            report.identity = bytes(known)
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
        self.file.chunk(idx, items_hash(items, idx), body, list(frames or ()))


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
