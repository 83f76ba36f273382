"""%pooldebug after an item that crashed its worker, in a real kernel: the kernel survives (issue 22).

Before, ``%pooldebug`` re-ran the item in the kernel, and ``os._exit(7)``
ended the kernel with status 7. Now it says what happened to the item; only
``%pooldebug --force`` would run it.
"""
from __future__ import annotations

import queue
import time

import pytest

from e2e_helpers import kernel_spec_manager  # noqa: F401  (a fixture)
from e2e_helpers import (Result, alive, collect, evaluate, kernel_pid, process_tree, run, run_ok, start_kernel,
                         stop_kernel, strip_ansi)

pytestmark = pytest.mark.timeout(120)

CRASH = (
    "%%poolmap -q --keep-going -c 1 range(4)\n"
    "import os\n"
    "def crashes(x):\n"
    "    if x == 2:\n"
    "        os._exit(7)\n"
    "    if x == 3:\n"
    "        raise ValueError('three')\n"
    "    return x\n"
)


def test_pooldebug_on_a_crashed_item_says_so_and_the_kernel_lives(kernel_spec_manager, tmp_path):
    km, kc = start_kernel(kernel_spec_manager, tmp_path)
    try:
        kernel = process_tree(kernel_pid(km))[0]
        run_ok(kc, "%load_ext poolmagic\n%poolsize 2")
        r = run(kc, CRASH, timeout=60)
        assert r.error and r.error["ename"] == "MapFailedError", r
        assert evaluate(kc, "type(_poolmap.errors[2]).__name__") == "WorkerCrashedError"

        for line in ("%pooldebug", "%pooldebug 2"):
            r = run(kc, line, timeout=30)
            assert r.error and r.error["ename"] == "UsageError", r
            msg = strip_ansi(r.error["evalue"])
            assert "item 2 was not re-run: it crashed its worker in the map (exit code 7)" in msg, msg
            assert "%pooldebug --force 2" in msg and "%pooldebug 3" in msg, msg
            assert alive(kernel), "the kernel died"

        assert evaluate(kc, "1 + 1") == 2  # the same kernel still answers
        assert alive(kernel) and kernel_pid(km) == kernel.pid
        assert evaluate(kc, "_poolmap.results[:2]") == [0, 1]  # and still holds the map's results
    finally:
        stop_kernel(km, kc)


def test_a_forced_rerun_of_a_timed_out_item_keeps_its_timeout_in_the_kernel(kernel_spec_manager, tmp_path):
    """ipykernel runs cells on its main thread: the SIGALRM time limit works there."""
    km, kc = start_kernel(kernel_spec_manager, tmp_path)
    try:
        run_ok(kc, "%load_ext poolmagic\n%poolsize 2")
        r = run(kc, "%%poolmap -q --keep-going --timeout 1 range(3)\nimport time\n"
                    "def sleepy(x):\n    if x == 1:\n        time.sleep(20)\n    return x\n", timeout=60)
        assert r.error and r.error["ename"] == "MapFailedError", r
        r = run(kc, "%pooldebug", timeout=10)  # refused at once, not 20 s in the kernel
        assert r.error and "ran longer than the 1 s timeout" in strip_ansi(r.error["evalue"]), r
        code = ("try:\n    _poolmap.rerun(1, force=True)\nexcept Exception as e:\n"
                "    print(type(e).__name__, e)\n")
        out = run_ok(kc, code, timeout=15).stdout  # a hang (20 s) would fail here
        assert "ItemTimeoutError item 1 ran longer than the 1 s timeout here too" in out, out
        assert evaluate(kc, "1 + 1") == 2
    finally:
        stop_kernel(km, kc)


def run_with_stdin(kc, code: str, answers: list[str], timeout: float = 30) -> tuple[Result, list[str]]:
    """Execute ``code`` answering each input_request (the debugger's prompt) with the next answer."""
    t0 = time.monotonic()
    msg_id = kc.execute(code, allow_stdin=True)
    prompts: list[str] = []
    answers = list(answers)
    while time.monotonic() - t0 < timeout:
        try:
            request = kc.get_stdin_msg(timeout=0.1)
        except queue.Empty:
            if prompts and not answers:
                break  # all answered: the rest is collect's
            continue
        prompts.append(request["content"]["prompt"])
        kc.input(answers.pop(0) if answers else "q")
    return collect(kc, msg_id, timeout, t0), prompts


def test_pooldebug_drops_into_the_debugger_on_the_failed_item_in_a_real_kernel(kernel_spec_manager, tmp_path):
    """The debugger opens in the item that failed, at its raise line, with its locals; it is
    driven through the kernel's stdin channel as a notebook frontend does."""
    km, kc = start_kernel(kernel_spec_manager, tmp_path)
    try:
        run_ok(kc, "%load_ext poolmagic\n%poolsize 2")
        # one chunk: items 0-2 finish before item 3 fails (in chunks of one, a fail-fast map could end
        # before an earlier item's result landed: it lands later, after this test looked)
        r = run(kc, "%%poolmap -q -c 5 range(5)\ndef work(x):\n    y = x * 10\n    if x == 3:\n"
                    "        raise ValueError(f'bad {x}')\n    return y\n", timeout=30)
        assert r.error and r.error["ename"] == "ValueError", r
        r, prompts = run_with_stdin(kc, "%pooldebug", ["p (x, y)", "q"])
        assert r.status == "ok", r
        assert prompts[:2] == ["ipdb> ", "ipdb> "], prompts
        out = strip_ansi(r.stdout)
        assert "(3, 30)" in out and "raise ValueError(f'bad {x}')" in out, out
        shown = [(m["content"]["ename"], m["content"]["evalue"]) for m in r.msgs if m["msg_type"] == "error"]
        assert shown == [("ValueError", "bad 3")], shown  # the traceback shown above the debugger
        assert evaluate(kc, "_poolmap.results[:3]") == [0, 10, 20]  # the kernel answers, the map's results kept
    finally:
        stop_kernel(km, kc)
