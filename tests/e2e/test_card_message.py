"""The summary card's message in a real kernel: built by iopub.py, it must be publish()'s.

``iopub.send_display`` builds the card's ``display_data`` itself (cheaper than
``ZMQDisplayPublisher.publish``). These tests hold it to publish()'s message
byte for byte (but for the new message id and date), to its order after
printed text, and to what captures it: ``capture_output`` and an ipywidgets
``Output`` (executed by nbclient, which keeps the widget's outputs as a
frontend does).
"""
from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from e2e_helpers import kernel_spec_manager  # noqa: F401  (a fixture)
from e2e_helpers import collect, evaluate, new_kernel_manager, run_ok, start_kernel, stop_kernel

pytestmark = pytest.mark.timeout(60)

FUNC = "def f(x):\n    return x\n"

# In the kernel: record the frames every display sends, and which path each card took.
SPY = """\
import json
import poolmagic.iopub as _iopub
_real_send = _iopub.send_display
_fast = []
def _spy(pub, data, *args):
    sent = _real_send(pub, data, *args)
    _fast.append(sent)
    return sent
_iopub.send_display = _spy
"""


@pytest.fixture(scope="module")
def kc(kernel_spec_manager, tmp_path_factory):
    km, kc = start_kernel(kernel_spec_manager, tmp_path_factory.mktemp("card"))
    run_ok(kc, "%load_ext poolmagic\n%poolsize 2")
    run_ok(kc, SPY)
    run_ok(kc, f"%%poolmap -o r range(4)\n{FUNC}")
    yield kc
    stop_kernel(km, kc)


def test_card_frames_are_publishs(kc):
    """Same topic, parent, metadata and content bytes as publish(); a header of the same form."""
    code = """\
import time
from ipykernel.iostream import IOPubThread
_frames = []
_orig = IOPubThread._really_send
def _record(self, msg, *args, **kwargs):  # on the IOPub thread: what reaches its socket
    _frames.append([bytes(p) for p in msg])
    return _orig(self, msg, *args, **kwargs)
IOPubThread._really_send = _record
try:
    _dp = get_ipython().display_pub
    _b = _poolmap._repr_mimebundle_()
    _dp.publish(data=_b, metadata={})
    _ok = _real_send(_dp, _b)
    _t = time.monotonic()
    while len([f for f in _frames if f[0] == b"display_data"]) < 2 and time.monotonic() - _t < 10:
        time.sleep(0.01)
finally:
    IOPubThread._really_send = _orig
_shown = [f for f in _frames if f[0] == b"display_data"]
print(json.dumps({"ok": _ok, "frames": [[p.decode() for p in f] for f in _shown]}))
"""
    r = run_ok(kc, code)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ok"] is True
    slow, fast = got["frames"]
    assert len(slow) == len(fast) == 7
    assert slow[1] == fast[1] == "<IDS|MSG>"
    assert fast[4:] == slow[4:]  # parent header, metadata, content: the same bytes
    h_slow, h_fast = json.loads(slow[3]), json.loads(fast[3])
    assert list(h_fast) == list(h_slow)
    assert {k: v for k, v in h_fast.items() if k not in ("msg_id", "date")} == \
        {k: v for k, v in h_slow.items() if k not in ("msg_id", "date")}
    assert h_fast["msg_id"] != h_slow["msg_id"]
    assert json.loads(fast[6])["data"]["text/plain"].startswith("poolmagic: f()")
    # both arrived, signed (the client checks), under this cell's request
    shown = [m for m in r.msgs if m["msg_type"] == "display_data"]
    assert len(shown) == 2 and shown[0]["content"] == shown[1]["content"]
    assert shown[0]["parent_header"] == shown[1]["parent_header"]
    assert shown[0]["parent_header"]["msg_id"] == r.reply["parent_header"]["msg_id"]


def test_card_sent_fast_after_flushed_text(kc):
    """Text already flushed: the card takes the fast path, and still comes after the text."""
    run_ok(kc, "_fast.clear()")
    r = run_ok(kc, f"%%poolmap -o r range(4)\nimport sys\nprint('body', flush=True)\n{FUNC}")
    kinds = [m["msg_type"] for m in r.msgs if m["msg_type"] in ("stream", "display_data")]
    assert kinds == ["stream", "display_data"], kinds
    card = r.msgs[[m["msg_type"] for m in r.msgs].index("display_data")]
    assert card["content"]["data"]["text/plain"].startswith("poolmagic: f() · 4 items")
    assert card["content"]["metadata"] == {} and card["content"]["transient"] == {}
    assert card["parent_header"]["msg_id"] == r.reply["parent_header"]["msg_id"]
    assert evaluate(kc, "_fast") == [True]
    # a second card in the same cell: the parent header packed once serves it too
    r = run_ok(kc, "for _ in range(2):\n"
                   f"    get_ipython().run_cell_magic('poolmap', '-o r range(4)', {FUNC!r})")
    cards = [m for m in r.msgs if m["msg_type"] == "display_data"]
    assert len(cards) == 2
    assert all(c["parent_header"]["msg_id"] == r.reply["parent_header"]["msg_id"] for c in cards)


def test_capture_output_still_captures_the_card(kc):
    """capture_output() swaps the display publisher: the card goes to it, not to the frontend."""
    run_ok(kc, "_fast.clear()")
    r = run_ok(kc, (
        "from IPython.utils.capture import capture_output\n"
        "with capture_output() as _cap:\n"
        f"    get_ipython().run_cell_magic('poolmap', '-o r range(4)', {FUNC!r})\n"
        "print(json.dumps([o.data.get('text/plain', '') for o in _cap.outputs]))\n"
    ))
    captured = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(captured) == 1 and captured[0].startswith("poolmagic: f() · 4 items"), captured
    assert not [m for m in r.msgs if m["msg_type"] == "display_data"]
    assert True not in evaluate(kc, "_fast")  # publish(), the capturing one


def test_output_widget_still_captures_the_card(kernel_spec_manager):
    """An ipywidgets Output takes the card (nbclient keeps its outputs as a frontend does)."""
    pytest.importorskip("ipywidgets")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(f"%load_ext poolmagic\n%poolsize 2\n{SPY}"),
        nbformat.v4.new_code_cell(f"%%poolmap -o r range(4)\n{FUNC}"),  # warm
        nbformat.v4.new_code_cell(
            "import ipywidgets as w\n_fast.clear()\nout = w.Output()\ndisplay(out)\nwith out:\n"
            f"    get_ipython().run_cell_magic('poolmap', '-o r range(4)', {FUNC!r})\n"),
        nbformat.v4.new_code_cell("print(_fast)"),
    ]
    km = new_kernel_manager(kernel_spec_manager)
    NotebookClient(nb, km=km, timeout=60, store_widget_state=True).execute()
    cell = nb.cells[2]
    assert not [o for o in cell.outputs if o.output_type == "display_data"
                and o.data.get("text/plain", "").startswith("poolmagic:")], cell.outputs
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    outs = [m["state"].get("outputs", []) for m in state.values() if m["model_name"] == "OutputModel"]
    assert len(outs) == 1
    assert [o["data"]["text/plain"][:24] for o in outs[0]] == ["poolmagic: f() · 4 items"], outs
    assert nb.cells[3].outputs[0].text.strip() == "[True]"  # the card took the fast path


def test_cards_of_a_burst_arrive_while_the_cell_runs(kc, tmp_path):
    """Maps in a loop share the IOPub thread's wake-ups, yet every card reaches the frontend
    while the cell still runs (the drain armed on the IOPub loop sends them), in order."""
    go = tmp_path / "go"
    code = (
        "import os, time\n"
        "_before = sum(p.coalesced for p in _iopub._POSTS.values())\n"
        "for _ in range(20):\n"
        f"    get_ipython().run_cell_magic('poolmap', '-o r range(4)', {FUNC!r})\n"
        "_t = time.monotonic()\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() - _t < 30:\n"
        "    time.sleep(0.01)\n"
        f"print('go' if os.path.exists({str(go)!r}) else 'no go', "
        "sum(p.coalesced for p in _iopub._POSTS.values()) - _before)\n"
    )
    msg_id = kc.execute(code)
    cards = []
    while len(cards) < 20:  # the cell waits for the file: the cards must come before it ends
        msg = kc.get_iopub_msg(timeout=20)
        if msg["parent_header"].get("msg_id") == msg_id:
            assert msg["msg_type"] != "stream", msg  # nothing printed before all cards came
            if msg["msg_type"] == "display_data":
                cards.append(msg)
    go.write_text("")
    r = collect(kc, msg_id, 40)
    assert r.status == "ok", repr(r)
    said, coalesced = r.stdout.split()
    assert said == "go"
    assert int(coalesced) > 0  # the burst did share wake-ups
    assert all(c["content"]["data"]["text/plain"].startswith("poolmagic: f() · 4 items") for c in cards)
    ids = [c["header"]["msg_id"] for c in cards]
    assert ids == sorted(ids, key=lambda i: int(i.rsplit("_", 1)[1]))  # sent in the order they were made


def test_a_poolmap_cells_card_goes_with_the_cell_end(kc):
    """A cell that is one %%poolmap: its card waits for ipykernel's end-of-cell flush, and still comes
    before the cell's value and its idle status, under the cell's request."""
    before = evaluate(kc, "sum(p.at_cell_end for p in _iopub._POSTS.values())")
    r = run_ok(kc, f"%%poolmap range(4)\n{FUNC}")
    kinds = [m["msg_type"] for m in r.msgs if m["msg_type"] in ("stream", "display_data", "execute_result")]
    assert kinds == ["display_data", "execute_result"], kinds
    card = r.msgs[[m["msg_type"] for m in r.msgs].index("display_data")]
    assert card["content"]["data"]["text/plain"].startswith("poolmagic: f() · 4 items")
    assert card["parent_header"]["msg_id"] == r.reply["parent_header"]["msg_id"]
    assert r.value == "[0, 1, 2, 3]"
    assert evaluate(kc, "sum(p.at_cell_end for p in _iopub._POSTS.values())") == before + 1
    # a failing map's card: before the cell's error
    r = collect(kc, kc.execute("%%poolmap range(4)\ndef g(x):\n    return 1 / (x - 2)\n"), 30)
    kinds = [m["msg_type"] for m in r.msgs if m["msg_type"] in ("display_data", "error")]
    assert kinds == ["display_data", "error"], kinds
    assert evaluate(kc, "sum(p.at_cell_end for p in _iopub._POSTS.values())") == before + 2


def _items_of(summary: str) -> str:
    """'poolmagic: f() · 3 items in 374 µs · ...' -> '3 items'."""
    return summary.splitlines()[0].split(" · ")[1].split(" in ")[0]


def test_a_burst_of_cards_between_prints_keeps_every_output_once_and_in_order(kc):
    """30 maps in one cell, each followed by a print: each card must leave after the text
    printed before it (still buffered: the card flushes it) and before the text after it,
    whichever way the card is sent; each once, with the cell as its parent."""
    magic = "get_ipython().run_cell_magic('poolmap', {!r}, " + repr(FUNC) + ")"
    code = "\n".join(["print('before')"] + [f"{magic.format(f'range({n})')}\nprint('after {n}')"
                                            for n in range(1, 31)])
    r = run_ok(kc, code, timeout=50)
    got: list[str] = []
    for m in r.msgs:
        if m["msg_type"] == "stream":
            if got and got[-1].startswith("text:"):
                got[-1] += m["content"]["text"]
            else:
                got.append("text:" + m["content"]["text"])
        elif m["msg_type"] == "display_data":
            got.append("card:" + _items_of(m["content"]["data"]["text/plain"]))
    want = ["text:before\n"]
    for n in range(1, 31):
        want += [f"card:{n} item{'s' if n != 1 else ''}", f"text:after {n}\n"]
    assert got == want, got
    cards = [m for m in r.msgs if m["msg_type"] == "display_data"]
    assert all(m["parent_header"]["msg_id"] == r.reply["parent_header"]["msg_id"] for m in cards)
    assert len({m["header"]["msg_id"] for m in cards}) == 30
