"""One ``display_data`` message onto ipykernel's IOPub thread, built with less work.

A warm 4-item ``%%poolmap`` cell spends more on its card's message than on the
map. ``ZMQDisplayPublisher.publish`` builds the nested message (``Session.msg``)
and serializes it (``Session.serialize``): four ``json.dumps`` calls, each
making a new encoder, the cell's parent header among them, packed again for
every display. ``send_display`` sends the same frames (header, parent,
metadata, content, signed as ``Session.sign`` signs them) with the parent
header packed once per header and one JSON encoder reused, to the IOPub
thread's queue, which keeps them in order with everything else the kernel
sends. Cards made in a burst, and the card that ends a cell, share the IOPub
thread's wake-ups (``_Post``).

It only covers the case it reproduces exactly, and says so (returns False)
for anything else, where the caller uses ``publish``: a display publisher
that is not ipykernel's own (``capture_output`` swaps in its own), transform
hooks registered on this thread, stored display history, a session that
debugs, adapts versions or runs in a fork, and data that is not all text
(images would need encoding). An ipywidgets ``Output`` needs nothing more:
the frontend routes by the parent header, which is the same. Tested against
``publish``'s message in a real kernel (tests/e2e/test_card_message.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

_TYPES: tuple | None = None  # (ZMQDisplayPublisher, BackgroundSocket, DELIM, json_packer, json_default, extract_header)


def _kernel_types() -> tuple | None:
    """ipykernel's classes, once, when it is loaded (a terminal never imports it here)."""
    global _TYPES
    if _TYPES is None:
        if "ipykernel.zmqshell" not in sys.modules:
            return None
        try:
            import ipykernel
            from ipykernel.iostream import BackgroundSocket
            from ipykernel.zmqshell import ZMQDisplayPublisher
            from jupyter_client.jsonutil import json_default
            from jupyter_client.session import DELIM, extract_header, json_packer
        except ImportError:
            _TYPES = ()
            return None
        # publish() as in ipykernel 6 and 7 (the e2e test compares the messages)
        ok = 6 <= getattr(ipykernel, "version_info", (0,))[0] <= 7
        _TYPES = (ZMQDisplayPublisher, BackgroundSocket, DELIM, json_packer, json_default, extract_header) if ok else ()
    return _TYPES or None


class _Packing:
    """Per session: the JSON encoder ``json_packer`` makes each call, and the last parent header packed."""

    __slots__ = ("pack", "parent", "parent_copy", "parent_bytes", "empty")

    def __init__(self, session: Any, json_packer: Any, json_default: Any):
        if session.pack is json_packer:
            # json_packer is json.dumps(o, default=json_default, ensure_ascii=False, allow_nan=False),
            # utf-8 encoded: one encoder with those settings makes the same bytes
            enc = json.JSONEncoder(default=json_default, ensure_ascii=False, allow_nan=False).encode

            def pack(obj: Any) -> bytes:
                try:
                    return enc(obj).encode("utf8", errors="surrogateescape")
                except (TypeError, ValueError):
                    return json_packer(obj)  # its own fallback (and warning)
            self.pack = pack
        else:
            self.pack = session.pack
        self.parent: Any = None
        self.parent_copy: Any = None
        self.parent_bytes = b""
        self.empty = self.pack({})

    def parent_packed(self, parent: dict, extract_header: Any) -> bytes:
        """The parent header's bytes, packed again only when it is another (or a changed) header."""
        if parent is not self.parent or parent != self.parent_copy:
            self.parent_bytes = self.pack(extract_header(parent))
            self.parent, self.parent_copy = parent, dict(parent)
        return self.parent_bytes


_PACKING: dict[int, tuple[Any, _Packing]] = {}  # id(session) -> (session, its packing)


def send_display(pub: Any, data: dict, ends_cell: bool = False) -> bool:
    """Send ``data`` as ``pub.publish(data=data, metadata={})`` would, less its stream flush.

    Returns False, having sent nothing, when the case is not one this
    reproduces exactly: the caller then calls ``publish``. ``ends_cell``:
    nothing of the running cell follows (see ``_Post``).
    """
    types = _kernel_types()
    if types is None:
        return False
    zmq_pub, background, delim, json_packer, json_default, extract_header = types
    if type(pub) is not zmq_pub or getattr(pub, "store_display_history", False) or pub._hooks:
        return False
    session, socket = pub.session, pub.pub_socket
    if (session is None or type(socket) is not background or session.debug or session.adapt_version
            or (session.check_pid and os.getpid() != session.pid)):
        return False
    for value in data.values():
        if type(value) is not str:
            return False
    entry = _PACKING.get(id(session))
    if entry is None or entry[0] is not session:
        entry = _PACKING[id(session)] = (session, _Packing(session, json_packer, json_default))
    packing = entry[1]
    pack = packing.pack
    parent = pub.parent_header
    parts = [
        pack(session.msg_header("display_data")),
        packing.parent_packed(parent, extract_header) if parent else packing.empty,
        pack(session.metadata) if session.metadata else packing.empty,
        pack({"data": data, "metadata": {}, "transient": {}}),
    ]
    to_send = [pub.topic, delim, session.sign(parts), *parts]
    copy = max(len(p) for p in to_send) < session.copy_threshold
    io = socket.io_thread
    post = _POSTS.get(id(io))
    if post is None or post.io is not io:
        post = _POSTS[id(io)] = _Post(io)
    post.send(socket, to_send, copy, ends_cell and ENDS_CELL)
    return True


ENDS_CELL = True  # a cell's last card rides on the kernel's end-of-cell flush (tests and benchmarks switch it)


COALESCE_S = 0.02  # cards closer together than this share the IOPub thread's wake-ups (see _Post)


class _Post:
    """Hands frames to ipykernel's IOPub thread: as ``BackgroundSocket.send_multipart``, or in a burst, cheaper.

    Each message is normally a wake-up of the IOPub thread (its event pipe):
    ~70-130 µs of its CPU and GIL, on a 4-item map's critical path. When cards
    come in a burst (a map in a loop: one less than COALESCE_S after the
    last), the card is queued on the thread's event queue without a wake-up,
    once a drain is armed on its loop: the drain, COALESCE_S after it was
    armed, or any earlier wake-up (printed text, any display, the cell's end)
    sends everything queued, in order. Cards stay separate messages in the
    order they were made, before any later output; one in a burst may reach
    the frontend up to COALESCE_S later. A lone card is sent as before,
    unless nothing of its cell follows it (a cell that is one ``%%poolmap``):
    then it is queued without a wake-up too, and ipykernel's flush of
    stdout/stderr when the cell's code ends (a round trip to the IOPub thread
    that the kernel's main thread waits for, before its reply and idle status)
    sends it, the IOPub thread's work overlapping that wait.
    """

    def __init__(self, io: Any):
        self.io = io
        self.last = -1.0  # monotonic time of the last card
        self.armed = False  # a drain is pending on the IOPub thread's loop
        self.ok = all(hasattr(io, a) for a in ("_events", "_event_pipe", "_really_send", "_handle_event",
                                               "io_loop", "thread"))
        self.coalesced = 0  # cards queued without a wake-up (tests read it)
        self.at_cell_end = 0  # of them, cards left to the end-of-cell flush

    def send(self, socket: Any, frames: list, copy: bool, ends_cell: bool = False) -> None:
        """Send ``frames`` through ``socket`` (a BackgroundSocket of this thread), as Session.send would."""
        io = self.io
        now = time.monotonic()
        burst, self.last = now - self.last < COALESCE_S, now
        if ends_cell and self.ok and io.thread.is_alive():
            io._events.append(lambda: io._really_send(frames, copy=copy))
            self.coalesced += 1
            self.at_cell_end += 1
            return
        if not burst or not self.ok or not io.thread.is_alive():
            socket.send_multipart(frames, copy=copy)
            return
        if self.armed:
            io._events.append(lambda: io._really_send(frames, copy=copy))
            if self.armed:  # checked again: a drain that started before the append did not see it
                self.coalesced += 1
                return
            io._event_pipe.send(b"")
            return

        def send_and_arm() -> None:  # on the IOPub thread
            io._really_send(frames, copy=copy)
            if not self.armed:
                try:
                    io.io_loop.call_later(COALESCE_S, self._drain)
                except Exception:  # a loop closing (shutdown): stay unarmed, cards keep their wake-ups
                    return
                self.armed = True
        io.schedule(send_and_arm)

    def _drain(self) -> None:
        """On the IOPub thread: disarm, then send what is queued (the order the event pipe keeps)."""
        self.armed = False
        self.io._handle_event(None)


_POSTS: dict[int, _Post] = {}  # id(IOPubThread) -> its poster
