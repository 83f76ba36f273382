"""One definition of speedup (diagnose.py): serial time of the items ÷ wall, on given chunk records.

Deterministic: the reports are built from chunk records whose times say what
happened (how long in the function, how long waiting for a CPU, CPU time), so
the rule is checked without timing anything. truth.py checks it against a
measured loop ÷ map.
"""
from __future__ import annotations

import math

import numpy as np

from poolmagic.engine.events import ChunkRecord
from poolmagic.report import RunReport


def report(workers: int, cores: int, *, wall: float = 1.0, busy: float = 1.0, waited: float = 0.0,
           cpu: float | None = None, func=None, threads: int | None = None) -> RunReport:
    """``workers`` each in the function ``busy`` of a ``wall``-second map, ``waited`` of it for a CPU."""
    r = RunReport(func_name="f", items=workers, results=[0] * workers, cores=cores, pool_size=workers,
                  t_start=0.0, t_end=wall, status="done", threads=threads)
    r.chunks = [ChunkRecord(w, w, 1, 0.0, busy, None, 100 + w, waited_s=waited, cpu_s=cpu) for w in range(workers)]
    r.done = workers
    if func is not None:
        r.replay = (func, None, None)
    return r


def test_quiet_host_speedup_is_busy_over_wall():
    r = report(2, 2, busy=0.9, cpu=0.9)
    a = r.analysis()
    assert a.speedup == r.speedup and math.isclose(r.speedup, 1.8)
    assert not a.contended and "speedup ≈1.80×" in r.summary() and "contended" not in r.summary()


def test_workers_waiting_for_each_other_do_not_count():
    """6 CPU-bound workers on 2 cores, each running a third of the time: a loop would have
    had a whole CPU, so the gain is 2×, not the 6× of busy ÷ wall."""
    r = report(6, 2, busy=1.0, waited=2 / 3, cpu=1 / 3)
    a = r.analysis()
    assert math.isclose(a.speedup, 2.0, rel_tol=1e-9) and not a.contended
    assert "speedup ≈2.00×" in r.summary()


def test_a_contended_host_is_flagged_and_a_loop_would_have_waited_too():
    """2 workers on 2 cores running a quarter of the time each: together half a CPU, which a
    loop would have had too: no gain, and the card says the host was contended."""
    r = report(2, 2, busy=1.0, waited=0.75, cpu=0.25)
    a = r.analysis()
    assert math.isclose(a.speedup, 1.0) and a.contended and math.isclose(a.loop_share, 0.5)
    assert "host contended" in r.summary() and "50% of one" in r.summary()


def test_a_speedup_above_the_cores_for_cpu_bound_work_is_never_shown():
    """4 CPU-bound workers on 2 cores whose waiting was not measured claim 4×: impossible."""
    r = report(4, 2, busy=1.0, waited=0.0, cpu=1.0)
    a = r.analysis()
    assert a.failed and math.isnan(r.speedup)
    text = r.summary()
    assert "speedup unknown" in text and "4.00×" not in text and "timing failed" in text
    assert "--jp-success-color1" not in r._repr_html_().split("<details>")[0]


def test_sleeping_work_may_gain_more_than_the_cores():
    """Waiting-bound work (CPU time ≈ 0) on 8 workers and 2 cores: 8× is real."""
    r = report(8, 2, busy=1.0, cpu=0.01)
    assert math.isclose(r.speedup, 8.0) and "speedup ≈8.00×" in r.summary()


def matmul(x):
    return float((np.ones((4, 4)) @ np.ones((4, 4)))[0, 0] * x)


def pure(x):
    return x * x


def test_native_threads_make_a_range_with_the_sure_end_as_speedup():
    """Workers had 1 BLAS thread each, a loop here 2: the gain is 1–2×, .speedup is the low end."""
    r = report(2, 2, busy=1.0, cpu=1.0, func=matmul, threads=1)
    a = r.analysis()
    assert a.threads == (1, 2) and math.isclose(r.speedup, 1.0) and math.isclose(a.speedup_high, 2.0)
    assert "speedup ≈1.00–2.00×" in r.summary() and "native thread" in r.summary()
    plain = report(2, 2, busy=1.0, cpu=1.0, func=pure, threads=1)
    assert plain.analysis().threads is None and math.isclose(plain.speedup, 2.0)
