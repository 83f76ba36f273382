#!/usr/bin/env python
"""Benchmark smoke: fail only when poolmagic got more than LIMIT× slower than a baseline commit.

Runs ``bench.py --baseline REF`` on a few short workloads (poolmagic against itself
at REF, alternating, in one run, so that a loaded host slows both) and compares every
figure of the working tree with the baseline's. A time or memory figure more than
LIMIT× the baseline's (a speedup less than 1/LIMIT of it) fails; anything closer is
noise on a shared 2-core machine and passes. Meant for CI next to the tests, which
assert nothing about wall-clock time.

    python benchmarks/smoke.py                       # main, cold,tiny,overhead, 2 rounds: ~1-2 min
    python benchmarks/smoke.py --baseline HEAD~1 --only overhead --rounds 3
    python benchmarks/smoke.py --from benchmarks/results/partial.json   # judge a finished run

Exit status 0: no figure past the limit; 1: at least one (each is printed); 2: the
benchmark itself failed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE, BASE = "poolmagic", "poolmagic_base"  # bench.py's keys for the working tree and the baseline
HIGHER_IS_BETTER = ("speedup",)
# Not performance figures: counts, sizes, bookkeeping, and a percentage that can be ~0.
SKIPPED = ("harness_s", "rounds", "size", "n", "ck_pct")
NOISE_MB = 1.0  # memory growths both under 1 MB are allocator noise (0.004 vs 0.008 MB is no 2x)


def figures(res: dict) -> dict[str, float]:
    """The numeric performance figures of one workload's result."""
    return {k: v for k, v in res.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in SKIPPED and not k.endswith(("_n", "_items"))}


def judge(results: dict, limit: float) -> tuple[list[str], list[str]]:
    """(every comparison as a line, the failing ones) for bench.py's ``results`` mapping."""
    lines, bad = [], []
    for wl, by_peer in results.items():
        tree, base = by_peer.get(TREE) or {}, by_peer.get(BASE) or {}
        for side, res in ((TREE, tree), (BASE, base)):
            if res.get("status") != "ok":
                bad.append(f"{wl}: {side} {res.get('status', 'missing')} {res.get('note', '')}".rstrip())
        b = figures(base)
        for key, x in figures(tree).items():
            y = b.get(key)
            if y is None or y <= 0 or x < 0 or ("mb" in key and max(x, y) < NOISE_MB):
                continue
            ratio = x / y
            worse = ratio < 1 / limit if key in HIGHER_IS_BETTER else ratio > limit
            line = f"{wl:9s} {key:16s} tree {x:10.4g}  baseline {y:10.4g}  ratio {ratio:5.2f}"
            lines.append(line + ("  <-- past the limit" if worse else ""))
            if worse:
                bad.append(line)
    return lines, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="main", metavar="REF", help="git ref to compare with (default main)")
    ap.add_argument("--only", default="cold,tiny,overhead", help="bench.py workloads (default cold,tiny,overhead)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per workload (default 2)")
    ap.add_argument("--limit", type=float, default=2.0, help="fail past this ratio (default 2.0)")
    ap.add_argument("--from", dest="source", type=Path, metavar="JSON",
                    help="judge a finished bench.py --baseline run's JSON instead of running one")
    args = ap.parse_args()
    source = args.source
    if source is None:
        cmd = [sys.executable, str(HERE / "bench.py"), "--baseline", args.baseline, "--rounds", str(args.rounds),
               "--only", args.only, "--peers", TREE, "--quick"]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode:
            print("smoke: bench.py failed", file=sys.stderr)
            return 2
        source = HERE / "results" / "partial.json"
    data = json.loads(source.read_text())
    lines, bad = judge(data["results"], args.limit)
    meta = data.get("meta", {})
    print(f"poolmagic {meta.get('poolmagic_commit', '?')} against {args.baseline if args.source is None else 'its baseline'}; "
          f"load average before/after {meta.get('loadavg_before', ['?'])[0]}/{meta.get('loadavg_after', ['?'])[0]}")
    print("\n".join(lines))
    if not lines:
        bad.append("no figure to compare: was the run made with --baseline?")
    if bad:
        print(f"\nsmoke: FAILED, past {args.limit}x the baseline (or not run):\n  " + "\n  ".join(bad))
        return 1
    print(f"\nsmoke: ok (every figure within {args.limit}x of the baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
