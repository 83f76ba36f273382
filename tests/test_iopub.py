"""iopub.send_display: publish()'s frames, and publish() itself whenever it would do more.

An ipykernel display publisher on a Session (with a key: messages are signed)
and a BackgroundSocket whose IOPub thread only records what it is given: the
frames ``send_display`` hands over are compared with ``publish``'s, in this
process. tests/e2e/test_card_message.py does the same in a real kernel.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("ipykernel")
from ipykernel.iostream import BackgroundSocket  # noqa: E402
from ipykernel.zmqshell import ZMQDisplayPublisher  # noqa: E402
from jupyter_client.session import Session  # noqa: E402

from poolmagic.iopub import send_display  # noqa: E402

CARD = {"text/plain": "poolmagic: f() · 4 items in 861 µs", "text/html": "<div>poolmagic · <b>f()</b> µs</div>"}


class RecordingIOThread:
    def __init__(self) -> None:
        self.sent: list[tuple[list, dict]] = []

    def send_multipart(self, msg, *args, **kwargs):
        self.sent.append((list(msg), kwargs))


@pytest.fixture
def pub():
    session = Session(key=b"secret", username="u")
    io = RecordingIOThread()
    dp = ZMQDisplayPublisher(session=session, pub_socket=BackgroundSocket(io))
    dp._flush_streams = lambda: None
    dp.set_parent({"header": {"msg_id": "req-1", "msg_type": "execute_request", "username": "u",
                              "session": "s", "date": "2026-12-07T15:00:00Z", "version": "5.4"}})
    dp.io = io
    return dp


def _frames(dp, send) -> list:
    dp.io.sent.clear()
    send()
    (frames, kwargs), = dp.io.sent
    assert kwargs == {"copy": True}
    return frames


def test_frames_are_publishs(pub):
    slow = _frames(pub, lambda: pub.publish(data=CARD, metadata={}))
    fast = _frames(pub, lambda: send_display(pub, CARD))
    assert fast[:2] == slow[:2] == [b"display_data", b"<IDS|MSG>"]
    assert fast[4:] == slow[4:]
    h_slow, h_fast = json.loads(slow[3]), json.loads(fast[3])
    assert list(h_fast) == list(h_slow)
    assert h_fast["msg_id"] != h_slow["msg_id"] and h_fast["session"] == h_slow["session"]
    assert fast[2] == pub.session.sign(fast[3:7])  # signed over the frames sent
    assert json.loads(fast[4])["msg_id"] == "req-1"


def test_parent_changed_in_place_is_packed_again(pub):
    assert send_display(pub, CARD)
    pub.parent_header["msg_id"] = "req-2"  # the same dict, changed
    frames = _frames(pub, lambda: send_display(pub, CARD))
    assert json.loads(frames[4])["msg_id"] == "req-2"
    pub.set_parent({"header": dict(pub.parent_header, msg_id="req-3")})
    assert json.loads(_frames(pub, lambda: send_display(pub, CARD))[4])["msg_id"] == "req-3"


def test_session_metadata_and_no_parent(pub):
    pub.session.metadata = {"origin": "test"}
    pub.set_parent({})
    slow = _frames(pub, lambda: pub.publish(data=CARD, metadata={}))
    fast = _frames(pub, lambda: send_display(pub, CARD))
    assert fast[4:] == slow[4:] and json.loads(fast[5]) == {"origin": "test"}
    assert fast[4] == b"{}"


@pytest.mark.parametrize("case", ["hook", "history", "debug", "adapt", "fork", "image", "other_publisher",
                                  "other_socket"])
def test_anything_else_is_left_to_publish(pub, case):
    """Nothing sent, False returned: the caller then calls publish()."""
    data = dict(CARD)
    if case == "hook":
        pub.register_hook(lambda msg: msg)
    elif case == "history":
        pub.store_display_history = True
    elif case == "debug":
        pub.session.debug = True
    elif case == "adapt":
        pub.session.adapt_version = 4
    elif case == "fork":
        pub.session.pid = -1  # Session.send warns and drops a message from a forked child
    elif case == "image":
        data["image/png"] = b"\x89PNG"
    elif case == "other_publisher":
        sub = type("Sub", (ZMQDisplayPublisher,), {})
        pub = sub(session=pub.session, pub_socket=pub.pub_socket)
        pub.io = pub.pub_socket.io_thread
    elif case == "other_socket":
        pub.pub_socket = pub.io  # a socket-like object that is not ipykernel's BackgroundSocket
    assert send_display(pub, data) is False
    assert pub.io.sent == []


def test_hook_in_another_thread_does_not_apply_here(pub):
    """Hooks are per thread (capture in a thread): one registered elsewhere does not stop this one."""
    import threading

    t = threading.Thread(target=lambda: pub.register_hook(lambda msg: None))
    t.start()
    t.join()
    assert send_display(pub, CARD) is True


class FakeIOPubThread(RecordingIOThread):
    """The parts of ipykernel's IOPubThread that iopub._Post uses, run by hand."""

    def __init__(self) -> None:
        super().__init__()
        import collections
        import threading

        self._events = collections.deque()
        self.wakes = 0
        self.timers: list = []
        self.thread = threading.current_thread()  # alive
        self.io_loop = type("Loop", (), {"call_later": lambda _, delay, f: self.timers.append((delay, f))})()
        self._event_pipe = type("Pipe", (), {"send": lambda _, b: setattr(self, "wakes", self.wakes + 1)})()

    def schedule(self, f):  # ipykernel's: queue it, wake the thread
        self._events.append(f)
        self._event_pipe.send(b"")

    def send_multipart(self, msg, *args, **kwargs):
        self.schedule(lambda: self._really_send(msg, *args, **kwargs))

    def _really_send(self, msg, *args, **kwargs):
        self.sent.append((list(msg), kwargs))

    def _handle_event(self, msg):
        for _ in range(len(self._events)):
            self._events.popleft()()


def test_a_burst_shares_wake_ups_and_keeps_order(pub, monkeypatch):
    import poolmagic.iopub as iopub

    io = FakeIOPubThread()
    pub.pub_socket = BackgroundSocket(io)
    clock = iter([10.0, 10.001, 10.002, 10.003, 10.5, 10.501])
    monkeypatch.setattr(iopub.time, "monotonic", lambda: next(clock))

    def card(n):
        assert send_display(pub, {"text/plain": f"card {n}"})

    def shown():
        return [json.loads(frames[6])["data"]["text/plain"] for frames, _ in io.sent]

    card(0)  # a lone card: woken as before
    assert io.wakes == 1
    card(1)  # a burst starts: sent with a wake-up, and a drain gets armed on the IOPub loop
    assert io.wakes == 2
    io._handle_event(None)
    assert shown() == ["card 0", "card 1"] and len(io.timers) == 1 and io.timers[0][0] == iopub.COALESCE_S
    card(2)  # armed: queued, no wake-up
    card(3)
    assert io.wakes == 2 and len(io._events) == 2 and shown() == ["card 0", "card 1"]
    io.timers.pop()[1]()  # the drain: everything queued, in order
    assert shown() == ["card 0", "card 1", "card 2", "card 3"] and not io._events
    card(4)  # after the burst: a lone card again, woken
    assert io.wakes == 3
    card(5)  # a new burst: the drain was spent, so woken and armed again
    assert io.wakes == 4
    io._handle_event(None)
    assert shown()[-2:] == ["card 4", "card 5"] and len(io.timers) == 1


class FakeShell:
    def __init__(self, code: str, msg_type: str = "execute_request"):
        self.request = {"header": {"msg_type": msg_type}, "content": {"code": code}}

    def get_parent(self):
        return self.request


@pytest.mark.parametrize("code, msg_type, expected", [
    ("%%poolmap -o r range(4)\ndef f(x):\n    return x\n", "execute_request", True),
    ("\n\n%%poolmap range(4)\ndef f(x):\n    return x\n", "execute_request", True),
    ("%%poolmap\n", "execute_request", True),
    ("r = %poolmap -f f range(4)\nprint(r)\n", "execute_request", False),  # more of the cell follows
    ("for _ in range(3):\n    get_ipython().run_cell_magic('poolmap', 'range(4)', 'def f(x): return x')\n",
     "execute_request", False),
    ("%%poolmapper range(4)\n", "execute_request", False),
    ("%%capture\n%%poolmap range(4)\n", "execute_request", False),
    ("%%poolmap range(4)\n", "comm_msg", False),
    ("", "execute_request", False),
])
def test_card_ends_cell_only_for_a_cell_that_is_one_poolmap(code, msg_type, expected):
    from poolmagic.publish import _card_ends_cell

    assert _card_ends_cell(FakeShell(code, msg_type)) is expected


def test_card_ends_cell_not_from_another_thread_or_a_shell_without_a_request():
    import threading

    from poolmagic.publish import _card_ends_cell

    got = []
    t = threading.Thread(target=lambda: got.append(_card_ends_cell(FakeShell("%%poolmap range(4)\n"))))
    t.start()
    t.join()
    assert got == [False]
    assert _card_ends_cell(object()) is False
    shell = FakeShell("%%poolmap range(4)\n")
    shell.request = None
    assert _card_ends_cell(shell) is False


def test_a_cells_last_card_is_queued_for_the_cell_end(pub):
    """ends_cell: queued without a wake-up; the next wake-up (ipykernel's end-of-cell flush) sends it first."""
    io = FakeIOPubThread()
    pub.pub_socket = BackgroundSocket(io)
    assert send_display(pub, {"text/plain": "card"}, ends_cell=True)
    assert io.wakes == 0 and len(io._events) == 1 and io.sent == []
    io.schedule(lambda: io.sent.append((["flush"], {})))  # the kernel's flush of stdout, then its idle status
    io._handle_event(None)
    assert [frames[0] for frames, _ in io.sent] == [b"display_data", "flush"]
