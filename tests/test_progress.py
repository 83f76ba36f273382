"""Live progress: the terminal bar (tqdm on stderr), the notebook HTML bar and its
final static form, and the Progress observer that feeds both.

The ``ip`` shell has no kernel, so ``%%poolmap`` shows the terminal form. The
notebook form is driven without a kernel: ``LiveProgress.kernel`` is set and
IPython's ``display`` replaced by a recorder. Sleeps only make maps long enough
to show a bar (≥ 1 s against the 0.5 s delay); assertions are on what was shown.
"""
from __future__ import annotations

import re
import sys
import time
from types import SimpleNamespace

import cloudpickle
import pytest

from poolmagic import Pool, display, live, publish
from poolmagic.engine import protocol as P
from poolmagic.engine.events import (
    ChunkFinished,
    ChunkRecord,
    ChunkStarted,
    ItemsFailed,
    ItemsProgress,
    MapFinished,
    Waiting,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers never import this module

NAP = "def nap(x):\n    import time\n    time.sleep(0.25)\n    return x\n"


def cell(ip, line: str, body: str):
    return ip.run_cell_magic("poolmap", line, body)


def final_lines(err: str) -> list[str]:
    return [ln for ln in re.split(r"[\r\n]", err) if ln.startswith("poolmagic ✔") or ln.startswith("poolmagic ✖")
            or ln.startswith("poolmagic ■")]


# ------------------------------------------------------------------ terminal (ip shell)


@pytest.mark.timeout(60)
def test_terminal_bar_on_stderr_and_final_line(ip, capsys):
    assert cell(ip, "-c 1 range(8)", NAP) == list(range(8))  # 8 × 0.25 s on 2 workers: ≥ 1 s
    err = capsys.readouterr().err
    assert "poolmagic" in err and " items" in err, err
    assert "it/s" in err or "items/s" in err, err  # tqdm's meter was drawn
    finals = final_lines(err)
    assert len(finals) == 1 and finals[0].startswith("poolmagic ✔ 8/8 items · "), finals
    assert "items/s" in finals[0]


@pytest.mark.timeout(60)
def test_terminal_bar_rate_counts_from_the_map_start(ip, capsys):
    """8 items of 0.25 s on 2 workers finish at most ~8 items/s (≤ 28/s between two redraws,
    which are ≥ 0.2 s apart): a bar saying more counts from when it appeared, not from the start."""
    cell(ip, "-q -c 1 range(2)", NAP)  # workers warm: items finish before the bar appears
    capsys.readouterr()
    cell(ip, "-c 1 range(8)", NAP)
    err = capsys.readouterr().err
    bars = [seg for seg in re.split(r"[\r\n]", err) if seg.startswith("poolmagic:") and "|" in seg]
    assert bars, err
    rates = [float(m) for seg in bars for m in re.findall(r"([\d.]+) items/s", seg)]
    assert rates and max(rates) <= 100, f"the bar showed impossible rates: {bars}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--no-progress", "-q"])
def test_no_bar_with_no_progress_or_quiet(ip, capsys, flag):
    assert cell(ip, f"{flag} -c 1 range(8)", NAP) == list(range(8))
    captured = capsys.readouterr()
    assert "poolmagic" not in captured.err, captured.err
    assert ip.user_ns["_poolmap"].wall_s >= 0.5  # long enough that a bar would have shown
    if flag == "--no-progress":
        assert "poolmagic: 8 items in" in captured.out  # the summary still shows
    else:
        assert "poolmagic" not in captured.out


@pytest.mark.timeout(60)
def test_no_bar_for_a_map_faster_than_the_delay(ip, capsys):
    cell(ip, "-q range(4)", "def noop(x):\n    return x\n")  # a warm pool
    capsys.readouterr()
    for _ in range(5):  # a map faster than the bar's delay: on a loaded machine, try again
        assert cell(ip, "range(4)", "def noop(x):\n    return x\n") == [0, 1, 2, 3]
        err = capsys.readouterr().err
        wall = ip.user_ns["_poolmap"].wall_s
        if wall < 0.9 * publish.LiveProgress.DELAY_S:
            assert "poolmagic" not in err, f"a bar showed for a {wall:.3f} s map: {err!r}"
            return
    pytest.skip(f"no 4-item map took less than {publish.LiveProgress.DELAY_S} s on this machine")


@pytest.mark.timeout(60)
def test_failed_map_final_line_says_stopped(ip, capsys):
    body = ("def fails_late(x):\n    import time\n    time.sleep(1.0 if x == 7 else 0.25)\n"
            "    if x == 7:\n        raise ValueError('late')\n    return x\n")
    with pytest.raises(ValueError, match="late"):
        cell(ip, "-c 1 range(8)", body)
    err = capsys.readouterr().err
    finals = final_lines(err)
    assert len(finals) == 1, err
    assert re.match(r"poolmagic ✖ [1-8]/8 items · ", finals[0]) and finals[0].endswith("· stopped: ValueError"), finals


class Interrupting:
    """A LiveProgress whose tick raises KeyboardInterrupt once its bar is up and 2 items are done."""

    def __init__(self):
        self.lp = publish.LiveProgress(SimpleNamespace())  # no kernel: the terminal form
        self.raised = False

    def attach(self, job):
        self.lp.attach(job)

    def tick(self):
        self.lp.tick()
        if not self.raised and self.lp._bar is not None and self.lp.progress.finished >= 2:
            self.raised = True
            raise KeyboardInterrupt

    def close(self):
        self.lp.close()


def nap(x):
    time.sleep(0.25)
    return x


@pytest.mark.timeout(60)
def test_interrupted_map_final_line(capsys):
    watch = Interrupting()
    with Pool(2) as pool:
        with pytest.raises(KeyboardInterrupt):
            pool.run(nap, range(16), chunksize=1, watch=watch)
        assert pool.map(abs, [-1]) == [1]
    assert watch.raised
    err = capsys.readouterr().err
    finals = final_lines(err)
    assert len(finals) == 1, err
    done = watch.lp.progress.finished
    assert 2 <= done < 16
    assert finals[0].startswith(f"poolmagic ■ {done}/16 items · "), finals
    assert finals[0].endswith(f"· interrupted at {done}"), finals


# ------------------------------------------------------------------ rendering (synthetic events)


class Clock:
    """A stand-in for live.py's ``time``: the test says what time it is."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


def rec(start: int, count: int) -> ChunkRecord:
    return ChunkRecord(0, start, count, 0.0, 1.0, None, 1234)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(live, "time", c)
    return c


def test_a_map_waiting_for_a_worker_says_why_until_it_has_one(clock):
    p = live.Progress(10, 2)
    why = "waiting for a worker: the dask cluster at tcp://h:8786 has none (start one with `dask worker tcp://h:8786`)"
    p(Waiting(why))
    clock.now = 101.0
    assert why in display.progress_text(p) and "workers starting" not in display.progress_text(p)
    assert "waiting for a worker" in display.progress_html(p)
    p(ChunkFinished(rec(0, 4), 0, [None] * 4, range(4)))
    assert why in display.progress_text(p) and "4/10" in display.progress_text(p)  # a worker came, then left
    p(Waiting(None))
    assert "waiting" not in display.progress_text(p) and "waiting" not in display.progress_html(p)


@pytest.mark.timeout(30)
def test_progress_counts_and_html(clock):
    p = live.Progress(10_000, 2)
    assert p.starting and p.finished == 0 and p.eta is None
    clock.now = 101.5
    assert "workers starting" in display.progress_html(p)
    assert "workers starting" in display.progress_text(p)
    p(ChunkStarted(0, 1234, 0, 2_500, 100.1))
    assert p.started == 1 and p.starting  # sent is not finished
    p(ChunkFinished(rec(0, 2_500), 0, [], None))
    clock.now = 110.0  # 2,500 items in 10 s: 250 items/s, 7,500 left: 30 s
    assert not p.starting and p.finished == 2_500
    html = display.progress_html(p)
    assert "workers starting" not in html
    assert "2,500/10,000 items" in html and "10.00 s" in html
    assert "250.0 items/s" in html and "ETA 30.00 s" in html
    assert "2500/10000" in display.progress_text(p) and "items/s" in display.progress_text(p)
    # items of a long chunk still running count too
    p(ItemsProgress(2_500, 500))
    assert p.finished == 3_000
    p(ItemsProgress(2_500, 1_000))
    assert p.finished == 3_500
    p(ChunkFinished(rec(2_500, 2_500), 0, [], None))
    assert p.finished == 5_000 and p.partial == {}
    p(ItemsFailed([5_000, 5_001, 5_002], RuntimeError("crash")))
    assert p.finished == 5_003 and p.failed == 3
    assert "3 failed" in display.progress_html(p)


@pytest.mark.timeout(30)
def test_final_forms(clock):
    p = live.Progress(10_000, 2)
    p(ChunkFinished(rec(0, 10_000), 0, [], None))
    clock.now = 104.0
    p(MapFinished("done", None))
    clock.now = 200.0  # time stands still once the map has finished
    assert p.elapsed == pytest.approx(4.0) and p.eta is None
    text, html = display.progress_final(p)
    assert text.startswith("poolmagic ✔ 10,000/10,000 items · 4.00 s · 2,500.0 items/s"), text
    assert "✔" in html and "10,000/10,000" in html and "application/vnd.jupyter" not in html

    stopped = live.Progress(10_000, 2)
    stopped(ChunkFinished(rec(0, 4_000), 0, [], None))
    stopped(MapFinished("cancelled", KeyboardInterrupt()))
    text, _ = display.progress_final(stopped)
    assert text.startswith("poolmagic ■ 4,000/10,000") and text.endswith("interrupted at 4,000"), text

    failed = live.Progress(10_000, 2)
    failed(ChunkFinished(rec(0, 100), 1, [], None))
    failed(MapFinished("failed", ValueError("x")))
    text, html = display.progress_final(failed)
    assert text.startswith("poolmagic ✖ 100/10,000") and text.endswith("stopped: ValueError"), text
    assert "✖" in html


# ------------------------------------------------------------------ notebook form, no kernel


class FakeHandle:
    def __init__(self):
        self.updates: list[tuple[dict, dict]] = []

    def update(self, obj, **kw):
        self.updates.append((obj, kw))


@pytest.fixture
def notebook(monkeypatch):
    """IPython's display replaced by a recorder; no ipywidgets bar."""
    shown: list[tuple[object, dict, FakeHandle]] = []

    def fake_display(obj, **kw):
        h = FakeHandle()
        shown.append((obj, kw, h))
        return h

    monkeypatch.setattr("IPython.display.display", fake_display)
    monkeypatch.setattr(publish, "_widget_bar", lambda total: None)
    return shown


def fake_job(items: int = 10, workers: int = 2):
    return SimpleNamespace(report=SimpleNamespace(items=items, pool_size=workers), observers=[])


@pytest.mark.timeout(30)
def test_live_html_created_once_updated_then_replaced(clock, notebook):
    lp = publish.LiveProgress(SimpleNamespace())
    lp.kernel = True
    job = fake_job(10)
    lp.attach(job)
    assert job.observers == [lp.progress]
    clock.now = 100.3
    lp.tick()
    assert notebook == []  # nothing for maps shorter than DELAY_S
    clock.now = 100.6
    lp.tick()
    assert len(notebook) == 1
    obj, kw, handle = notebook[0]
    assert kw.get("display_id") is True and kw.get("raw") is True
    assert set(obj) == {"text/plain", "text/html"} and "workers starting" in obj["text/html"]
    job.observers[0](ChunkFinished(rec(0, 4), 0, [], None))
    clock.now = 101.0
    lp.tick()
    assert len(notebook) == 1, "the live display must be created once, then updated"
    assert len(handle.updates) == 1
    bundle, kw = handle.updates[0]
    assert kw.get("raw") is True and "4/10 items" in bundle["text/html"]
    job.observers[0](ChunkFinished(rec(4, 6), 0, [], None))
    job.observers[0](MapFinished("done", None))
    lp.close()
    assert len(notebook) == 1
    final, kw = handle.updates[-1]
    assert set(final) == {"text/plain", "text/html"}
    assert final["text/plain"].startswith("poolmagic ✔ 10/10")
    assert "✔" in final["text/html"] and "10/10" in final["text/html"]
    assert not any("widget" in mime for mime in final)
    n = len(handle.updates)
    lp.close()  # once
    assert len(handle.updates) == n and len(notebook) == 1


@pytest.mark.timeout(60)
def test_live_html_with_a_real_map(notebook):
    lp = publish.LiveProgress(SimpleNamespace())
    lp.kernel = True
    with Pool(2) as pool:
        report = pool.run(nap, range(8), chunksize=1, watch=lp)  # ≥ 1 s
    assert report.results == list(range(8))
    assert len(notebook) == 1
    _, kw, handle = notebook[0]
    assert kw.get("display_id") is True
    assert handle.updates, "the live display was never replaced by its final form"
    final, _ = handle.updates[-1]
    assert final["text/plain"].startswith("poolmagic ✔ 8/8")
    assert not any("widget" in mime for mime in final)


# ------------------------------------------------------------------ progress inside one long chunk


class Recorder:
    """A watch that records how many items the Progress observer counts at each tick."""

    def __init__(self):
        self.progress = None
        self.seen: list[int] = []
        self.closed = False

    def attach(self, job):
        self.progress = live.Progress(job.report.items, job.report.pool_size)
        job.observers.append(self.progress)

    def tick(self):
        self.seen.append(self.progress.finished)

    def close(self):
        self.closed = True


def slow_item(x):
    time.sleep(0.3)
    return x


@pytest.mark.timeout(60)
def test_bar_moves_within_one_long_chunk():
    assert P.PROGRESS_S < 8 * 0.3 / 2  # the chunk runs long enough for several reports
    watch = Recorder()
    with Pool(2) as pool:
        report = pool.run(slow_item, range(8), chunksize=8, workers=1, watch=watch)
    assert report.results == list(range(8))
    assert len(report.chunks) == 1 and report.chunks[0].count == 8  # one chunk of 8
    assert watch.closed and watch.progress.finished == 8 and watch.progress.status == "done"
    assert watch.seen == sorted(watch.seen), watch.seen
    inside = [v for v in watch.seen if 0 < v < 8]
    assert inside, f"no tick saw the chunk partly done: {watch.seen}"
