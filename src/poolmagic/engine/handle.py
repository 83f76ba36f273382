"""The parent's handle on one worker process: its pipe, its chunks, its caches.

Speaks the wire protocol (protocol.py) for one worker: sends functions and
contexts once per version, chunks with big buffers out of band, reads the
replies, and kills the worker's whole process group. It decides nothing;
the supervisor (local.py) does.
"""
from __future__ import annotations

import os
import pickle
import signal
import time
from collections import OrderedDict, deque
from multiprocessing import reduction
from typing import Any, Callable

import cloudpickle

from . import protocol as P
from .core.inflight import Chunk
from .core.runchunk import CACHE_SIZE

_OPTIONS = P.OptionsWire()  # the last map's options and their bytes
SHARED_MIN_BYTES = 1 << 20  # a function's buffers above this go to all workers through shared memory

__all__ = ["SHARED_MIN_BYTES", "Chunk", "WorkerHandle", "kill_group"]  # Chunk: its old path (dask imports it here)


class WorkerHandle:
    """One worker process as the supervisor sees it."""

    def __init__(self, slot: int, proc: Any, conn: Any):
        self.slot, self.proc, self.conn = slot, proc, conn
        self.pid: int = proc.pid
        self.sentinel: int = proc.sentinel
        self.inflight: deque[Chunk] = deque()
        self.fns: OrderedDict[str, None] = OrderedDict()
        self.contexts: OrderedDict[str, None] = OrderedDict()
        self.head_started = time.perf_counter()
        self.head_begun = False  # the worker said it started the head chunk
        self.modules: dict[str, tuple[str, int]] = {}
        self.stale = False  # replace when idle (user modules changed on disk)
        self.retiring: str | None = None  # it said it exits after its chunk, and why
        self.failure: BaseException | None = None  # what its reader thread failed on
        self.ready = False  # it said it started

    # ------------------------------------------------------------ sending
    def encode_chunk(self, seq: int, job: Any, start: int, items: Any, timed: bool,
                     quiet: bool = False) -> tuple[bytes, list]:
        """The RunChunk bytes and the out-of-band frames that follow them.

        Raises if the items do not pickle. Big item buffers (arrays of MBs)
        go through the socket as raw frames, read by the worker straight into
        their final buffer: 16 items of 32 MB in 0.16 s, where copying them
        into a memfd for the worker to map took 0.32 s (docs/design.md).
        """
        frames: list = []
        if type(items) is range:
            blob = items  # plain pickle knows ranges: no cloudpickle Pickler (~6 µs)
        else:
            # anything else may hold notebook-defined classes, pickled by value
            blob, frames = P.dumps_oob(items, cloudpickle.dumps)
        msg = P.RunChunk(seq, job.payload.key, job.context.key, start, len(items), blob,
                         tuple(f.nbytes for f in frames), _OPTIONS.dump(job.wire_options), timed,
                         job.seed_indices(start, len(items)), quiet)
        return P.encode(msg), frames

    def send_chunk(self, chunk: Chunk, data: bytes, frames: list, shared_fd: Callable[[Any], int | None]) -> None:
        """Send the chunk, and its function and context first if this worker lacks them.

        The chunk counts as this worker's from the start: if a send fails, the
        worker's death hands it back to its job.
        """
        job = chunk.job
        if not self.inflight:
            self.head_started = time.perf_counter()
            self.head_begun = False
        self.inflight.append(chunk)
        if job.payload.key not in self.fns:
            self._send_function(job.payload, shared_fd(job.payload))
        if job.context.key not in self.contexts:
            self.conn.send_bytes(P.encode(job.context))
            _remember(self.contexts, job.context.key)
        self.conn.send_bytes(data)
        P.send_frames(self.conn, frames)

    def _send_function(self, payload: Any, fd: int | None) -> None:
        sizes = tuple(b.nbytes for b in payload.buffers)
        self.conn.send_bytes(P.encode(P.LoadFunction(payload.key, payload.data, sizes, fd is not None)))
        if fd is not None:  # one shared copy for all workers: pass the descriptor
            reduction.send_handle(self.conn, fd, self.pid)
        else:
            P.send_frames(self.conn, payload.buffers)
        _remember(self.fns, payload.key)

    # ------------------------------------------------------------ receiving
    def read(self) -> tuple[Any, list | None]:
        """One message and its frames; raises EOFError/OSError when the worker is gone."""
        msg = P.decode(self.conn.recv_bytes())
        frames = P.recv_frames(self.conn, msg.sizes) if type(msg) is P.ChunkDone and msg.sizes else None
        return msg, frames

    def pending(self) -> bool:
        return self.conn.poll()

    @staticmethod
    def results(msg: P.ChunkDone, frames: list | None) -> tuple[list, list, list]:
        """(results, output records, packed errors); may raise if they do not unpickle here."""
        return pickle.loads(msg.body, buffers=frames)

    def pop_head(self) -> Chunk:
        chunk = self.inflight.popleft()
        self.head_started = time.perf_counter()
        self.head_begun = False
        return chunk

    def began(self, seq: int) -> None:
        """A timed chunk really started: its timeout counts from now."""
        if self.inflight and self.inflight[0].seq == seq:
            self.head_started = time.perf_counter()
            self.head_begun = True

    # ------------------------------------------------------------ ending
    def kill(self) -> None:
        """Kill the worker and every process in its group (what its function started)."""
        kill_group(self.pid)
        try:
            self.proc.kill()
            self.proc.join(2)
        except Exception:
            pass

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.proc.close()
        except (ValueError, AttributeError):
            pass


def kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid`` (a worker leads its own); no error if it is gone.

    Safe after the leader was reaped: Linux does not reuse a pid while a
    process group of that number still has members.
    """
    if hasattr(os, "killpg"):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def _remember(cache: OrderedDict, key: str) -> None:
    cache[key] = None
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
