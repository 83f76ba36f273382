"""Does the card tell the truth? Its speedup against a measured loop ÷ map.

For each shape of map, in one process: time the plain loop ``[f(x) for x in
items]`` (the specification), time the same map on a warm 2-worker pool, and
compare ``report.speedup`` (what the summary shows) with loop ÷ map. Repeated;
the medians and the error of each shape are printed, with the machine and the
load, as a Markdown table (``--md FILE`` writes it too).

    python benchmarks/truth.py               # 9 shapes × 3 repeats, ~1–2 min on 2 cores
    python benchmarks/truth.py --repeat 5 --md docs/truth-table.md

Target on a quiet host: every shape within ±15 %. A shape whose card shows a
range (native threads) counts as right when the truth falls inside the range;
its error is the distance to the nearer end.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import cloudpickle

from poolmagic import Pool
from poolmagic.cores import available_cores
from poolmagic.errors import MapFailedError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not import this file


def cpu(x: int) -> int:
    return sum(i * i for i in range(200_000 + x))


def blas(x: int) -> float:
    import numpy as np

    a = np.random.default_rng(x).standard_normal((320, 320))
    for _ in range(6):
        a = a @ a / 320.0
    return float(a[0, 0])


def elementwise(x: int) -> float:
    import numpy as np

    a = np.arange(400_000, dtype=float) + x
    return float(np.sqrt(a * a + 1.0).sum())


def nap(x: int) -> int:
    time.sleep(0.025)
    return x


def tiny(x: int) -> int:
    return x * x


def slow_first(x: int) -> int:
    n = 4_000_000 if x == 0 else 200_000
    return sum(i * i for i in range(n))


def fails(x: int) -> int:
    if x % 4 == 3:
        raise ValueError(x)
    return cpu(x)


SHAPES: list[tuple[str, Callable, Any, dict]] = [
    ("CPU-bound Python", cpu, range(96), {}),
    ("numpy matmul (BLAS)", blas, range(64), {}),
    ("numpy elementwise", elementwise, range(160), {}),
    ("sleeps (waiting-bound)", nap, range(60), {}),
    ("tiny items", tiny, range(1_000_000), {}),
    ("a straggler", slow_first, range(64), {"chunksize": 1}),
    ("under a CPU hog", cpu, range(96), {"hog": True}),
    ("with failures (--keep-going)", fails, range(96), {"keep_going": True}),
    ("1 worker", cpu, range(48), {"workers": 1}),
]


def loop(f: Callable, items: Any) -> float:
    """The specification, ``[f(x) for x in items]`` (failed items skipped)."""
    t = time.perf_counter()
    out = []
    for x in items:
        try:
            out.append(f(x))
        except ValueError:
            pass
    return time.perf_counter() - t


def mapped(pool: Pool, f: Callable, items: Any, options: dict) -> tuple[float, Any]:
    t = time.perf_counter()
    try:
        report = pool.run(f, items, **options)
    except MapFailedError as exc:
        report = exc.report
    return time.perf_counter() - t, report


def hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(pool: Pool, repeat: int, only: set[str] | None) -> list[dict]:
    rows = []
    for name, f, items, opts in SHAPES:
        if only and not any(o in name for o in only):
            continue
        opts = dict(opts)
        with_hog = opts.pop("hog", False)
        cards, truths, ranges, texts = [], [], [], []
        mapped(pool, f, list(items)[:8], opts)  # warm: the function shipped, workers up
        for _ in range(repeat):
            h = hog() if with_hog else None
            try:
                if h is not None:
                    time.sleep(0.2)
                # loop and map alternate, so that load drifting over the run hits both
                t_loop = loop(f, items)
                t_map, report = mapped(pool, f, items, opts)
            finally:
                if h is not None:
                    h.kill()
                    h.wait()
            a = report.analysis()
            truths.append(t_loop / t_map)
            cards.append(a.speedup)
            ranges.append((a.speedup, a.speedup_high))
            texts.append(a.speedup_text + (" contended" if a.contended else ""))
        truth = statistics.median(truths)
        card = statistics.median(cards)
        lo = statistics.median(r[0] for r in ranges)
        hi = statistics.median(r[1] for r in ranges)
        if lo <= truth <= hi:
            err = 0.0
        else:
            nearer = lo if truth < lo else hi
            err = (nearer - truth) / truth
        rows.append({"shape": name, "card": card, "low": lo, "high": hi, "truth": truth, "error": err,
                     "spread": (min(truths), max(truths)), "shown": texts[len(texts) // 2]})
        print(f"  {name:30s} card {rows[-1]['shown']:>18s}  loop÷map {truth:5.2f}×  error {err:+6.1%}", flush=True)
    return rows


def table(rows: list[dict], header: str) -> str:
    out = [header, "", "| shape | card shows | card `.speedup` | loop ÷ map (median, range) | error |",
           "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["spread"]
        ok = "" if abs(r["error"]) <= 0.15 else " ✗"
        out.append(f"| {r['shape']} | {r['shown']} | {r['card']:.2f}× | {r['truth']:.2f}× ({lo:.2f}–{hi:.2f}) "
                   f"| {r['error']:+.1%}{ok} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names")
    ap.add_argument("--md", default="", help="also write the table to this Markdown file")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    load = os.getloadavg()
    header = (f"`python benchmarks/truth.py --repeat {args.repeat}` · {platform.node()} · "
              f"{platform.processor() or platform.machine()} · {available_cores()} cores · Python "
              f"{platform.python_version()} · load average before {load[0]:.1f} · "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    with Pool(args.workers) as pool:
        rows = measure(pool, args.repeat, only)
    load_after = os.getloadavg()[0]
    md = table(rows, header + f" · load average after {load_after:.1f}")
    print()
    print(md)
    bad = [r["shape"] for r in rows if abs(r["error"]) > 0.15]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} shapes within ±15 %" + (f"; outside: {', '.join(bad)}" if bad else ""))
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
