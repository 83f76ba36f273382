"""Long maps lose nothing: resume what an earlier run left unfinished, and checkpoints.

* ``resume``: a run re-maps only the items an earlier report has no result
  for, and merges them into its results in input order.
* ``Checkpoint``: every finished chunk is written to an SQLite file (WAL mode:
  a transaction per chunk is atomic, so a kernel killed mid-write leaves the
  file as of the last whole chunk; a torn WAL tail is ignored by SQLite's own
  checksummed recovery). Running the same map with the same file in a new
  kernel loads what is there and runs only what is missing.

A chunk is stored as the bytes its worker sent (results pickled with big
buffers out of band, each buffer a row): no re-pickling, no extra copy. Each
chunk row carries the indices of its items and a hash of their values, so a
changed ITERABLE is refused instead of mixing results; the function's version
is recorded, and a changed function is allowed but reported.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import queue
import sqlite3
import threading
from typing import Any, Iterable

import cloudpickle

from .engine.events import ChunkFinished, MapFinished
from .engine.items import SEQUENCES
from .errors import BadInputError
from .report import RunReport
from .sentinel import NOT_DONE

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS chunks(id INTEGER PRIMARY KEY, indices BLOB NOT NULL, items_hash BLOB NOT NULL,
                                  body BLOB NOT NULL, frames INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS frames(chunk INTEGER NOT NULL, k INTEGER NOT NULL, data BLOB NOT NULL,
                                  PRIMARY KEY(chunk, k));
"""


def items_hash(items: Any) -> bytes:
    """A hash of the items' values: their pickle, big buffers included."""
    frames: list = []
    data = cloudpickle.dumps(items if type(items) is range else list(items), protocol=5,
                             buffer_callback=frames.append)
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

    All writing happens on a thread of its own, fed by a queue: the backend's
    thread only hands over references, and a new file is created while the
    map already runs. ``wait()`` (called when the map ends) returns once every
    finished chunk is committed.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.function_changed = False
        self.error: BaseException | None = None
        self.db: sqlite3.Connection | None = None
        self._index: list[int] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()  # the file is closed
        self._committed = threading.Event()  # every chunk of the map is committed
        self._writer: threading.Thread | None = None
        if os.path.exists(self.path) and os.path.getsize(self.path):
            self._open()  # it may hold results: load() reads them first
        else:
            try:  # fail now, not in the writer, if the place cannot take a file
                open(self.path, "ab").close()
            except OSError as exc:
                raise BadInputError(f"cannot use {self.path!r} as a checkpoint: {exc}") from None
        self._writer = threading.Thread(target=self._write_loop, name="poolmagic-checkpoint", daemon=True)
        self._writer.start()

    def _open(self) -> None:
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit is durable without an fsync each
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript("BEGIN;" + SCHEMA + "COMMIT;")  # one transaction, not one per table
        except sqlite3.Error as exc:
            raise BadInputError(f"cannot use {self.path!r} as a checkpoint: {exc}") from None

    # ------------------------------------------------------------ loading (caller's thread)
    def load(self, iterable: Iterable, name: str, function_key: str) -> tuple[RunReport, list[int] | None, Any]:
        """The report with what the file holds, the positions left to run (None: all), their items."""
        items = _materialise(iterable)
        n = len(items)
        if self.db is None:  # a new file: the writer creates it; run everything
            self._queue.put(("meta", n, function_key))
            return RunReport(func_name=name), None, items
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if "items" in meta and int(meta["items"]) != n:
            raise BadInputError(
                f"the checkpoint {self.path!r} is for {int(meta['items']):,} items and the ITERABLE has {n:,}: "
                f"the ITERABLE changed. Use another PATH, or delete the file to start over."
            )
        self.function_changed = "function" in meta and meta["function"] != function_key
        self._queue.put(("meta", n, function_key))
        try:
            rows = self.db.execute("SELECT id, indices, items_hash, body, frames FROM chunks ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            raise BadInputError(f"the checkpoint {self.path!r} cannot be read ({exc}); delete it to start over") from None
        if not rows:  # a new file: run everything, nothing to merge
            return RunReport(func_name=name), None, items
        results = [NOT_DONE] * n
        try:
            for cid, raw_idx, digest, body, nframes in rows:
                idx = pickle.loads(raw_idx)
                here = items[idx.start : idx.stop] if type(idx) is range else [items[i] for i in idx]
                if items_hash(here) != digest:
                    lo, hi = (idx.start, idx.stop - 1) if type(idx) is range else (min(idx), max(idx))
                    which = f"item {lo} differs" if lo == hi else f"items {lo}–{hi} differ"
                    raise BadInputError(
                        f"the ITERABLE changed since the checkpoint {self.path!r} was written: {which}. "
                        f"Use another PATH, or delete the file to start over."
                    )
                frames = [f for (f,) in self.db.execute("SELECT data FROM frames WHERE chunk=? ORDER BY k", (cid,))]
                if len(frames) != nframes:
                    continue  # an incomplete row (cannot happen inside a transaction; be safe)
                values = pickle.loads(body, buffers=frames)[0]
                for i, v in zip(idx, values):
                    if v is not NOT_DONE:
                        results[i] = v
        except (sqlite3.DatabaseError, pickle.UnpicklingError, EOFError) as exc:
            raise BadInputError(f"the checkpoint {self.path!r} cannot be read ({exc}); delete it to start over") from None
        report = _continuing(name, n, results, {})
        missing = [i for i, v in enumerate(results) if v is NOT_DONE]
        if report.done:
            report.resumed = (report.done, len(missing))
            self._index = missing
            return report, missing, [items[i] for i in missing]
        return report, None, items

    # ------------------------------------------------------------ recording (backend's thread)
    def attach(self, job: Any) -> None:
        self._index = job.index
        job.observers.append(self)

    def __call__(self, event: Any) -> None:
        if type(event) is ChunkFinished and event.items is not None:
            rec = event.record
            pos = range(rec.start, rec.start + rec.count)
            idx: Any = pos if self._index is None else [self._index[p] for p in pos]
            self._queue.put(("chunk", idx, event.items, event.raw, event.results))
        elif type(event) is MapFinished:
            self._queue.put(("close",))

    def wait(self, timeout: float | None = 30.0) -> BaseException | None:
        """Block until every finished chunk is committed; the error, if any.

        Closing (folding the WAL back into the file, an fsync) goes on after,
        in the writer thread: the results are safe once committed.
        """
        self._committed.wait(timeout)
        return self.error

    # ------------------------------------------------------------ the writer thread
    def _write_loop(self) -> None:
        try:
            while True:
                task = self._queue.get()
                if task[0] == "close":
                    self._committed.set()
                    break
                if self.error is not None:
                    continue
                try:
                    if self.db is None:
                        self._open()
                    if task[0] == "meta":
                        with self.db:
                            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('items', ?)", (str(task[1]),))
                            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('function', ?)", (task[2],))
                    else:
                        self._write_chunk(*task[1:])
                except Exception as exc:  # a full disk: the map goes on, the error is said
                    self.error = exc
        finally:
            if self.db is not None:
                try:
                    self.db.close()
                except sqlite3.Error:
                    pass
            self._committed.set()
            self._done.set()

    def _write_chunk(self, idx: Any, items: Any, raw: tuple | None, results: list) -> None:
        if raw is not None:
            body, frames = raw
        else:  # a backend that keeps no bytes: pickle the results here
            frames_pb: list = []
            body = cloudpickle.dumps((results, [], []), protocol=5, buffer_callback=frames_pb.append)
            frames = [f.raw() for f in frames_pb]
        frames = frames or ()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO chunks(indices, items_hash, body, frames) VALUES (?, ?, ?, ?)",
                (pickle.dumps(idx), items_hash(items), body, len(frames)),
            )
            for k, f in enumerate(frames):
                self.db.execute("INSERT INTO frames VALUES (?, ?, ?)", (cur.lastrowid, k, f))
