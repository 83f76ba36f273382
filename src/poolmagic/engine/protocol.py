"""The messages between the parent and a worker process, each a named type.

Every message is a NamedTuple, sent as the plain tuple ``(tag, *fields)``
pickled with the plain ``pickle`` module (``encode``), and its fields hold only
builtins (``str``, ``int``, ``bytes``, ``range``, lists, dicts; a map's
MapOptions travel as their own pickle, ``OptionsWire``). Whatever the user owns (items, results, exceptions, the function)
travels inside a message as ``bytes`` and, for big buffers, as raw frames sent
right after it (pickle protocol 5 out-of-band buffers).

That split is what lets a worker's reader thread receive a message without
running user code: unpickling an envelope looks up no class at all. The options
(mapoptions.py, which every worker has already imported) and the user's bytes are
decoded on the worker's main thread only, so two threads never import (numpy, say) at once.

Parent -> worker::

    LoadFunction  a function version, once per worker; ``sizes`` frames follow
                  (or one file descriptor when ``shared``)
    SetContext    a map's process state: cwd, environment, sys.path, native
                  threads; once per worker and context
    RunChunk      items ``start .. start+count-1``; ``sizes`` frames follow

Worker -> parent::

    Ready         the worker has started (a death before it is a failed start)
    Began         the timed chunk ``seq`` started (its timeout counts from now)
    Progress      items of a long chunk finished so far (every PROGRESS_S)
    ChunkDone     results, captured output and errors of ``seq``; ``sizes``
                  frames follow
    ChunkFailed   ``seq`` could not run at all: its context could not be applied
                  (``stage="context"``), its function did not load (``"load"``)
                  or its items did not unpickle (``"decode"``)
    WorkerFailed  the worker cannot go on (its reader failed); it exits next
"""
from __future__ import annotations

import os
import pickle
from typing import Any, NamedTuple, Union

# Buffers below this size stay inside the pickle: a frame costs a system call.
OUT_OF_BAND_MIN = 1 << 16


# ---------------------------------------------------------------- parent -> worker
class LoadFunction(NamedTuple):
    key: str  #: content hash of the pickled function (its version)
    data: bytes  #: cloudpickle of the function, buffers out of band
    sizes: tuple  #: byte size of each out-of-band buffer that follows
    shared: bool  #: the buffers come as one memfd (mapped copy-on-write)


class SetContext(NamedTuple):
    key: str  #: hash of the fields below
    cwd: str  #: the kernel's working directory when the map started
    env: dict  #: the kernel's environment, whole
    sys_path: list  #: the kernel's sys.path
    threads: int | None  #: native thread pool limit (BLAS, OpenMP); None: leave alone


class RunChunk(NamedTuple):
    seq: int  #: the parent's sequence number; replies carry it
    fn: str  #: LoadFunction.key
    ctx: str  #: SetContext.key
    start: int  #: index of the first item
    count: int  #: number of items
    items: Any  #: a ``range`` (sent as is) or the pickled list of items
    sizes: tuple  #: out-of-band buffer frames that follow ``items``
    options: bytes  #: the map's MapOptions (``OptionsWire``), without ``kwargs`` (bound into the function)
    timed: bool  #: time each item (else one time for the chunk)
    indices: tuple | None = None  #: each item's ITERABLE index, when a re-run's positions differ (seeds)
    #: the parent sends this worker nothing more until it answers (its only chunk, no work
    #: left to schedule): the worker needs no reader thread draining its pipe meanwhile
    quiet: bool = False


# ---------------------------------------------------------------- worker -> parent
class Ready(NamedTuple):
    """The worker has started; a death before this is a failure to start, not a crash."""


class Began(NamedTuple):
    seq: int


class Progress(NamedTuple):
    seq: int
    done: int  #: items of the chunk finished so far (a long chunk reports every PROGRESS_S; progress_every)


class ChunkDone(NamedTuple):
    seq: int
    t0: float  #: perf_counter when the chunk started and ended (system-wide clock)
    t1: float
    times: list | None  #: seconds per item when timed
    body: bytes  #: pickled (results, output records, packed errors)
    sizes: tuple  #: out-of-band buffer frames that follow
    modules: dict | None  #: user module files imported so far {name: (path, mtime)}
    recycle: str | None  #: why this worker must be replaced now (it exits next)
    waited: float | None = None  #: seconds the chunk waited for a CPU (Linux schedstat; timed chunks)
    cpu: float | None = None  #: CPU seconds the worker process used running it, native threads included (timed chunks)
    faults: int | None = None  #: page faults of the worker's thread while it ran the items (Linux)


class ChunkFailed(NamedTuple):
    seq: int
    stage: str  #: "context" (cwd, environment), "load" (the function) or "decode" (the items)
    error: dict  #: a packed exception (errors.pack_exception)


class WorkerFailed(NamedTuple):
    error: dict  #: a packed exception; the worker exits after sending this


Message = Union[LoadFunction, SetContext, RunChunk, Ready, Began, Progress, ChunkDone, ChunkFailed, WorkerFailed]
MESSAGES = (LoadFunction, SetContext, RunChunk, Ready, Began, Progress, ChunkDone, ChunkFailed, WorkerFailed)
PROGRESS_S = 0.5  # a chunk running longer reports its finished items this often


def progress_every(timeout: float | None) -> float:
    """How often a running chunk reports its finished items: every PROGRESS_S, and under
    --timeout at least every tenth of it, checked before each item, so the parent's clock
    for each item of a chunk of several starts within that tenth of when the item did."""
    return PROGRESS_S if timeout is None else min(PROGRESS_S, timeout / 10)


_TAG = {cls: tag for tag, cls in enumerate(MESSAGES)}


def encode(msg: Message) -> bytes:
    """A message as it travels: the plain tuple ``(tag, *fields)``, pickled.

    pickle finds a NamedTuple's class by module and name when it writes it and
    again when it reads it; a plain tuple skips both (~3 µs each way, and a
    small map sends and reads four messages on its way).
    """
    return pickle.dumps((_TAG[type(msg)], *msg), protocol=5)


def decode(data: bytes) -> Message:
    """The message ``encode`` made (its fields as sent: nothing else is imported or run)."""
    return from_wire(pickle.loads(data))


def from_wire(fields: tuple) -> Message:
    """``(tag, *fields)`` -> the message it stands for."""
    return _new(MESSAGES[fields[0]], fields[1:])


_new = tuple.__new__  # a NamedTuple from its fields, without its __new__'s argument handling


class OptionsWire:
    """A map's options as RunChunk carries them: pickled once, unpickled once per worker.

    MapOptions is frozen and made once per set of options (``from_kwargs``
    caches it), so both ends key on the last one: the same options, map
    after map, cost neither end a pickle (~2 and ~3 µs of a small map).
    The pair is one attribute, replaced whole: two pools' threads may share it.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple = (None, b"")  # (options, their bytes)

    def dump(self, options: Any) -> bytes:
        """(Parent) the bytes of ``options``."""
        last = self.last
        if last[0] is options:
            return last[1]
        blob = pickle.dumps(options, protocol=5)
        self.last = (options, blob)
        return blob

    def load(self, blob: bytes) -> Any:
        """(Worker) the options of ``blob``."""
        last = self.last
        if last[1] == blob:
            return last[0]
        options = pickle.loads(blob)
        self.last = (options, blob)
        return options


def dumps_oob(obj: Any, dumps: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` with big contiguous buffers left out of band (sent as frames)."""
    frames: list[memoryview] = []

    def keep_big(buf: pickle.PickleBuffer) -> bool:
        try:
            view = buf.raw()
        except BufferError:  # not contiguous: pickle copies it in band
            return True
        if view.nbytes < OUT_OF_BAND_MIN:
            return True
        frames.append(view)
        return False

    return dumps(obj, protocol=5, buffer_callback=keep_big), frames


SOCKET_BUFFER = 4 << 20  # the kernel caps it (net.core.[rw]mem_max) where it must


def widen_buffers(conn: Any) -> None:
    """Let a socket pair carry MBs per system call: 32 MB frames move in ~4 ms, not ~8."""
    import socket

    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return
    with s:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass


def send_frames(conn: Any, frames: list[memoryview]) -> None:
    """Write the frames' bytes raw, right after their message: the sizes it carries frame them."""
    fd = conn.fileno()
    for f in frames:
        view = memoryview(f).cast("B")
        while view:
            view = view[os.write(fd, view):]


def recv_frames(conn: Any, sizes: tuple) -> list[bytearray]:
    """Read frames straight into their final buffers.

    Not ``Connection.recv_bytes_into``: it reads into a BytesIO, then copies
    (~32 ms per 32 MB here); ``readv`` into the buffer takes ~4-8 ms.
    """
    fd = conn.fileno()
    out = []
    for size in sizes:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = os.readv(fd, [view[got:]])
            if not n:
                raise EOFError("the other end closed while sending a frame")
            got += n
        out.append(buf)
    return out
