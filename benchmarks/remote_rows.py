#!/usr/bin/env python
"""What sending a local module to a remote dask cluster costs, first map and later maps.

A ``dask scheduler`` and 2 ``dask worker`` processes started here in a folder of
their own with a clean environment (as a cluster someone else runs: they cannot
import the notebook's helper module), then, alternating, two versions of the
same 4-item map: the function's code in the notebook (``__main__``), and the
same code in a helper module next to the notebook that the function imports
(which poolmagic sends by value). Each version's first map includes what
happens once per function version (its shipment, the package probe); later
maps are the steady state. Medians of --repeat runs, each in a fresh process.

    python benchmarks/remote_rows.py [--repeat 5] [--maps 30] [--lines 400]

Writes benchmarks/results/remote-latest.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time, textwrap
sys.path.insert(0, sys.argv[3])
import poolmagic
mode, address, folder, maps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ns = {"__name__": "__main__"}
if mode == "module":
    exec("import helpermod\ndef f(x):\n    return helpermod.work(x)\n", ns)
else:
    exec(open(folder + "/helpermod.py").read() + "\ndef f(x):\n    return work(x)\n", ns)
f = ns["f"]
pool = poolmagic.Pool(2, backend="dask", address=address)
pool.backend.wait_workers(2, 30)
t0 = time.perf_counter(); pool.map(f, range(4)); first = time.perf_counter() - t0
later = []
for _ in range(maps):
    t0 = time.perf_counter(); pool.map(f, range(4)); later.append(time.perf_counter() - t0)
import pickle
size = len(poolmagic.serialize.dump_function(pool.backend.prepare_function(f, range(4), False)[0]).data)
pool.shutdown()
print(json.dumps({"first_s": first, "later_s": sorted(later)[len(later) // 2], "payload_bytes": size}))
"""


def helper_source(lines: int) -> str:
    body = [f"def step_{i}(x):\n    return x + {i}\n" for i in range(max(1, lines // 3))]
    return "".join(body) + "def work(x):\n    return step_0(x) * 2\n"


def start_cluster(home: Path) -> tuple[str, list]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    exe = Path(sys.executable).with_name("dask")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]
    common = ["--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    sched = home / "scheduler.json"
    procs = [subprocess.Popen([*cli, "scheduler", "--port", "0", "--scheduler-file", str(sched), *common], cwd=home,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    deadline = time.monotonic() + 30
    while not sched.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(2):
        procs.append(subprocess.Popen([*cli, "worker", "--scheduler-file", str(sched), "--nthreads", "1", *common],
                                      cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    return json.loads(sched.read_text())["address"], procs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--maps", type=int, default=30)
    ap.add_argument("--lines", type=int, default=400, help="lines of the helper module")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="poolmagic-remote-bench-"))
    home, notebook = root / "cluster", root / "notebook"
    home.mkdir()
    notebook.mkdir()
    (notebook / "helpermod.py").write_text(helper_source(args.lines))
    address, procs = start_cluster(home)
    rows: dict[str, list[dict]] = {"notebook": [], "module": []}
    try:
        for _ in range(args.repeat):
            for mode in ("notebook", "module"):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, address, str(notebook), str(args.maps)],
                                     capture_output=True, text=True, timeout=300)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 9)
            except OSError:
                pass
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    size = (notebook / "helpermod.py").stat().st_size
    lines = [
        f"Run {datetime.date.today()} · {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()} · "
        f"a CLI dask cluster on this machine, 2 workers, clean environment · 4-item maps · medians of {args.repeat} "
        f"processes ({args.maps} later maps each) · 1-min load {os.getloadavg()[0]:.1f} at the end",
        "",
        f"Command: `python benchmarks/remote_rows.py --repeat {args.repeat} --maps {args.maps} --lines {args.lines}`",
        "",
        "| the function's code | first map ms | later maps ms | function payload |",
        "|---|---|---|---|",
    ]
    for mode, label in (("notebook", "in the notebook"), ("module", f"in a helper module ({args.lines} lines, {size / 1024:.1f} KB), sent by value")):
        m = med[mode]
        lines.append(f"| {label} | {m['first_s'] * 1e3:.1f} | {m['later_s'] * 1e3:.2f} | {m['payload_bytes'] / 1024:.1f} KB |")
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "remote-latest.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
