"""Why a map paid or did not (diagnose.py), and its timeline (timeline.py, charts.py).

Each finding is provoked for real on a private pool: the mapped functions
sleep or compute to *create* the situation; the assertions are on what the
report says, with margins a loaded 2-core machine cannot flip.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

import cloudpickle
import pytest

import poolmagic
from conftest import wait_for
from poolmagic import Pool, charts, display
from poolmagic.cores import available_cores
from poolmagic.engine.events import ChunkRecord
from poolmagic.errors import MapCancelledError, MapFailedError
from poolmagic.report import RunReport
from poolmagic.timeline import Row, Timeline

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers never import this module

ROW_FIELDS = ["worker", "pid", "start", "end", "first_item", "last_item", "items", "status"]


def kinds(report) -> list[str]:
    """Every finding, short maps included (the summary shows none under 0.1 s)."""
    return [f.kind for f in report.analysis(all_findings=True).findings]


def warm(pool: Pool, n: int) -> None:
    """Start ``n`` workers and wait until each has run an item (no start-up inside the next map)."""
    pool.map(time.sleep, [0.2] * n, chunksize=1, workers=n)
    assert wait_for(lambda: len(pool.backend.worker_pids()) >= n), "workers did not start"


def contended(a) -> bool:
    """The analysis found the host contended (a loop would have had < 80 % of a CPU), as the card says."""
    return a.contended


def square(x):
    return x * x


# ------------------------------------------------------------------ findings


@pytest.mark.timeout(60)
def test_small_items_are_slower_than_a_loop():
    with Pool(2) as pool:
        report = pool.run(square, range(100_000))
    assert report.results[:4] == [0, 1, 4, 9] and len(report.results) == 100_000
    k = kinds(report)
    a = report.analysis()
    text = report.summary()
    assert "small_items" in k, text
    assert "slower" not in k, "the headline says slower; the cause is the finding, not a second 'slower'"
    if report.wall_s >= 0.1:
        assert "why: items take" in text and "overhead dominates" in text
    if contended(a):  # other processes held the CPUs: the report says so instead of "slower"
        assert "contended" in text.splitlines()[0], text
    else:
        assert "slower than a plain loop" in text.splitlines()[0]  # the speedup words


@pytest.mark.timeout(60)
def test_too_few_items_for_the_workers():
    def nap(x):
        time.sleep(0.3)
        return x

    with Pool(2) as pool:
        report = pool.run(nap, [7])
    assert report.results == [7]
    k = kinds(report)
    assert "few_items" in k, report.summary()
    assert "why: 1 item for 2 workers" in report.summary()  # 0.3 s: above the 0.1 s of findings


@pytest.mark.timeout(60)
def test_one_straggler_item_holds_the_map():
    def uneven(x):
        time.sleep(1.5 if x == 0 else 0.01)
        return x

    with Pool(2) as pool:
        warm(pool, 2)
        report = pool.run(uneven, range(16), chunksize=1)
    assert report.results == list(range(16))
    findings = {f.kind: f.text for f in report.analysis().findings}
    assert "straggler" in findings, report.summary()
    assert findings["straggler"].startswith("item 0 took"), findings["straggler"]
    assert "why: item 0 took" in report.summary()


def cpu_300k(x):
    return sum(i * i for i in range(300_000))


@pytest.mark.timeout(180)
def test_more_workers_than_cores_is_called_oversubscribed():
    cores = available_cores()
    if cores > 2 or len(os.sched_getaffinity(0)) > 2:
        pytest.skip(f"needs at most 2 cores to oversubscribe with 6 workers; this machine has {cores}")
    # All six workers are up before the map, and there are enough items (16 per worker)
    # that start-up and the last round cannot by themselves make the map look unpaid:
    # what is left is six CPU-bound workers sharing two cores.
    with Pool(6) as pool:
        warm(pool, 6)
        report = pool.run(cpu_300k, range(96), chunksize=1)
    assert report.results == [cpu_300k(0)] * 96
    assert report.workers > cores, "premise: the map must have run on more workers than cores"
    k = kinds(report)
    assert "oversubscribed" in k, (
        f"6 CPU-bound workers on {cores} cores got no 'oversubscribed' finding:\n{report.summary()}"
    )
    assert f"why: {report.workers} workers on {cores} cores" in report.summary()


def big_result(x):
    import numpy as np

    return np.zeros(4 << 20)  # 32 MB, made in microseconds: moving it is all the work


@pytest.mark.timeout(120)
def test_big_results_are_transport_bound():
    pytest.importorskip("numpy")
    with Pool(2) as pool:
        report = pool.run(big_result, range(16), chunksize=1)
    assert len(report.results) == 16 and all(r.nbytes == 32 << 20 for r in report.results)
    findings = {f.kind: f.text for f in report.analysis().findings}
    assert "transport" in findings, report.summary()
    assert "32 MB" in findings["transport"], findings["transport"]
    assert "why: moving items and results took" in report.summary()


@pytest.mark.timeout(120)
def test_transport_bound_time_breakdown_adds_up():
    """busy + transport + idle = workers × wall, also when moving results dominates."""
    pytest.importorskip("numpy")
    with Pool(2) as pool:
        report = pool.run(big_result, range(16), chunksize=1)
    a = report.analysis()
    capacity = a.workers * a.wall_s
    assert a.transport_s <= capacity * 1.05, (
        f"transport {a.transport_s:.2f} s is more than {a.workers} workers × {a.wall_s:.2f} s wall "
        f"= {capacity:.2f} s (busy {a.busy_s:.3f} s, idle {a.idle_s:.3f} s)"
    )
    assert abs(a.busy_s + a.transport_s + a.idle_s - capacity) <= 0.05 * capacity


@pytest.mark.timeout(60)
def test_native_threads_over_the_cores_are_named():
    cores = available_cores()
    if 2 * 2 <= cores:
        pytest.skip(f"2 workers × 2 threads fit in {cores} cores: nothing to diagnose")
    with Pool(2) as pool:
        over = pool.run(square, range(100_000), threads=2)  # 2 workers × 2 threads > 2 cores
        fitting = pool.run(square, range(100_000), threads=1)
    assert over.threads == 2 and fitting.threads == 1
    assert "small_items" in kinds(over) and "small_items" in kinds(fitting)  # neither paid
    assert "threads" in kinds(over), over.summary()
    texts = [f.text for f in over.analysis(all_findings=True).findings]
    assert f"each worker may run 2 native threads (BLAS, OpenMP): 4 threads on {cores} cores; try --threads 1" in texts
    assert "threads" not in kinds(fitting), fitting.summary()


def cpu_2m(x):
    return sum(i * i for i in range(2_000_000))


@pytest.mark.timeout(180)
def test_healthy_map_has_no_findings_and_its_time_adds_up():
    with Pool(2) as pool:
        warm(pool, 2)
        report = pool.run(cpu_2m, range(16), chunksize=1)
    assert report.results == [cpu_2m(0)] * 16
    a = report.analysis()
    figures = (f"{report.summary()}\nbusy {a.busy_s:.3f} s, waited for a CPU {a.waited_s:.3f} s, "
               f"transport {a.transport_s:.3f} s, idle {a.idle_s:.3f} s, wall {a.wall_s:.3f} s")
    if contended(a) or a.waited_s >= 0.2 * a.busy_s:
        # Other processes kept the workers waiting for a CPU (a loaded machine): that,
        # and only that, may be reported. More work per item would not change the share.
        # When the two workers together still had a CPU's worth, a loop would have had
        # it too: the card then says "slower" (seen in CI at load 7: 1.35 s of work in
        # a map of 1.37 s) rather than "contended"; either names the load, nothing else.
        assert kinds(report) in ([], ["contended"], ["slower"]), figures
    else:
        assert a.findings == [], figures
        assert "why:" not in report.summary()
        assert "slower" not in report.summary()
    assert a.workers == report.workers == 2
    assert a.busy_s == pytest.approx(report.busy_s)
    assert min(a.busy_s, a.transport_s, a.idle_s) >= 0
    capacity = a.workers * a.wall_s
    assert abs(a.busy_s + a.transport_s + a.idle_s - capacity) <= 0.05 * capacity
    assert a.efficiency == pytest.approx(a.speedup / a.workers)
    assert "speedup ≈" in report.summary()


# ------------------------------------------------------------------ speedup words


def held(x, gate: str, first: int = 0):
    """``x``, at once below item ``first``; from it on, once the file ``gate`` exists (30 s at most)."""
    if x >= first:
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return x


@pytest.mark.timeout(60)
def test_workers_starting_before_any_chunk_finished(tmp_path):
    gate = tmp_path / "go"
    with Pool(2) as pool:
        handle = pool.map_async(held, range(4), chunksize=1, kwargs={"gate": str(gate)})
        try:
            text = display.summary_text(handle.report)
            assert handle.report.status == "running" and not handle.report.chunks
            assert "workers starting" in text, text
            assert "why:" not in text
        finally:
            handle.cancel()
            gate.touch()
        assert handle.wait(10)
        with pytest.raises(MapCancelledError):
            handle.get()
    after = handle.report.summary()
    assert "interrupted" in after and "workers starting" not in after


@pytest.mark.timeout(60)
def test_an_interrupted_map_gets_no_verdict(tmp_path):
    """Stopped after 4 quick items while two others hang: the hung items' time is
    not in the report, so "slower than a plain loop" (and its why) would be a
    guess; the workers it ran on are still counted."""
    gate = tmp_path / "go"
    with Pool(2) as pool:
        handle = pool.map_async(held, range(8), chunksize=1, kwargs={"gate": str(gate), "first": 4})
        try:
            assert wait_for(lambda: handle.report.done >= 4, timeout=20)
            time.sleep(0.5)  # the stuck items' time grows; the recorded work does not
        finally:
            handle.cancel()
            gate.touch()
        assert handle.wait(10)
    text = handle.report.summary()
    assert handle.report.status == "cancelled", text
    assert "4/8 items" in text and "interrupted" in text, text
    assert "· 2 workers ·" in text, text
    assert "slower" not in text and "speedup" not in text and "why:" not in text, text


@pytest.mark.timeout(120)
def sleeps_on_one(x):
    if x == 1:
        time.sleep(10)
    return x


@pytest.mark.timeout(60)
def test_a_map_with_a_timed_out_item_gets_no_why():
    """The timed-out item's second is the wall, but no chunk holds it: the card said
    'why: items take 10 µs each: overhead dominates; run it serially'."""
    from poolmagic import ItemTimeoutError

    with Pool(2) as pool:
        with pytest.raises(ItemTimeoutError):
            pool.run(sleeps_on_one, range(3), chunksize=1, timeout=1)
        report = pool.last_report
    text = report.summary()
    assert isinstance(report.errors[1], ItemTimeoutError) and "1 failed" in text, text
    assert "why:" not in text, text


def test_one_speedup_before_and_after_tune(ip):
    """``--tune`` no longer changes what a map's speedup means: the summary and
    ``.speedup`` give the same figure, before and after (it was "measured
    against one worker" after a tune, a different number)."""
    body = "def tuned(x):\n    return sum(i * i for i in range(100_000))\n"
    pool = poolmagic.get_pool()
    try:
        ip.run_cell_magic("poolmap", "-q -c 1 range(8)", body)
        first = ip.user_ns["_poolmap"]
        ip.run_line_magic("poolsize", "--tune --budget 3")
        ip.run_cell_magic("poolmap", "-q -c 1 range(8)", body)
        again = ip.user_ns["_poolmap"]
        assert again is not first
        for r in (first, again):
            a = r.analysis()
            assert "measured against one worker" not in r.summary()
            assert r.speedup == a.speedup and f"speedup {a.speedup_text}" in r.summary(), r.summary()
    finally:
        ip.run_line_magic("poolsize", "auto")
        assert pool.size == pool.cores


# ------------------------------------------------------------------ timeline


def fail_on_3(x):
    time.sleep(0.05)
    if x == 3:
        raise ValueError("three")
    return x


@pytest.fixture(scope="module")
def failed_report():
    with Pool(2) as pool:
        with pytest.raises(MapFailedError) as e:
            pool.run(fail_on_3, range(8), chunksize=2, keep_going=True)
    return e.value.report


def test_a_blink_of_a_map_gets_no_timeline_under_its_card_and_a_longer_one_does(monkeypatch):
    """A map shorter than TIMELINE_MIN_S draws no picture of its slivers (most of a card's cost);
    the report still has its timeline."""
    with Pool(2) as pool:
        r = pool.run(square, range(4), chunksize=1)
    assert len(r.chunks) > 1
    monkeypatch.setattr(display, "TIMELINE_MIN_S", r.wall_s * 2)  # as if it took a blink
    assert "poolmagic-timeline" not in r._repr_html_() and r.timeline.rows
    monkeypatch.setattr(display, "TIMELINE_MIN_S", r.wall_s / 2)  # as if it took long enough to draw
    assert "<details><summary>timeline</summary>" in r._repr_html_()


@pytest.mark.timeout(60)
def test_timeline_rows(failed_report):
    r = failed_report
    assert [f.name for f in dataclasses.fields(Row)] == ROW_FIELDS
    rows = r.timeline.rows
    assert len(rows) == 4
    assert sorted((row.first_item, row.last_item) for row in rows) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    for row in rows:
        assert row.items == row.last_item - row.first_item + 1 == 2
        assert 0 <= row.start <= row.end <= r.wall_s
        assert row.pid > 0 and row.pid != os.getpid()
        assert row.worker in (0, 1)
        assert row.status == ("failed" if row.first_item == 2 else "done"), row
    assert {row.pid for row in rows} == {c.pid for c in r.chunks}


@pytest.mark.timeout(60)
def test_timeline_frame_and_text(failed_report):
    pd = pytest.importorskip("pandas")
    tl = failed_report.timeline
    df = tl.to_frame()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ROW_FIELDS and len(df) == 4
    assert list(df.loc[df.status == "failed", "first_item"]) == [2]
    lines = tl.text().splitlines()
    workers = tl.workers()
    assert lines[0].startswith("timeline: 4 chunks") and "× chunk failed" in lines[0]  # its legend
    assert len(lines) == 1 + len(workers) + 2  # the rows, the axis, the slowest items
    assert [ln.split("|")[0].split() for ln in lines[1:-2]] == [["worker", str(w)] for w in workers]
    assert "×" in "".join(lines[1:-2])  # the failed chunk is marked
    assert lines[-2].split()[0] == "0" and lines[-1].startswith("  slowest: item ")


def test_timeline_picture_has_axis_legend_failure_shape_and_slowest_items():
    r = RunReport(func_name="f", items=8, results=list(range(8)), cores=2, pool_size=2, t_start=0.0, t_end=2.0,
                  status="done", done=8)
    r.chunks = [ChunkRecord(0, 0, 4, 0.1, 1.9, [0.2, 1.2, 0.2, 0.2], 11),
                ChunkRecord(1, 4, 4, 0.1, 0.9, [0.2, 0.1, 0.4, 0.1], 12, status="failed")]
    tl = r.timeline
    assert tl.slowest(3) == [(1, 1.2), (6, 0.4), (0, 0.2)]
    html = tl._repr_html_()
    labels = re.findall(r'font-size="10" fill="currentColor"[^>]*>([^<]+)</text>', html)
    assert labels[:5] == ["0", "500.0 ms", "1.00 s", "1.50 s", "2.00 s"], labels  # round ticks, not just 0 and the end
    assert "chunk ran" in html and "chunk with a failed item" in html  # a legend
    assert 'fill="url(#poolmagic-failed)"' in html and "<pattern" in html  # failed chunks hatched, not only red
    assert "slowest: item 1 1.20 s, item 6 400.0 ms" in html
    assert all('fill="currentColor"' in t for t in html.split("<text")[1:])  # every label takes the theme's colour
    assert list(tl.to_frame().columns) == ROW_FIELDS if _has_pandas() else True


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(60)
def test_timeline_frame_without_pandas_says_so(failed_report, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="needs pandas: pip install pandas"):
        failed_report.timeline.to_frame()


@pytest.fixture(scope="module")
def huge_report():
    """64 workers × 10,000 chunks, made up (too slow to run for real)."""
    workers, per = 64, 10_000
    chunks = []
    for w in range(workers):
        for k in range(per):
            t0 = 0.01 * k + 0.0001 * w
            status = "failed" if k == 5_000 and w % 8 == 0 else "done"
            chunks.append(ChunkRecord(w, w * per + k, 1, t0, t0 + 0.009, None, 10_000 + w, status,
                                      t0 - 0.0003, t0 + 0.0093, 120))
    return RunReport(func_name="huge", items=workers * per, chunks=chunks, cores=64, pool_size=64,
                     status="done", t_start=0.0, t_end=100.1, done=workers * per)


@pytest.mark.timeout(240)
def test_timeline_svg_of_640k_chunks_stays_small(huge_report):
    tl = Timeline(huge_report)
    assert len(tl) == 640_000 and len(tl.workers()) == 64
    svg = charts.timeline_svg(tl)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "worker 0<" in svg and "worker 63<" in svg
    size = len(svg.encode())
    assert size <= 200 * 1024, f"timeline SVG of 640,000 chunks is {size / 1024:.0f} KB (> 200 KB)"


@pytest.mark.timeout(240)
def test_summary_html_of_640k_chunks_stays_small(huge_report):
    html = display.summary_html(huge_report)
    assert "poolmagic" in html and "640,000 items" in html
    size = len(html.encode())
    assert size <= 250 * 1024, f"summary HTML of 640,000 chunks is {size / 1024:.0f} KB (> 250 KB)"


def test_a_speedup_below_one_hundredth_is_not_printed_as_zero():
    """A 3-item map of microsecond items: 'speedup ≈0.00×' read as 'exactly none'."""
    with Pool(2) as pool:
        report = pool.run(square, range(3))
    a = report.analysis()
    if a.speedup < 0.005:
        assert a.speedup_text == "<0.01×" and "≈0.00×" not in report.summary(), report.summary()
    else:  # (a slow host: the map took long enough to count)
        assert a.speedup_text.startswith("≈"), a.speedup_text


def test_slowest_items_say_their_wait_for_a_cpu_so_they_match_the_chunks_in_the_picture():
    """A chunk that waited for a CPU all its measured 8 µs read 'item 1 0 µs' under a picture whose
    chunk said '8 µs': the line now gives both figures."""
    r = RunReport(func_name="f", items=2, results=[0, 1], cores=2, pool_size=2, t_start=0.0, t_end=0.001,
                  status="done", done=2)
    r.chunks = [ChunkRecord(0, 0, 1, 0.0001, 0.000108, None, 11, waited_s=0.000008),
                ChunkRecord(1, 1, 1, 0.0002, 0.000205, None, 12)]
    tl = r.timeline
    assert tl.slowest(2) == [(1, pytest.approx(5e-6)), (0, 0.0)]
    html = tl._repr_html_()
    assert "slowest: item 1 5 µs, item 0 0 µs running, 8 µs with its wait for a CPU" in html, html
    assert "· 8 µs · pid 11" in html  # the chunk's tooltip: the same 8 µs
