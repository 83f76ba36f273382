#!/usr/bin/env python
"""Cold start, many rounds: poolmagic at a base commit, the working tree and mpire (fork), interleaved.

bench.py's cold row is one kernel per peer per run (medians of --rounds only with
--baseline, and without mpire); on a shared 2-core host one run says little. Here
each round starts one fresh kernel per contender, in turn, and times what the cold
row times: poolmagic's ``%load_ext`` and first 2-item ``%%poolmap`` in one cell,
mpire's import, ``WorkerPool(start_method='fork')`` and first map. It prints medians,
quartiles and how often the tree beat each of the others in the same round.

    python benchmarks/cold_rounds.py --base c639cb4 --rounds 15 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PREAMBLE, Kernel, baseline_peer, cell  # noqa: E402

SRC = "def f(x):\n    return x\n"
TREE = str(Path(__file__).resolve().parent.parent / "src")


def poolmagic_cold(pythonpath: str) -> float:
    k = Kernel(env_extra={"PYTHONPATH": pythonpath})
    try:
        k.figures(PREAMBLE)
        return k.figures(cell(
            "_t0 = time.perf_counter()",
            "get_ipython().run_line_magic('load_ext', 'poolmagic')",
            f"get_ipython().run_cell_magic('poolmap', '-q -o r range(2)', {SRC!r})",
            "assert r == [0, 1], r",
            "_emit(cold_s=time.perf_counter() - _t0)"), 30)["cold_s"]
    finally:
        k.close()


def mpire_cold() -> float:
    k = Kernel()
    try:
        k.figures(cell(PREAMBLE, SRC))
        return k.figures(cell(
            "_t0 = time.perf_counter()", "from mpire import WorkerPool",
            "P = WorkerPool(n_jobs=2, start_method='fork', keep_alive=True)",
            "r = P.map(f, range(2), concatenate_numpy_output=False)", "assert list(r) == [0, 1], r",
            "_emit(cold_s=time.perf_counter() - _t0)"), 30)["cold_s"]
    finally:
        k.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git ref of the base poolmagic")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    base_path = baseline_peer(args.base).env["PYTHONPATH"]
    res: dict[str, list[float]] = {"base": [], "tree": [], "mpire": []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        res["base"].append(poolmagic_cold(base_path))
        res["tree"].append(poolmagic_cold(TREE))
        res["mpire"].append(mpire_cold())
        loads.append(os.getloadavg()[0])
    for key, v in res.items():
        q = statistics.quantiles(v, n=4)
        print(f"{key:6} median {statistics.median(v) * 1000:6.1f} ms  quartiles {q[0] * 1000:.0f}-{q[2] * 1000:.0f}"
              f"  min {min(v) * 1000:.0f}  max {max(v) * 1000:.0f}")
    n = args.rounds
    beat_m = sum(t < m for t, m in zip(res["tree"], res["mpire"]))
    beat_b = sum(t < b for t, b in zip(res["tree"], res["base"]))
    print(f"tree faster than mpire in {beat_m}/{n} rounds, than {args.base} in {beat_b}/{n}; "
          f"1-min load {min(loads):.2f}-{max(loads):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": args.base, "res": res, "loads": loads}))


if __name__ == "__main__":
    main()
