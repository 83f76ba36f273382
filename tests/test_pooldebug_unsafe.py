"""%pooldebug never re-runs in the kernel what crashed, ran out of memory or timed out (issue 22).

Such an item could end the kernel (os._exit), take its memory, or hold it for
as long as it ran; ``%pooldebug`` says what happened to it instead, and only
``--force`` runs it, a timed-out one under the map's timeout. The crash case
is in tests/e2e/test_pooldebug_kernel.py: run here, it would end pytest.
"""
from __future__ import annotations

import io
import re

import pytest
from IPython.core.error import UsageError

from poolmagic import BadInputError
from poolmagic.errors import ItemTimeoutError, MapFailedError, WorkerMemoryError

pytestmark = pytest.mark.timeout(90)

SLEEPY = (
    "import time, os\n"
    "def sleepy(x):\n"
    "    if x == 1:\n"
    "        open(os.path.join(MARKS, f'ran-{os.getpid()}'), 'w').close()\n"
    "        time.sleep(20)\n"
    "    return x\n"
)


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture
def marks(ip, tmp_path):
    ip.user_ns["MARKS"] = str(tmp_path)
    return tmp_path


def test_a_timed_out_item_is_not_rerun_unless_forced_then_under_its_timeout(ip, marks, monkeypatch, capsys):
    result = ip.run_cell("%%poolmap -q --keep-going --timeout 1 range(3)\n" + SLEEPY)
    assert isinstance(result.error_in_exec, MapFailedError)
    report = ip.user_ns["_poolmap"]
    assert isinstance(report.errors[1], ItemTimeoutError)
    ran_in_workers = {p.name for p in marks.iterdir()}

    with pytest.raises(UsageError) as info:
        ip.run_line_magic("pooldebug", "")
    msg = str(info.value)
    assert "item 1 was not re-run" in msg and "ran longer than the 1 s timeout" in msg, msg
    assert "%pooldebug --force 1" in msg and "under the same timeout" in msg, msg
    with pytest.raises(BadInputError, match="item 1 was not re-run"):
        report.rerun(1)
    assert {p.name for p in marks.iterdir()} == ran_in_workers  # nothing ran here

    # forced: it runs here, is stopped by its timeout, and the debugger opens in sleepy()
    monkeypatch.setattr("sys.stdin", io.StringIO("p x\nq\n"))
    capsys.readouterr()
    ip.run_line_magic("pooldebug", "--force 1")
    out = plain(capsys.readouterr().out)
    assert "ItemTimeoutError" in out and "ran longer than the 1 s timeout here too" in out, out
    assert re.search(r"^> .*\(\d+\)sleepy\(\)", out, re.MULTILINE), out  # the debugger is in the user's frame
    assert f"ran-{__import__('os').getpid()}" in {p.name for p in marks.iterdir()}
    # the alarm is gone: a later sleep is not cut short
    import signal
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(ItemTimeoutError):
        report.rerun(1, force=True)


GROW = (
    "def grows(x):\n"
    "    if x != 1:\n"
    "        return x\n"
    "    import numpy as np, time\n"
    "    held = []\n"
    "    for _ in range(40):\n"
    "        held.append(np.ones(50 * 2**20 // 8))\n"
    "        time.sleep(0.05)\n"
    "    return len(held)\n"
)


def test_an_item_stopped_for_its_memory_is_not_rerun_here(ip):
    pytest.importorskip("numpy")
    result = ip.run_cell("%%poolmap -q --keep-going --max-memory 300MB -c 1 range(3)\n" + GROW)
    assert isinstance(result.error_in_exec, MapFailedError), result.error_in_exec
    report = ip.user_ns["_poolmap"]
    assert isinstance(report.errors[1], WorkerMemoryError)
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("pooldebug", "1")
    msg = str(info.value)
    assert "item 1 was not re-run: it was stopped for its memory in the map" in msg, msg
    assert "limit 300 MB" in msg and "--force 1" in msg and "no memory limit" in msg, msg


def test_an_ordinary_failure_next_to_a_timeout_is_pointed_at(ip, marks):
    body = SLEEPY.replace("    return x\n", "    if x == 2:\n        raise ValueError('two')\n    return x\n")
    ip.run_cell("%%poolmap -q --keep-going --timeout 1 range(3)\n" + body)
    with pytest.raises(UsageError, match=r"item 2 raised an exception you can debug: %pooldebug 2"):
        ip.run_line_magic("pooldebug", "")
    with pytest.raises(UsageError, match=r"takes an item's index and --force"):
        ip.run_line_magic("pooldebug", "--forse 1")
