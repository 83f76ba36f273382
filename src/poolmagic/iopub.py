"""A summary card queued on ipykernel's IOPub thread without waking it for each card.

Every IOPub message a kernel sends wakes its IOPub thread (a tornado loop):
in a cell that maps in a loop, that wake-up alone cost the next map ~0.1 ms
(the thread's Python work competes with the caller's for the GIL and the
cores), and building and signing the message ~0.1 ms more on the cell's
thread (docs/design.md, "The card's cost in a warm cell").

So a card's message is queued on that thread's event queue, in order with
everything else the kernel sends, and is sent when the thread next wakes:
for the kernel's next message (the cell's printed text, another display, the
"idle" status at the end of the cell, which always follows) or, at the
latest, FLUSH_S later, woken by a thread of ours that sleeps meanwhile. The
card's content is fixed when it is queued; only the signing and the socket
write move to the IOPub thread. Whatever this does not recognise (another
kernel, an ipykernel without these internals, display hooks such as an
ipywidgets Output capturing the cell) goes through IPython's normal publish.
"""
from __future__ import annotations

import threading
import time
from typing import Any

FLUSH_S = 0.02  # a queued card is sent this long after it was queued, at the latest


class _ToSocket:
    """What ``Session.send`` writes to: ipykernel's own send, on its IOPub thread."""

    __slots__ = ("io",)

    def __init__(self, io: Any) -> None:
        self.io = io

    def send_multipart(self, parts: list, **kwargs: Any) -> None:
        self.io._really_send(parts, **kwargs)


class QueuedCards:
    """Queues display messages on one kernel's IOPub thread; a daemon thread bounds their delay."""

    def __init__(self, io: Any) -> None:
        self.io = io
        self.out = _ToSocket(io)
        self.queued = threading.Event()  # a card waits for the IOPub thread's next wake
        self.stopping = False
        self.thread = threading.Thread(target=self._flush_after, name="poolmagic-card", daemon=True)
        self.thread.start()

    @staticmethod
    def usable(pub: Any) -> Any:
        """The IOPub thread ``pub`` (a display publisher) sends through, if cards can be queued on it."""
        if getattr(pub, "_hooks", None) or getattr(pub, "store_display_history", False):
            return None  # something must see (or keep) each message as it is published
        io = getattr(getattr(pub, "pub_socket", None), "io_thread", None)
        if io is None or getattr(pub, "session", None) is None:
            return None
        if not all(hasattr(io, a) for a in ("_events", "_really_send", "schedule", "thread", "closed")):
            return None
        thread = io.thread
        if thread is None or not thread.is_alive() or io.closed:
            return None
        return io

    def send(self, pub: Any, data: dict) -> None:
        """Queue a ``display_data`` of ``data`` for the cell now running (its parent, header and time are now's)."""
        session = pub.session
        parent = pub.parent_header
        header = session.msg_header("display_data")
        content = {"data": data, "metadata": {}, "transient": {}}
        topic, io, out = pub.topic, self.io, self.out

        def really_send() -> None:
            if not io.closed:
                session.send(out, session.msg("display_data", content, parent=parent, header=header), ident=topic)

        io._events.append(really_send)  # after what was scheduled before it, before what follows
        if not self.queued.is_set():
            self.queued.set()

    def _flush_after(self) -> None:
        """Wake the IOPub thread FLUSH_S after a card was queued (if nothing else did meanwhile)."""
        io = self.io
        while True:
            self.queued.wait()
            if not self.stopping:
                time.sleep(FLUSH_S)
            self.queued.clear()  # cards queued from now on wait for the next round
            if io.closed or not io.thread.is_alive():
                return
            io.schedule(_nothing)  # its wake sends everything queued before, in order
            if self.stopping:
                return

    def stop(self) -> None:
        """Send what is queued now and end the thread (the extension is unloaded)."""
        self.stopping = True
        self.queued.set()
        self.thread.join(1)


def _nothing() -> None:
    pass


_queues: dict[int, QueuedCards] = {}


def queue_card(pub: Any, data: dict) -> bool:
    """Queue ``data`` as a display on ``pub``'s kernel, if that is possible there; else False."""
    io = QueuedCards.usable(pub)
    if io is None:
        return False
    q = _queues.get(id(io))
    if q is None or q.io is not io:
        q = _queues[id(io)] = QueuedCards(io)
    q.send(pub, data)
    return True


def stop_queues() -> None:
    """Send every queued card now and end the threads that bound their delay."""
    while _queues:
        _queues.popitem()[1].stop()
