"""A map's card queued on ipykernel's IOPub thread (iopub.py), in a real kernel.

The card must reach the frontend exactly as a normal display would: once,
with the cell as its parent, in order with the cell's text and other
displays, before the cell's "idle", and soon even while the cell runs on;
and IPython's capture and display hooks must still see it.
"""
from __future__ import annotations

import queue
import time

import pytest

from e2e_helpers import kernel_spec_manager  # noqa: F401  (a fixture)
from e2e_helpers import run, run_ok, start_kernel, stop_kernel

pytestmark = pytest.mark.timeout(120)

FUNC = "def f(x):\n    return x\n"


@pytest.fixture(scope="module")
def kc(kernel_spec_manager, tmp_path_factory):
    km, client = start_kernel(kernel_spec_manager, tmp_path_factory.mktemp("iopub"))
    run_ok(client, "%load_ext poolmagic\n%poolsize 2\nimport time")
    run_ok(client, f"%%poolmap range(4)\n{FUNC}", timeout=60)  # warm
    yield client
    stop_kernel(km, client)


def shown(r) -> list[str]:
    """The cell's outputs in order: stream text (joined when adjacent) and card summaries' first lines."""
    out: list[str] = []
    for m in r.msgs:
        if m["msg_type"] == "stream":
            if out and out[-1].startswith("text:"):
                out[-1] += m["content"]["text"]
            else:
                out.append("text:" + m["content"]["text"])
        elif m["msg_type"] == "display_data":
            out.append("card:" + items_of(m["content"]["data"]["text/plain"]))
    return out


def items_of(summary: str) -> str:
    """'poolmagic: f() · 3 items in 374 µs · ...' -> '3 items'."""
    return summary.splitlines()[0].split(" · ")[1].split(" in ")[0]


def magic(line: str) -> str:
    return f"get_ipython().run_cell_magic('poolmap', {line!r}, {FUNC!r})"


def test_a_cell_of_many_maps_shows_each_card_once_in_order_with_its_text(kc):
    code = "\n".join(["print('before')"] + [f"{magic(f'range({n})')}\nprint('after {n}')" for n in range(1, 31)])
    r = run_ok(kc, code, timeout=90)
    want = ["text:before\n"]
    for n in range(1, 31):
        want += [f"card:{n} item{'s' if n != 1 else ''}", f"text:after {n}\n"]
    got = shown(r)
    assert got == want, got
    cards = [m for m in r.msgs if m["msg_type"] == "display_data"]
    assert all(m["parent_header"]["msg_id"] == r.reply["parent_header"]["msg_id"] for m in cards)
    assert len({m["header"]["msg_id"] for m in cards}) == 30
    assert all("text/html" in m["content"]["data"] for m in cards)


def test_a_card_arrives_while_its_cell_still_runs(kc, tmp_path):
    """Nothing else wakes the IOPub thread here: the card must not wait for the cell's end."""
    flag = tmp_path / "seen"
    code = (f"{magic('-o r range(3)')}\n"
            f"import os\n_t = time.monotonic()\n"
            f"while not os.path.exists({str(flag)!r}) and time.monotonic() - _t < 20:\n"
            f"    time.sleep(0.01)\n"
            f"print('seen' if os.path.exists({str(flag)!r}) else 'never')\n")
    msg_id = kc.execute(code)
    deadline = time.monotonic() + 90
    got = None
    while got is None and time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "display_data":
            got = msg
            flag.write_text("1")
    assert got is not None, "the card never arrived"
    assert items_of(got["content"]["data"]["text/plain"]) == "3 items", got["content"]["data"]
    text = ""
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert text == "seen\n", text  # the card came while the cell waited for it


def test_capture_output_and_display_hooks_still_see_the_card(kc):
    r = run_ok(kc, "from IPython.utils.capture import capture_output\n"
                   f"with capture_output() as _c:\n    {magic('-o r range(5)')}\n"
                   "print(len(_c.outputs), _c.outputs[0].data['text/plain'].splitlines()[0].split(' · ')[1])")
    assert [m["msg_type"] for m in r.msgs] == ["stream"], r.msgs  # captured: not published
    assert r.stdout.startswith("1 5 items in"), r.stdout

    r = run_ok(kc, "_seen = []\n"
                   "def _hook(msg):\n    _seen.append(msg['content']['data']['text/plain'])\n    return msg\n"
                   "_pub = get_ipython().display_pub\n_pub.register_hook(_hook)\n"
                   f"try:\n    {magic('-o r range(6)')}\nfinally:\n    _pub.unregister_hook(_hook)\n"
                   "print(len(_seen), _seen[0].splitlines()[0].split(' · ')[1])")
    assert r.stdout.startswith("1 6 items in"), r.stdout
    assert [m["msg_type"] for m in r.msgs] == ["display_data", "stream"], r.msgs


def test_unload_ext_sends_what_is_queued_and_ends_the_cards_thread(kernel_spec_manager, tmp_path):
    km, client = start_kernel(kernel_spec_manager, tmp_path)
    try:
        run_ok(client, "%load_ext poolmagic\n%poolsize 1\nimport threading")
        r = run_ok(client, f"{magic('-o r range(2)')}\nget_ipython().run_line_magic('unload_ext', 'poolmagic')\n"
                           "print(sorted(t.name for t in threading.enumerate() if t.name.startswith('poolmagic')))",
                   timeout=60)
        assert [m["msg_type"] for m in r.msgs] == ["display_data", "stream"], r.msgs
        assert r.stdout == "[]\n", r.stdout
    finally:
        stop_kernel(km, client)
