"""Long maps lose nothing, for real: --retries, %pooldebug, rerun() (--resume: test_resume.py,
--checkpoint: test_checkpointing.py).

Every test runs real worker processes. Which items a map ran is counted
through files the mapped function appends to (``log_call``): a line per call,
so "ran exactly items 3 and 7" is read from the file, not inferred from timing.

Functions mapped from this module are pickled *by value*, like notebook code
(workers never import this module). Cells run through the session's real
InteractiveShell (``ip``); each such test names its function uniquely, because
``--resume`` remembers runs by (function, ITERABLE).
"""
from __future__ import annotations

import io
import os
import random
import re
import sys

import cloudpickle
import numpy as np
import pytest

from longrun_helpers import attempts_of, calls, log_call, plain, pool  # noqa: F401  (pool: the module's warm pool, a fixture)
from IPython.core.error import UsageError

import poolmagic
import poolmagic.api
from poolmagic import BadInputError, MapFailedError, Pool, WorkerCrashedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ================================================================ 1. retries


def crash_first_attempt(x, folder):
    """Item 3's first attempt kills its worker; the marker says "already tried"."""
    log_call(os.path.join(folder, "calls"), x)
    marker = os.path.join(folder, f"tried-{x}")
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()  # before dying: the retry must see it
        os._exit(1)
    return x * x


@pytest.mark.timeout(60)
def test_retry_recovers_an_item_whose_first_attempt_kills_its_worker(pool, tmp_path):
    # chunks of one item: the crash is charged to item 3 itself (a bigger chunk
    # is first re-run item by item to find the culprit, which is not a retry)
    r = pool.run(crash_first_attempt, range(8), retries=1, chunksize=1, kwargs={"folder": str(tmp_path)})
    assert r.results == [x * x for x in range(8)]
    assert r.errors == {}
    assert r.retried >= 1
    assert "retried" in r.summary(), r.summary()
    made = calls(tmp_path / "calls")
    assert made.count(3) == 2, made  # the crashed attempt and the retry
    assert sorted(set(made)) == list(range(8))

    # the same crash without --retries fails item 3 (the control: the retry is what saved it)
    (tmp_path / "tried-3").unlink()
    with pytest.raises(WorkerCrashedError) as info:
        pool.run(crash_first_attempt, range(8), chunksize=1, kwargs={"folder": str(tmp_path)})
    assert info.value.poolmap_report.retried == 0
    assert 3 in info.value.poolmap_report.errors


def always_connection_error(x, path):
    log_call(path, x)
    if x == 1:
        raise ConnectionError(f"no route for {x}")
    return x


@pytest.mark.timeout(60)
def test_retries_exhausted_raise_the_error_with_every_attempt(pool, tmp_path):
    path = str(tmp_path / "calls")
    with pytest.raises(ConnectionError) as info:
        pool.run(always_connection_error, range(4), retries=2, kwargs={"path": path})
    exc = info.value
    notes = "\n".join(getattr(exc, "__notes__", []))
    assert "failed after 3 attempts" in notes, notes
    report = exc.poolmap_report
    assert len(report.attempts[1]) == 3, report.attempts
    assert all(isinstance(e, ConnectionError) for e in report.attempts[1]), report.attempts
    assert report.retried == 2
    assert calls(path).count(1) == 3, calls(path)


def zero_division_once(x, path):
    log_call(path, x)
    if x == 2:
        return 1 / 0
    return x


@pytest.mark.timeout(60)
def test_retry_on_leaves_other_exceptions_alone(pool, tmp_path):
    path = str(tmp_path / "calls")
    with pytest.raises(ZeroDivisionError) as info:
        pool.run(zero_division_once, range(4), retries=3, retry_on=(ConnectionError,), kwargs={"path": path})
    report = info.value.poolmap_report
    assert report.retried == 0
    assert report.attempts == {}
    assert calls(path).count(2) == 1, calls(path)
    assert "attempts" not in "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.timeout(60)
def test_magic_retries_with_retry_on(ip, tmp_path):
    ip.user_ns["RETRY_CALLS"] = str(tmp_path / "calls")
    body = (
        "def retry_magic_flaky(x):\n"
        "    log_call(RETRY_CALLS, x)\n"
        "    n = attempts_of(RETRY_CALLS, x)\n"
        "    if x == 1 and n < 2:\n"
        "        raise TimeoutError('slow upstream')\n"
        "    if x == 4 and n < 3:\n"
        "        raise ConnectionError('reset')\n"
        "    return x + 100\n"
    )
    ip.user_ns.update(log_call=log_call, attempts_of=attempts_of)
    out = ip.run_cell_magic("poolmap", "-q --retries 2 --retry-on ConnectionError,TimeoutError -c 1 range(6)", body)
    assert out == [x + 100 for x in range(6)]
    report = ip.user_ns["_poolmap"]
    assert report.retried == 3, report.retried  # item 1 once, item 4 twice
    made = calls(tmp_path / "calls")
    assert made.count(1) == 2 and made.count(4) == 3, made

    with pytest.raises(UsageError, match="NotAClass"):
        ip.run_cell_magic("poolmap", "-q --retries 2 --retry-on NotAClass range(3)", "def retry_bad(x):\n    return x\n")
    with pytest.raises(UsageError, match="exception classes"):
        ip.run_cell_magic("poolmap", "-q --retries 2 --retry-on len range(3)", "def retry_bad(x):\n    return x\n")


# ================================================================ 5. %pooldebug and rerun()


DEBUG_BODY = (
    "def {name}(x):\n"
    "    y = x * 10\n"
    "    if x in (2, 4):\n"
    "        raise ValueError(f'bad item {{x}}')\n"
    "    return y\n"
)


def _debug(ip, monkeypatch, capsys, arg: str, commands: str = "p y\np x\nq\n") -> list[str]:
    """%pooldebug ARG with debugger commands on stdin; the output lines, without color."""
    monkeypatch.setattr("sys.stdin", io.StringIO(commands))
    capsys.readouterr()
    ip.run_line_magic("pooldebug", arg)
    return plain(capsys.readouterr().out).splitlines()


def _printed(lines: list[str], value: str) -> bool:
    """The debugger printed ``value`` on a line of its own (after its prompt, if echoed)."""
    return any(re.fullmatch(rf"(ipdb>\s*)*{re.escape(value)}", line.strip()) for line in lines)


@pytest.mark.timeout(60)
def test_pooldebug_opens_the_debugger_in_the_failed_item(ip, monkeypatch, capsys):
    result = ip.run_cell("%%poolmap --keep-going range(6)\n" + DEBUG_BODY.format(name="dbg_work"))
    assert isinstance(result.error_in_exec, MapFailedError)

    lines = _debug(ip, monkeypatch, capsys, "")
    assert _printed(lines, "20") and _printed(lines, "2"), lines  # y and x of item 2, the first failed
    text = "\n".join(lines)
    assert "raise ValueError" in text, text
    # the debugger stops in the user's function, at its raise line (line 4 of the cell)
    assert re.search(r"^> .*\(4\)dbg_work\(\)", text, re.MULTILINE), text
    assert "ValueError" in text and "bad item 2" in text, text

    lines = _debug(ip, monkeypatch, capsys, "4  # the other one")  # a comment, as in %poolsize
    assert _printed(lines, "40") and _printed(lines, "4"), lines
    assert not _printed(lines, "20"), lines

    lines = _debug(ip, monkeypatch, capsys, "1", commands="q\n")
    assert any("ran without an error" in line for line in lines), lines

    with pytest.raises(UsageError, match=r"6 items"):
        ip.run_line_magic("pooldebug", "99")
    with pytest.raises(UsageError, match="index"):
        ip.run_line_magic("pooldebug", "two")


@pytest.mark.timeout(60)
def test_pooldebug_on_a_function_that_is_not_python_says_so(ip, monkeypatch, capsys):
    """``int('x')`` fails outside Python code: no frame to open the debugger in, and pdb
    itself failed with IndexError (its traceback under the item's)."""
    result = ip.run_cell("r = %poolmap -q int ['1', 'x']")
    assert isinstance(result.error_in_exec, ValueError)
    lines = _debug(ip, monkeypatch, capsys, "")
    text = "\n".join(lines)
    assert "ValueError: invalid literal for int() with base 10: 'x'" in text, text
    assert "poolmagic: the error was raised outside Python code (in int()): there is no frame to debug" in text
    assert "IndexError" not in text, text


@pytest.mark.timeout(60)
def test_pooldebug_finds_the_last_map_when_poolmap_was_rebound(ip, monkeypatch, capsys):
    """``_poolmap = [...]`` in the notebook: %pooldebug called .rerun on the list (AttributeError,
    then pdb's IndexError); the pool still knows the last map."""
    result = ip.run_cell("%%poolmap -q --keep-going range(6)\n" + DEBUG_BODY.format(name="dbg_rebound"))
    assert isinstance(result.error_in_exec, MapFailedError)
    ip.user_ns["_poolmap"] = [1, 2]
    lines = _debug(ip, monkeypatch, capsys, "")
    assert _printed(lines, "20") and _printed(lines, "2"), lines
    assert "IndexError" not in "\n".join(lines)


@pytest.mark.timeout(60)
def test_pooldebug_before_any_map(ip):
    saved = ip.user_ns.pop("_poolmap", None)
    try:
        poolmagic.api.set_pool(Pool(2))
        with pytest.raises(UsageError, match="no map has run yet"):
            ip.run_line_magic("pooldebug", "")
    finally:
        poolmagic.api.shutdown_pool()  # the next map starts a fresh shared pool
        if saved is not None:
            ip.user_ns["_poolmap"] = saved


@pytest.mark.timeout(60)
def test_pooldebug_on_a_generator_keeps_the_failed_items(ip, monkeypatch, capsys):
    result = ip.run_cell("%%poolmap --keep-going (i for i in range(6))\n" + DEBUG_BODY.format(name="dbg_stream"))
    assert isinstance(result.error_in_exec, MapFailedError)
    report = ip.user_ns["_poolmap"]
    assert report.failed_items == {2: 2, 4: 4}

    lines = _debug(ip, monkeypatch, capsys, "")
    assert _printed(lines, "20") and _printed(lines, "2"), lines
    lines = _debug(ip, monkeypatch, capsys, "4  # the other one")  # a comment, as in %poolsize
    assert _printed(lines, "40") and _printed(lines, "4"), lines
    with pytest.raises(UsageError, match="no longer available"):
        ip.run_line_magic("pooldebug", "1")


def seeded(x, path):
    v = random.random()
    with open(path, "a") as fh:
        fh.write(f"{x} {v!r}\n")
    if x == 3:
        raise ValueError(f"item {x} drew {v}")
    return v


@pytest.mark.timeout(60)
def test_rerun_raises_here_and_sees_the_workers_random_numbers(pool, tmp_path):
    path = tmp_path / "draws"
    with pytest.raises(MapFailedError) as info:
        pool.run(seeded, range(6), seed=1234, keep_going=True, kwargs={"path": str(path)})
    report = info.value.poolmap_report

    def draws(x) -> list[str]:
        return [line.split()[1] for line in path.read_text().splitlines() if line.split()[0] == str(x)]

    in_worker = draws(3)
    assert len(in_worker) == 1
    with pytest.raises(ValueError, match="item 3 drew"):
        report.rerun()  # the first failed item, here in this process
    assert draws(3) == in_worker * 2, draws(3)  # the same number as in the worker
    assert report.rerun(1) == report.results[1]  # a good item: the same value too
    assert draws(1)[0] == draws(1)[1]
    assert len(set(report.results[:3])) == 3  # and the items do get different streams


def weighted(x, w):
    total = x * sum(w)
    if total == 30:
        raise ValueError(f"item {x} weighs {total}")
    return total


@pytest.mark.timeout(60)
def test_rerun_uses_the_kw_value_the_workers_got_after_it_changed_in_place(ip, pool, monkeypatch, capsys):
    """A --kw list changed in place after the map: %pooldebug re-ran the item with the list as it is
    now (here: no error where the workers raised), not with what the workers got."""
    w = [10]
    with pytest.raises(MapFailedError) as info:
        pool.run(weighted, range(6), keep_going=True, kwargs={"w": w})
    report = info.value.poolmap_report
    assert list(report.errors) == [3]
    w.append(100)  # after the map
    with pytest.raises(ValueError, match="item 3 weighs 30"):
        report.rerun()
    assert report.rerun(2) == report.results[2] == 20
    assert w == [10, 100]  # the notebook's own value is left as it is

    ip.user_ns.update(weighted=weighted, dbg_w=[10])
    result = ip.run_cell("%poolmap -q --keep-going --kw w=dbg_w weighted range(6)")
    assert isinstance(result.error_in_exec, MapFailedError)
    ip.user_ns["dbg_w"][0] = 50
    lines = _debug(ip, monkeypatch, capsys, "", commands="p total\nq\n")
    assert _printed(lines, "30"), lines


def big_weighted(x, w):
    if x == 1:
        raise ValueError(float(w.sum()))
    return x


@pytest.mark.timeout(60)
def test_rerun_refuses_a_big_kw_value_changed_in_place_unless_forced(pool):
    w = np.zeros(300_000)  # 2.4 MB: its pickle is not kept
    with pytest.raises(MapFailedError) as info:
        pool.run(big_weighted, range(3), keep_going=True, kwargs={"w": w})
    report = info.value.poolmap_report
    with pytest.raises(ValueError, match=r"^0\.0$"):
        report.rerun()  # unchanged: runs
    w[0] = 1.0
    with pytest.raises(BadInputError, match=r"--kw w changed since the map"):
        report.rerun()
    with pytest.raises(ValueError, match=r"^1\.0$"):
        report.rerun(force=True)


@pytest.mark.timeout(60)
def test_rerun_refuses_when_a_global_the_function_reads_changed_since_the_map(ip):
    """A global array changed in place after the map: report.rerun / %pooldebug ran the item with it
    as it is now, so the item the workers saw fail ran without failing (2.0), and a debugger would
    have shown an item they never ran."""
    ip.run_cell("import numpy as np\nRR_K = np.array([1.0])\n")
    r = ip.run_cell("%%poolmap --keep-going [0, 1]\ndef rr_uses_k(x):\n"
                    "    if x == 1 and RR_K[0] == 1.0:\n        raise ValueError('K is 1')\n    return float(RR_K[0])\n")
    assert isinstance(r.error_in_exec, MapFailedError), r.error_in_exec
    report = ip.user_ns["_poolmap"]
    with pytest.raises(ValueError, match="K is 1"):
        report.rerun(1)  # unchanged: the item fails as in the map
    ip.user_ns["RR_K"][0] = 2.0
    with pytest.raises(BadInputError, match="a global or helper the function reads changed since the map"):
        report.rerun(1)
    assert report.rerun(1, force=True) == 2.0


# ================================================================ 6. tracebacks


@pytest.mark.timeout(60)
def test_keep_going_traceback_starts_at_the_users_code(ip, capsys):
    capsys.readouterr()
    result = ip.run_cell(
        "%%poolmap --keep-going range(5)\n"
        "def tb_work(x):\n"
        "    if x == 3:\n"
        "        raise ValueError('three is bad')\n"
        "    return x\n"
    )
    captured = capsys.readouterr()
    shown = plain(captured.out + captured.err)
    assert isinstance(result.error_in_exec, MapFailedError), result.error_in_exec
    assert "raise ValueError('three is bad')" in shown, shown
    # the cell's own frame (the whole cell as a string) is hidden; IPython 8
    # (Python 3.10) still shows its own InteractiveShell.run_cell_magic frame
    assert "get_ipython().run_cell_magic(" not in shown, shown
    assert "run_cell_magic('poolmap'" not in shown, shown
    stb = plain("\n".join(ip.InteractiveTB.structured_traceback(
        type(result.error_in_exec), result.error_in_exec, result.error_in_exec.__traceback__)))
    assert "raise ValueError('three is bad')" in stb, stb
    assert "__tracebackhide__" not in ip.user_ns

    later = ip.run_cell("1/0")
    captured = capsys.readouterr()
    shown = plain(captured.out + captured.err)
    assert isinstance(later.error_in_exec, ZeroDivisionError)
    assert re.search(r"----> 1 1/0", shown), shown  # the cell's own frame is still shown
    assert "Cell In[" in shown, shown
