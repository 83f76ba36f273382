"""``--checkpoint``: every finished chunk is appended to a checkpoint file.

Running the same map with the same file in a new kernel loads what is there
and runs only what is missing. A chunk is stored as the bytes its worker sent
(results pickled with big buffers out of band, each buffer a blob of its own:
checkpointfile.py), with the indices of its items and their keys (itemkeys.py),
so a changed ITERABLE is refused instead of mixing results; the function's
version is recorded, and a changed function is allowed but reported.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import threading
import time
from typing import Any, Iterable

import cloudpickle

from . import identity
from .checkpointfile import Writer, parse, read
from .checkpointformat import CheckpointFileError, Stored, signing_key
from .engine.core.events import ChunkFinished, MapFinished
from .errors import BadInputError
from .itemkeys import differ_message, expand, items_hash, items_words, legacy
from .report import RunReport
from .resume import continuing, materialise, seed_words
from .sentinel import NOT_DONE
from .threadqueues import thread_queue
from .versions import changed_kw, item_class_keys, item_types


def _record_at(exc: BaseException) -> str:
    """Which record the file reader was at when ``exc`` was raised: "the record at byte N"."""
    tb, at = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code is parse.__code__:  # decoding the records it found, in order
            at = tb.tb_frame.f_locals.get("offset")
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
        self.path = os.path.expanduser(os.fspath(path))  # --checkpoint ~/runs/a.ckpt, as a shell reads it
        self.function_changed = False
        self.kw_changed: tuple[dict | None, dict | None] | None = None  # (the file's keys, the map's)
        self.notes: list[str] = []  # said under the map's summary (damaged records)
        self.error: BaseException | None = None
        self._index: list[int] | None = None
        self._kept: list[tuple[list[int], dict]] = []  # (the positions a chunk kept, the meta it was written under)
        self.older: list[int] = []  # the items whose kept results an earlier version of the function computed
        self.kw_older = 0
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
        thread_queue("writer").put((self._drain, ()))

    def _drain(self) -> None:
        """Write what is pending, in order (on the writer thread, or the caller's at the end)."""
        with self._write_lock:
            while self._pending:
                self._do(*self._pending.popleft())

    # ------------------------------------------------------------ loading (caller's thread)
    def load(self, iterable: Iterable, name: str, function_key: str, seed: int | None = None,
             code: str | None = None, kw: dict | None = None,
             settings: str | None = None) -> tuple[RunReport, list[int] | None, Any]:
        """The report with what the file holds, the positions left to run (None: all), their items.

        Refused when the file's results were drawn with another ``seed`` (they and the
        new ones would come from two seeds). Nothing is written to the file unless this succeeds.
        ``code`` and ``kw``: the function's code key and the ``--kw`` values' keys (versions.py),
        compared with the file's to say what changed (``function_changed``, ``kw_changed``);
        ``settings``: the library settings the items run under (``settings_words``), compared too.
        """
        try:
            items = materialise(iterable)
            report, missing, todo = self._load(items, name, function_key, seed)
            classes = item_class_keys(item_types(items), stable=True)
            self._compare(function_key, code, kw, classes)
            self._compare_settings(settings)
        except BaseException:
            self._put("close")
            raise
        self._put("meta", {"items": len(items), "function": function_key, "seed": seed, "code": code, "kw": kw,
                           "classes": classes, "settings": settings})
        return report, missing, todo

    def _compare_settings(self, settings: str | None) -> None:
        """Say which kept results were computed under other library settings (decimal, numpy, pandas)."""
        kept = self._kept or []
        other = sorted({i for positions, meta in kept if "settings" in meta and meta["settings"] != settings
                        for i in positions})
        if other:
            self.notes.append(f"the kernel's library settings (decimal context, numpy's print options or error "
                              f"handling, pandas options) changed since {self.path} was written; {len(other):,} "
                              f"results computed under the earlier ones were kept ({items_words(other)})")

    def _compare(self, function_key: str, code: str | None, kw: dict | None, classes: dict | None) -> None:
        """What changed since the file was written: its function (as the user wrote it) or ``--kw`` values.

        The whole function's pickle (``function_key``) also changes with the cell's number and a
        --kw value; files that recorded the code's key and the values' are compared by those.
        """
        # each kept chunk against the meta it was written under: a file several versions wrote
        # holds results of each, whichever wrote it last
        kept = self._kept or [([], self._stored.meta if self._stored is not None else {})]
        older: set[int] = set()
        kw_older = 0
        by_class: set[int] = set()
        changed_classes: set[str] = set()
        for positions, meta in kept:
            was = meta.get("classes") if isinstance(meta.get("classes"), dict) else None
            if was and classes:  # the items' notebook classes, redefined since (versions.class_key)
                differ = {n for n, k in classes.items() if n in was and was[n] != k}
                if differ:
                    changed_classes |= differ
                    by_class.update(positions)
            if "code" in meta and meta["code"] is not None and code is not None:
                if meta["code"] != code:
                    older.update(positions)
                if changed_kw(meta.get("kw"), kw):
                    kw_older += len(positions)
                    if self.kw_changed is None:
                        self.kw_changed = (meta.get("kw"), kw)
            elif "function" in meta and meta["function"] != function_key:  # a file from before 2026-12-07,
                older.update(positions)  # or a callable that is not a plain function
        self.older = sorted(older)
        self.function_changed = bool(older)
        if by_class - older:
            self.notes.append(
                f"the items' class {', '.join(sorted(changed_classes))} changed (a method or a class attribute) since "
                f"{self.path} was written; {len(by_class - older):,} results computed with its earlier version were "
                f"kept ({items_words(sorted(by_class - older))})")
            self.older = sorted(older | by_class)
        self.kw_older = kw_older  # how many kept results other --kw values computed

    def _load(self, items: Any, name: str, function_key: str,
              seed: int | None) -> tuple[RunReport, list[int] | None, Any]:
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
        if "seed" in meta and meta["seed"] != seed and stored.chunks:  # (files before 2026-12 have no seed)
            raise BadInputError(
                f"the checkpoint {self.path!r} holds results drawn with {seed_words(meta['seed'])} and this map "
                f"has {seed_words(seed)}: they and the new ones would come from two seeds. Run it with "
                f"{seed_words(meta['seed'])}, or use another PATH, or delete the file to start over."
            )
        damaged = getattr(stored, "damaged", 0)
        if damaged:
            self.notes.append(f"{damaged:,} checkpoint record{'s were' if damaged != 1 else ' was'} damaged; "
                              f"{'their' if damaged != 1 else 'its'} items ran again")
        if not stored.chunks:
            return RunReport(func_name=name), None, items
        results = [NOT_DONE] * n
        known = bytearray(n * identity.KEY)  # the items' keys where the file holds results (for --resume)
        changed: list[int] = []
        foreign: set = set()  # the tracker ids of classes only the file's kernel defined
        notebook_classes: dict[str, list[int]] = {}  # such a class's name -> the items whose results hold it
        for k, (idx, digest, body, frames) in enumerate(stored.chunks):
            where = f"chunk record {k + 1} of {len(stored.chunks)}"
            try:
                positions = idx if type(idx) is range else list(idx)
                if not positions or min(positions) < 0 or max(positions) >= n:
                    raise IndexError(f"it holds items {min(positions, default='-')}–{max(positions, default='-')}")
                if legacy(digest):
                    raise BadInputError(
                        f"the checkpoint {self.path!r} was written by an earlier poolmagic, which identified items "
                        f"in a way that changes between kernels. Delete it to start over."
                    )
                here = items[idx.start : idx.stop] if type(idx) is range else [items[i] for i in idx]
                # compared as keys: a range written, a list read (or the reverse) are the same items
                was, now = expand(digest), expand(items_hash(here, positions))
                if was != now:
                    if len(was) != len(now):
                        raise ValueError(f"it holds {len(was) // identity.KEY} keys for {len(positions)} items")
                    differ = identity.differing(was, now)
                    if differ:
                        changed += [positions[j] for j in differ]
                        continue
                loader = _ResultsLoader(body, frames, foreign)
                values = loader.load()[0]
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
            self._kept.append(([i for i, v in zip(positions, values) if v is not NOT_DONE], stored.versions[k]))
            for cls in loader.classes:
                notebook_classes.setdefault(cls, []).extend(positions)
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
                f"{differ_message(changed, items)}. Use another PATH, or delete the file to start over."
            )
        for cls, where in notebook_classes.items():
            self.notes.append(
                f"the results of {items_words(sorted(where))} loaded from the checkpoint hold instances of {cls} as "
                f"the kernel that computed them defined it, not of this kernel's {cls}: == and isinstance() with "
                f"it are False. Delete the checkpoint to compute them again with this kernel's class")
        report = continuing(name, n, results, {})
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
        thread_queue("syncer").put((self._sync_and_release, ()))

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


_SKELETONS = {"_make_skeleton_class": (1, 4), "_make_skeleton_enum": (2, 5)}  # (name, tracker id) positions


class _ResultsLoader(pickle.Unpickler):
    """Unpickles a stored chunk, noting the classes its results carry that were pickled by
    value (defined in the notebook) by another kernel: cloudpickle rebuilds each as a new
    class, unlike the one of the same name defined here (``classes``: their names)."""

    def __init__(self, body: Any, frames: list, foreign: set):
        super().__init__(io.BytesIO(body), buffers=frames)
        self.foreign = foreign  # tracker ids not of this kernel, shared by every chunk of a file
        self.classes: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module != "cloudpickle.cloudpickle" or name not in _SKELETONS:
            return found
        at_name, at_id = _SKELETONS[name]

        def make(*args: Any) -> Any:
            tracker = args[at_id]
            if tracker in self.foreign or tracker not in cloudpickle.cloudpickle._DYNAMIC_CLASS_TRACKER_BY_ID:
                self.foreign.add(tracker)
                self.classes.add(str(args[at_name]))
            return found(*args)

        return make


SYNC_AFTER_S = 1.0  # a map that ran this long has its file fsynced when it ends
_OPEN: dict[str, Checkpoint] = {}  # real path -> this kernel's checkpoint writing it


def _forget_in_child() -> None:
    """A forked child writes none of its parent's files."""
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
