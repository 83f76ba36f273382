#!/usr/bin/env python
"""poolmagic's dask backend against its local backend, each in a real Jupyter kernel.

Reuses bench.py's harness and workloads unchanged (a fresh kernel per workload,
the function defined in a notebook cell, figures timed in the kernel); the
dask peer is ``%poolsize 2`` then ``%poolsize --backend dask``: a LocalCluster
of 2 worker processes, 1 thread each, started and owned by poolmagic.

    python benchmarks/dask_rows.py [--quick] [--only tiny,cpu,big,overhead,failures,cold,shutdown] [--tcp N]

Targets (issue "Outgrow one machine"): tiny items ≤ 2 µs/item; a 50 MB global
over 64 items ≤ 0.5 s with no per-task copy; CPU-bound speedup within 5 % of the
local backend's. Cold start and shutdown are reported. Writes
benchmarks/results/dask-latest.json and .md (a partial run: dask-partial.*).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the harness: Kernel, Peer, workloads)
from bench import PREAMBLE, WORKERS, CellFailed, Config, Kernel, Peer, cell  # noqa: E402

DASK = Peer(
    "poolmagic_dask", "poolmagic --backend dask (LocalCluster)", "distributed", "",
    f"%load_ext poolmagic\n%poolsize {WORKERS}\n%poolsize --backend dask", magic=True,
)
# The same LocalCluster on plain tcp:// (no certificate: any local user could use it),
# only to measure what TLS costs (--tcp).
DASK_TCP = Peer(
    "poolmagic_dask_tcp", "poolmagic --backend dask (LocalCluster, plain TCP)", "distributed", "",
    f"%load_ext poolmagic\nimport poolmagic.engine.dask.plumbing as _dp\n_dp.BENCHMARK_PLAIN_TCP = True\n"
    f"%poolsize {WORKERS}\n%poolsize --backend dask", magic=True,
)
LOCAL = bench.PEER_BY_KEY["poolmagic"]
PEERS = (LOCAL, DASK)


def wl_cold(peer: Peer, cfg: Config, fresh) -> dict:
    """A fresh kernel: %load_ext, %poolsize --backend dask, first 2-item map; one cell, then each alone."""
    src = "def f(x):\n    return x\n"
    switch = "get_ipython().run_line_magic('poolsize', '--backend dask')" if peer in (DASK, DASK_TCP) else ""
    if peer is DASK_TCP:
        switch = "import poolmagic.engine.dask.plumbing as _dp; _dp.BENCHMARK_PLAIN_TCP = True; " + switch
    with fresh() as k:
        k.figures(PREAMBLE)
        out = k.figures(cell(
            "_t0 = time.perf_counter()",
            "get_ipython().run_line_magic('load_ext', 'poolmagic')",
            switch,
            peer.map_stmt("f", src, "range(2)"),
            "assert r == [0, 1]",
            "_emit(cold_s=time.perf_counter() - _t0)",
        ), 120)
    with fresh() as k:
        k.figures(PREAMBLE)
        out.update(k.figures(cell("_t0 = time.perf_counter()", "%load_ext poolmagic",
                                  "_emit(load_cell_s=time.perf_counter() - _t0)"), 60))
        if switch:
            out.update(k.figures(cell("_t0 = time.perf_counter()", switch,
                                      "_emit(switch_cell_s=time.perf_counter() - _t0)"), 120))
        out.update(k.figures(cell("_t1 = time.perf_counter()", peer.map_stmt("f", src, "range(2)"),
                                  "_emit(map_cell_s=time.perf_counter() - _t1)"), 120))
    return out


def wl_shutdown(peer: Peer, cfg: Config, fresh) -> dict:
    """Kernel shutdown with a warm pool: seconds until every process under the kernel is gone."""
    src = "def f(x):\n    return x\n"
    k = fresh()
    bench.setup(k, peer, src, timeout=120)
    children = psutil.Process(k.pid).children(recursive=True)
    k.kc.stop_channels()
    t0 = time.monotonic()
    gone: list[float] = []

    def watch() -> None:
        psutil.wait_procs(children, timeout=10)
        gone.append(time.monotonic() - t0)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    k.km.shutdown_kernel(now=False)
    t.join(12)
    k.closed = True
    left = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for pid in left:
        psutil.Process(pid).kill()
    return {"pool_gone_s": gone[0] if gone else None, "processes": len(children), "left": len(left),
            "kernel_exit_s": time.monotonic() - t0}


def wl_itemcpu(peer: Peer, cfg: Config, fresh) -> dict:
    """CPU each 25 ms item takes inside a worker (its thread's time), 16 items × 6 maps,
    against the same loop in the kernel: the map's own overheads left out."""
    src = ("def timed(n):\n    import time\n    t0 = time.thread_time()\n    s = 0\n"
           "    for i in range(n):\n        s += i\n    return time.thread_time() - t0\n")
    with fresh() as k:
        bench.setup(k, peer, src)
        k.figures(peer.map_stmt("timed", src, "[1000] * 16", n=16), 60)  # warm
        fig = k.figures(cell(
            "N = int(300_000 * 0.025 / min(timed(300_000) for _ in range(5)))",
            "_here = [timed(N) for _ in range(16)]",
            "_there = []",
            "for _i in range(6):",
            textwrap.indent(peer.map_stmt("timed", src, "[N] * 16", n=16), "    "),
            "    _there += list(r)",
            "_emit(kernel_ms=statistics.median(_here) * 1e3, worker_ms=statistics.median(_there) * 1e3)",
        ), 120)
    return fig


WORKLOADS = {
    "tiny": bench.wl_tiny,
    "cpu": bench.wl_cpu,
    "itemcpu": wl_itemcpu,
    "big": bench.wl_big,
    "overhead": bench.wl_overhead,
    "failures": bench.wl_failures,
    "cold": wl_cold,
    "shutdown": wl_shutdown,
}

ROWS = [  # (label, workload, key, format, target)
    ("tiny x*x, 100k items, µs/item", "tiny", "us_per_item", "{:.3f}", "≤ 2"),
    ("CPU-bound 16 × 25 ms, speedup on 2", "cpu", "speedup", "{:.2f}", "within 5 % of local"),
    ("  CPU per 25 ms item in a worker, ms", "itemcpu", "worker_ms", "{:.1f}", ""),
    ("  the same loop in the kernel, ms", "itemcpu", "kernel_ms", "{:.1f}", ""),
    ("50 MB global, 64 items, s", "big", "s", "{:.3f}", "≤ 0.5"),
    ("  kernel peak RSS growth, MB", "big", "rss_peak_mb", "{:.0f}", ""),
    ("50 MB global, 1024 items -c 4, s", "big", "c4_1024_s", "{:.3f}", ""),
    ("warm 4-item cell, summary shown, ms", "overhead", "ms", "{:.2f}", ""),
    ("warm 4-item cell, -q, ms", "overhead", "ms_quiet", "{:.2f}", ""),
    ("cold: load + switch + first map, one cell, s", "cold", "cold_s", "{:.2f}", "reported"),
    ("  %load_ext cell, s", "cold", "load_cell_s", "{:.3f}", ""),
    ("  %poolsize --backend dask cell, s", "cold", "switch_cell_s", "{:.2f}", ""),
    ("  first map cell after it, s", "cold", "map_cell_s", "{:.3f}", ""),
    ("worker crash → error, s", "failures", "crash_s", "{:.3f}", ""),
    ("4-item map after the crash, s", "failures", "recovery_s", "{:.3f}", ""),
    ("interrupt → cell returns, s", "failures", "interrupt_s", "{:.3f}", ""),
    ("2-item map after the interrupt, s", "failures", "next_s", "{:.3f}", ""),
    ("kernel shutdown: pool processes gone, s", "shutdown", "pool_gone_s", "{:.2f}", "< 2"),
    ("  processes left behind", "shutdown", "left", "{}", "0"),
]


def fmt(res: dict | None, key: str, spec: str) -> str:
    if not res:
        return "—"
    if res.get("status") != "ok":
        return f"{res.get('status')} ({str(res.get('note', ''))[:40]})"
    v = res.get(key)
    return "—" if v is None else spec.format(v)


def render(results: dict, meta: dict) -> str:
    lines = [
        f"Run of {meta['date']} · {meta['machine']}, {meta['cores']} cores, Python {meta['python']} · "
        f"poolmagic {meta['commit']} · {WORKERS} workers · each figure in its own Jupyter kernel · "
        f"1-min load average before/after {meta['loadavg_before'][0]:.1f}/{meta['loadavg_after'][0]:.1f}.",
        "",
        "| figure | local backend | dask backend (LocalCluster) | target |",
        "|---|---|---|---|",
    ]
    for label, wl, key, spec, target in ROWS:
        if wl not in results:
            continue
        r = results[wl]
        lines.append(f"| {label} | {fmt(r.get('poolmagic'), key, spec)} | {fmt(r.get('poolmagic_dask'), key, spec)} "
                     f"| {target} |")
    cpu = results.get("cpu", {})
    a, b = (cpu.get(p, {}).get("speedup") for p in ("poolmagic", "poolmagic_dask"))
    if a and b:
        lines += ["", f"CPU-bound speedup, dask ÷ local: {b / a:.3f}."]
    fails = results.get("failures", {}).get("poolmagic_dask", {})
    if fails.get("crash_error"):
        lines += ["", f"Error on the worker crash (dask): `{fails['crash_error']}`"]
    return "\n".join(lines) + "\n"


def runs(names: list[str], tcp_rounds: int) -> list[tuple[str, Peer]]:
    """Each workload on each peer; with ``tcp_rounds``, TLS and plain TCP alternating
    that many times per workload (which goes first alternates too), after local."""
    out = []
    for wl in names:
        if wl != "cold":
            out.append((wl, LOCAL))
        if not tcp_rounds:
            out.append((wl, DASK))
            continue
        for i in range(tcp_rounds):
            pair = (DASK, DASK_TCP) if i % 2 == 0 else (DASK_TCP, DASK)
            out += [(wl, p) for p in pair]
    return out


def render_tls(results: dict) -> str:
    """TLS against plain TCP, medians of the alternating rounds."""
    lines = ["", "| figure | dask, TLS (median) | dask, plain TCP (median) | TLS ÷ TCP | rounds (TLS; TCP) |",
             "|---|---|---|---|---|"]
    for label, wl, key, spec, _ in ROWS:
        r = results.get(wl, {})
        a = [x[key] for x in r.get("poolmagic_dask_rounds", []) if x.get("status") == "ok" and x.get(key) is not None]
        b = [x[key] for x in r.get("poolmagic_dask_tcp_rounds", []) if x.get("status") == "ok" and x.get(key) is not None]
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = f"{ma / mb:.2f}" if mb else "—"
        lines.append(f"| {label} | {spec.format(ma)} | {spec.format(mb)} | {ratio} | "
                     f"{', '.join(spec.format(x) for x in a)}; {', '.join(spec.format(x) for x in b)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOADS))
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--tcp", type=int, default=0, metavar="N",
                    help="also the LocalCluster on plain TCP, N rounds alternating with TLS (the cost of TLS)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(WORKLOADS)
    cfg = Config(reps=3, reps_cpu=3, reps_overhead=50) if args.quick else Config(reps_overhead=100)
    cfg.hang = 30.0  # a LocalCluster's worker restart after a crash takes a second or more
    meta = {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(), "commit": bench.git_commit(bench.poolmagic_dir()),
        "command": " ".join(["python", "benchmarks/dask_rows.py", *sys.argv[1:]]),
        "loadavg_before": list(os.getloadavg()), "bytecode": bench.compile_poolmagic(),
    }
    kernels: list[Kernel] = []

    def fresh() -> Kernel:
        k = Kernel()
        kernels.append(k)
        return k

    results: dict = {}
    t_start = time.monotonic()
    try:
        for wl, peer in runs(names, args.tcp):
            results.setdefault(wl, {})
            t0 = time.monotonic()
            try:
                res = {"status": "ok", **WORKLOADS[wl](peer, cfg, fresh)}
            except CellFailed as exc:
                res = {"status": exc.status, "note": exc.detail}
            except Exception as exc:
                res = {"status": "harness error", "note": repr(exc)[:200]}
            res["harness_s"] = round(time.monotonic() - t0, 1)
            if args.tcp and peer.key.startswith("poolmagic_dask"):
                results[wl].setdefault(peer.key + "_rounds", []).append(res)
            results[wl][peer.key] = res
            print(f"[{time.monotonic() - t_start:6.1f}s] {wl:9s} {peer.key:15s} "
                  + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                                if k not in ("ts", "pairs")})[:240], flush=True)
    finally:
        for k in kernels:
            try:
                k.close()
            except Exception as exc:
                print(f"closing kernel {k.pid}: {exc!r}", file=sys.stderr)
    meta["loadavg_after"] = list(os.getloadavg())
    meta["leaked_processes_killed"] = sum(k.leaked for k in kernels)
    meta["total_s"] = round(time.monotonic() - t_start, 1)
    stem = "dask-partial" if (args.only or args.quick or args.tcp) else "dask-latest"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = render(results, meta)
    if args.tcp:
        md += render_tls(results)
    (bench.RESULTS / f"{stem}.md").write_text(md)
    print("\n" + md)
    print(f"total {meta['total_s']} s; leftover processes killed: {meta['leaked_processes_killed']}; "
          f"wrote {bench.RESULTS / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
