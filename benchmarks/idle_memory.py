"""An idle warm pool's memory: poolmagic against loky, alternating, PSS summed over every process.

    python benchmarks/idle_memory.py [--pairs 3]

Each run is a fresh Python process that starts a 2-worker pool, maps twice over 4
items, waits 1 s, and sums ``Pss:`` of ``/proc/PID/smaps_rollup`` over every
descendant process (workers, forkserver, resource trackers). PSS shares a page
among the processes that map it, so the sum is what the pool costs the machine.
The figure README.md states comes from here.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, os, sys, time, psutil
    def f(x):
        return x
    def pss(pid):
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return sum(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
    if __name__ == "__main__":
        if sys.argv[1] == "poolmagic":
            import poolmagic
            pool = poolmagic.Pool(2)
            run = lambda: pool.map(f, range(4))
        else:
            from loky import get_reusable_executor
            pool = get_reusable_executor(max_workers=2)
            run = lambda: list(pool.map(f, range(4)))
        run(); run()
        time.sleep(1)
        kids = psutil.Process().children(recursive=True)
        print(json.dumps({p.name() + ":" + str(p.pid): pss(p.pid) for p in kids}))
""")


def measure(peer: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, peer], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    print("| run | poolmagic MB (processes) | loky MB (processes) |\n| --- | --- | --- |")
    for i in range(args.pairs):
        row = []
        for peer in ("poolmagic", "loky"):
            kb = measure(peer)
            row.append(f"{sum(kb.values()) / 1024:.1f} ({len(kb)})")
        print(f"| {i + 1} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
