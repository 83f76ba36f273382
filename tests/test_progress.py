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
from poolmagic.report import RunReport
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
def test_terminal_bar_on_stderr_then_one_summary(ip, capsys):
    """One card per map: the bar is erased when the map ends and the summary line follows,
    instead of a finished bar *and* a summary repeating its items, time and rate."""
    assert cell(ip, "-c 1 range(8)", NAP) == list(range(8))  # 8 × 0.25 s on 2 workers: ≥ 1 s
    captured = capsys.readouterr()
    err = captured.err
    assert "poolmagic nap()" in err and " items" in err, err  # the bar names the function
    assert "it/s" in err or "items/s" in err, err  # tqdm's meter was drawn
    assert final_lines(err) == [], err
    summaries = [ln for ln in captured.out.splitlines() if ln.startswith("poolmagic")]
    assert len(summaries) == 1 and summaries[0].startswith("poolmagic: nap() · 8 items in"), captured.out


@pytest.mark.timeout(60)
def test_terminal_bar_rate_counts_from_the_map_start(ip, capsys):
    """8 items of 0.25 s on 2 workers finish at most ~8 items/s (≤ 28/s between two redraws,
    which are ≥ 0.2 s apart): a bar saying more counts from when it appeared, not from the start."""
    cell(ip, "-q -c 1 range(2)", NAP)  # workers warm: items finish before the bar appears
    capsys.readouterr()
    cell(ip, "-c 1 range(8)", NAP)
    err = capsys.readouterr().err
    bars = [seg for seg in re.split(r"[\r\n]", err) if seg.startswith("poolmagic") and "|" in seg]
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
        assert "poolmagic: nap() · 8 items in" in captured.out  # the summary still shows
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
def test_failed_map_gets_one_card_that_says_failed(ip, capsys):
    body = ("def fails_late(x):\n    import time\n    time.sleep(1.0 if x == 7 else 0.25)\n"
            "    if x == 7:\n        raise ValueError('late')\n    return x\n")
    with pytest.raises(ValueError, match="late"):
        cell(ip, "-c 1 range(8)", body)
    captured = capsys.readouterr()
    assert final_lines(captured.err) == [], captured.err
    summaries = [ln for ln in captured.out.splitlines() if ln.startswith("poolmagic")]
    assert len(summaries) == 1, captured.out
    assert re.match(r"poolmagic: fails_late\(\) · 8 items \(7 ok, 1 failed\) in ", summaries[0]), summaries
    assert summaries[0].endswith("· failed") and "speedup" not in summaries[0], summaries  # no gain on a failed map


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
    assert final_lines(err) == [], err  # the bar is erased; the summary (the magic's) says interrupted
    done = watch.lp.progress.finished
    assert 2 <= done < 16
    r = watch.lp.report
    assert r.status == "cancelled" and "interrupted" in r.summary(), r.summary()


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


def keep_going_report() -> "RunReport":
    """16 items, 4 failed, every item ran: what a --keep-going map with failures reports."""
    r = RunReport(func_name="work", items=16, results=list(range(16)), cores=2, pool_size=2,
                  t_start=0.0, t_end=2.0)
    r.chunks = [ChunkRecord(k % 2, 4 * k, 4, 0.5 * k, 0.5 * k + 0.5, None, 1234, status="failed" if k == 3 else "done")
                for k in range(4)]
    r.errors = {i: ValueError(i) for i in (12, 13, 14, 15)}
    r.done = 12
    r.status = "failed"
    return r


def test_counts_agree_between_the_live_bar_and_the_card(clock):
    """A --keep-going map: the live bar shows the failures as they happen, and the final card
    says how many ran, succeeded and failed; no "16/16 · stopped" beside "12/16"."""
    r = keep_going_report()
    p = live.Progress(16, 2)
    p(ChunkFinished(rec(0, 4), 0, [], None))
    p(ChunkFinished(rec(12, 4), 4, [], None))
    clock.now = 101.0
    running = display.summary_bundle(r, p)
    assert "8/16 items" in running["text/html"] and "4 failed" in running["text/html"]
    assert "4 failed" in running["text/plain"]
    assert 'aria-label="progress 50%"' in running["text/html"] and "progress 50%" in running["text/html"]
    for k in (4, 8):
        p(ChunkFinished(rec(k, 4), 0, [], None))
    p(MapFinished("failed", ValueError("x")))
    final = display.summary_bundle(r, p)
    assert final == display.summary_bundle(r)  # the finished bar *is* the summary
    for form in final.values():
        assert "16 items (12 ok, 4 failed)" in form
        assert "16/16" not in form and "speedup" not in form
    head = final["text/html"].split("<details>")[0]  # (the timeline colours its successful chunks)
    assert "--jp-success-color1" not in head and "--jp-error-color1" in head  # no success colour on a failed map


def test_a_short_map_gets_no_findings():
    """A 30 ms map of tiny items: the headline may say slower; no bullets to act on."""
    r = RunReport(func_name="tiny", items=1000, results=list(range(1000)), cores=2, pool_size=2,
                  t_start=0.0, t_end=0.03, status="done")
    r.chunks = [ChunkRecord(0, 0, 1000, 0.01, 0.0101, None, 1)]
    r.done = 1000
    assert r.analysis().findings == [] and "why:" not in r.summary()
    assert "slower than a plain loop" in r.summary()
    assert [f.kind for f in r.analysis(all_findings=True).findings] == ["small_items"]


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
    return shown


def fake_job(items: int = 10, workers: int = 2):
    return SimpleNamespace(report=RunReport(func_name="f", items=items, pool_size=workers, cores=2), observers=[])


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
    r = job.report
    r.chunks, r.done, r.status, r.t_end = [rec(0, 4), rec(4, 6)], 10, "done", r.t_start + 1.0
    lp.close()
    assert len(notebook) == 1
    final, kw = handle.updates[-1]
    assert set(final) == {"text/plain", "text/html"}
    assert final["text/plain"].startswith("poolmagic: f() · 10 items in"), final  # the bar became the summary
    assert "poolmagic-summary" in final["text/html"]
    assert not any("widget" in mime for mime in final)
    lp.final(r)  # the magic shows the summary through the same display: no second output
    assert len(notebook) == 1 and handle.updates[-1][0] == final


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
    assert final["text/plain"].startswith("poolmagic: nap() · 8 items in"), final
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


# ------------------------------------------------------------------ --async: final card and terminal lines


@pytest.mark.timeout(60)
def test_async_card_is_final_when_get_returns(notebook):
    """The card is redrawn in its final state by the .get() that sees the end, on the caller's
    thread: a headless run saves the notebook when its last cell ends, and the live thread's
    last update could come after that (1 run in 6 saved "4/6 · running")."""
    with Pool(2) as pool:
        lsum = publish.LiveSummary()
        handle = pool.map_async(nap, range(6), chunksize=1, watch=lsum)
        lsum.show(handle)  # no follow(): only the hook can draw the final card
        (bundle, kw, dh), = notebook
        assert kw.get("display_id") is True and "running" in bundle["text/plain"], bundle
        assert handle.get(30) == list(range(6))
        final, kw = dh.updates[-1]
        assert kw.get("raw") is True
        assert final["text/plain"].startswith("poolmagic: nap() · 6 items in"), final
        assert "running" not in final["text/plain"] and "poolmagic-summary" in final["text/html"]
        n = len(dh.updates)
        handle.get(1)
        assert len(dh.updates) == n  # once


@pytest.mark.timeout(60)
def test_async_in_a_terminal_says_when_it_starts_and_ends(ip, capsys):
    cell(ip, "--async -o h -c 1 range(4)", NAP)
    started = capsys.readouterr().out
    assert re.match(r"poolmagic: nap\(\) started in the background · 4 items on \d+ workers?", started), started
    assert ip.user_ns["h"].get(30) == list(range(4))
    seen = ""

    def ended() -> bool:
        nonlocal seen
        seen += capsys.readouterr().out
        return "(background map finished)" in seen

    from conftest import wait_for

    assert wait_for(ended, timeout=10), seen
    assert re.search(r"poolmagic: nap\(\) · 4 items in .* \(background map finished\)", seen), seen
