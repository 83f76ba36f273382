"""%poolsize (poolsize.py) in a real InteractiveShell: show, set, auto, options after the count, bad sizes."""
from __future__ import annotations

import pytest
from IPython.core.error import UsageError

import poolmagic


def cell(ip, line: str, body: str):
    return ip.run_cell_magic("poolmap", line, body)


def test_poolsize_shows_sets_and_auto(ip, capsys):
    pool = poolmagic.get_pool()
    ip.run_line_magic("poolsize", "")
    out = capsys.readouterr().out
    assert f"{pool.size} worker" in out and "cores available" in out and "local processes" in out
    ip.run_line_magic("poolsize", "3")
    assert pool.size == 3 and "3 workers" in capsys.readouterr().out
    cell(ip, "-q -c 1 range(12)", "def slow(x):\n    import time; time.sleep(0.05); return x\n")
    assert ip.user_ns["_poolmap"].workers == 3
    ip.run_line_magic("poolsize", "auto")
    assert pool.size == pool.cores
    capsys.readouterr()


def test_poolsize_takes_options_after_the_count_too(ip, capsys):
    pool = poolmagic.get_pool()
    ip.run_line_magic("poolsize", "3 --threads 1")
    assert pool.size == 3 and pool.threads == 1
    ip.run_line_magic("poolsize", "--threads 2 2")
    assert pool.size == 2 and pool.threads == 2
    with pytest.raises(UsageError, match="not '2 extra'"):
        ip.run_line_magic("poolsize", "2 --threads 1 extra")
    with pytest.raises(UsageError, match="at least 1 worker, not 0"):
        ip.run_line_magic("poolsize", "0 --threads 1")
    assert pool.size == 2 and pool.threads == 2, "a bad count changed the pool before it was refused"
    ip.run_line_magic("poolsize", "auto --threads auto")
    assert pool.size == pool.cores and pool.threads is None
    capsys.readouterr()


def test_a_comment_after_the_count_is_a_comment(ip, capsys):
    """``%poolsize 3  # the downloads wait`` was refused: 'not '3  # the downloads wait''."""
    pool = poolmagic.get_pool()
    ip.run_line_magic("poolsize", "3  # the downloads wait")
    assert pool.size == 3
    ip.run_line_magic("poolsize", "--threads 1 2 #two")
    assert pool.size == 2 and pool.threads == 1
    ip.run_line_magic("poolsize", "# just look")
    assert pool.size == 2 and "2 workers" in capsys.readouterr().out
    ip.run_line_magic("poolsize", "auto --threads auto")
    capsys.readouterr()


@pytest.mark.parametrize("arg", ["0", "-2", "many", "1.5"])
def test_poolsize_rejects_bad_sizes(ip, arg):
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("poolsize", arg)
    assert "poolsize" in str(e.value) or "option" in str(e.value)
