"""The keys of a map's items, kept on its report for a later ``--resume`` (resume.py).

Every map attaches one; the keys are computed only when needed, on a thread
of their own. What computes them (identity.py, itemkeys.py, threadqueues.py)
is imported then: a map that ends with every result needs none of it, and
``%load_ext`` (cold start) does not import it.
"""
from __future__ import annotations

import threading
from typing import Any

from .engine.core.events import ChunkFinished, LateChunk, MapFinished
from .errors import BadInputError
from .sentinel import NOT_DONE


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
        self.code: str | None = None  # the function's code key (versions.py) when the map ended with items missing
        self.item_classes: dict[str, str] | None = None  # then too: the items' notebook classes, by their keys
        self._types: set[type] = set()  # the classes of a stream's items, as they are hashed
        self._stream = job.source.is_stream
        self._lock = threading.Lock()  # a late chunk is keyed on the backend's thread
        report.identity = self
        job.observers.append(self)

    def __call__(self, event: Any) -> None:
        if type(event) is ChunkFinished:
            if self._stream and event.items is not None:
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
        elif type(event) is LateChunk and self._stream:
            # a result kept after the map ended (a cancel, a failure): its item keyed now, before
            # the result shows (Job.late_results): --resume would compare it with no key
            self._guard(self._add, (event.start, event.items))

    def _put(self, fn: Any, *args: Any) -> None:
        from .threadqueues import thread_queue

        thread_queue("identity").put((self._guard, (fn, args)))

    def _guard(self, fn: Any, args: tuple) -> None:
        from . import identity

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
        from . import identity

        self._types.update(map(type, items))
        keys = identity.keys(items, range(start, start + len(items)) if index is None else index, "--resume")
        with self._lock:
            self._put_keys(start, len(items), keys, index)

    def _put_keys(self, start: int, n: int, keys: bytes, index: Any) -> None:
        from . import identity

        k = identity.KEY
        if index is None:
            if len(self.keys) < (start + n) * k:
                self.keys.extend(bytes((start + n) * k - len(self.keys)))
            self.keys[start * k : (start + n) * k] = keys
        else:
            for j, i in enumerate(index):
                self.keys[i * k : (i + 1) * k] = keys[j * k : (j + 1) * k]

    def _end(self) -> None:
        from . import identity
        from .itemkeys import keys_at

        job = self.job
        r = job.report
        self.code = _code_key(job)
        if r.items is None or r.done < r.items:  # what --resume compares besides the function
            from .versions import item_class_keys, item_types

            self.item_classes = item_class_keys(self._types if job.source.is_stream else item_types(job.source.seq))
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
        got = keys_at(seq, done, "--resume", index)  # only the kept items: a map that failed at once hashes little
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


def _code_key(job: Any) -> str | None:
    """The key of the function the user mapped (not the wrappers --kw and --repeat put around it),
    for --resume to say that the function changed since: as a checkpoint says it."""
    return mapped_code_key(job.func, job.options.kwargs, getattr(job.payload, "digests", None))


def mapped_code_key(func: Any, kwargs: dict | None, digests: dict | None = None) -> str | None:
    """``_code_key`` of the function a map called (``func``, with ``kwargs`` bound by --kw):
    also what ``RunReport.rerun`` compares, to re-run only the version the workers ran.
    ``digests``: big buffers the map's payload hashed already."""
    import functools

    from .checks import NoArgs
    from .versions import code_key

    if isinstance(func, NoArgs):
        func = func.func
    if kwargs and isinstance(func, functools.partial):
        func = func.func
    try:
        # compared in this kernel only; a big array the function reads was hashed by the payload
        return code_key(func, stable=False, digests=digests)
    except Exception:  # (a global that cannot be keyed: code_key says None itself; anything else too)
        return None
