#!/usr/bin/env python
"""poolmagic against its peers, each in a real Jupyter kernel.

Every (workload, peer) pair runs in a fresh kernel started from this Python (run it with
the venv's interpreter). The mapped function is defined in a notebook cell, so it lives
in ``__main__`` as a user meets it. Figures are timed inside the kernel with
``time.perf_counter`` and printed back as ``@@BENCH {json}`` lines; only the interrupt
workload is timed from outside. Every execute has a timeout: a peer that hangs is
reported as "hang", its kernel interrupted and, if still stuck, killed.

    python benchmarks/bench.py [--quick] [--only tiny,cpu] [--peers poolmagic,loky]
    python benchmarks/bench.py --only numpy,bigresult,bigarg,many   # the data-science rows
    python benchmarks/bench.py --baseline HEAD~1 --only overhead,tiny,cold --peers poolmagic
                                     # the working tree against a commit, alternating, with ratios

Workloads: cold, tiny, cpu, overhead, big, gen, failures, wait; data-science rows numpy,
bigresult, bigarg, many (see README.md). A full run writes benchmarks/results/latest.json
and latest.md; a partial one (--only, --peers, --quick) partial.json and partial.md.
"""
from __future__ import annotations

import argparse
import compileall
import datetime
import importlib.util
import json
import math
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
from jupyter_client import KernelManager

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKERS = 2


# ===================================================================== harness
PREAMBLE = """\
import json, os, statistics, sys, time
def _emit(**kw):
    print("@@BENCH " + json.dumps(kw), flush=True)
"""

PEAK_RSS = """\
import resource, threading, psutil
class _Peak:
    '''Peak RSS of this kernel while the block runs (sampled every 2 ms).'''
    def __enter__(self):
        self.p = psutil.Process()
        self.base = self.peak = self.p.memory_info().rss
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self
    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.p.memory_info().rss)
    def __exit__(self, *exc):
        self._stop.set(); self._t.join()
        self.end = self.p.memory_info().rss
        self.peak = max(self.peak, self.end)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if maxrss > self.maxrss0:  # the high-water mark rose in the block: it catches short spikes
            self.peak = max(self.peak, maxrss * 1024)
    def mb(self, what):
        return (getattr(self, what) - self.base) / 2**20
"""


class CellFailed(Exception):
    """A cell hung or raised; ``status`` is "hang" or "error"."""

    def __init__(self, status: str, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


class PeerBroken(CellFailed):
    """The peer's first map of a notebook function failed: skip its other workloads."""


@dataclass
class Exec:
    """One execute request and what the kernel sent back for it."""

    msg_id: str
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # "Ename: evalue"
    done: bool = False
    done_at: float | None = None  # time.monotonic() when the kernel went idle

    @property
    def figures(self) -> dict:
        out: dict = {}
        for line in self.stdout.splitlines():
            if line.startswith("@@BENCH "):
                out.update(json.loads(line[8:]))
        return out


class Kernel:
    """A fresh python3 kernel (this interpreter) with a blocking client."""

    def __init__(self, hang_grace: float = 5.0, env_extra: dict | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOLMAGIC_")}
        env["PYTHONWARNINGS"] = "ignore"
        env.update(env_extra or {})
        self.km = KernelManager(kernel_name="python3")
        self.km.shutdown_wait_time = 3.0
        self.km.start_kernel(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.km.provisioner.process.pid
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=60)
        except RuntimeError:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)
            raise
        self.hang_grace = hang_grace
        self.stuck = False  # a cell ignored the interrupt: nothing more can run here
        self.leaked = 0
        self.closed = False
        self.python = self.run("import sys; print(sys.executable)", 30).stdout.strip()

    # ------------------------------------------------------------ executing
    def submit(self, code: str) -> Exec:
        return Exec(self.kc.execute(code, store_history=True))

    def wait(self, ex: Exec, timeout: float, until: str | None = None) -> bool:
        """Collect output until the kernel is idle (True), ``until`` is printed, or timeout."""
        deadline = time.monotonic() + timeout
        while not ex.done:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != ex.msg_id:
                continue
            kind, c = msg["msg_type"], msg["content"]
            if kind == "stream":
                if c["name"] == "stdout":
                    ex.stdout += c["text"]
                else:
                    ex.stderr += c["text"]
                if until and until in ex.stdout:
                    return False
            elif kind == "error":
                ex.error = f"{c['ename']}: {c['evalue']}"[:300]
            elif kind == "status" and c["execution_state"] == "idle":
                ex.done, ex.done_at = True, time.monotonic()
        self._drain_reply(ex.msg_id)
        return True

    def _drain_reply(self, msg_id: str) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if self.kc.get_shell_msg(timeout=1)["parent_header"].get("msg_id") == msg_id:
                    return
            except queue.Empty:
                pass

    def free(self, ex: Exec) -> None:
        """After a hang: interrupt; if the cell still does not return, the kernel is stuck."""
        self.km.interrupt_kernel()
        if not self.wait(ex, self.hang_grace):
            self.stuck = True

    def run(self, code: str, timeout: float = 30.0) -> Exec:
        """Run a cell; on timeout free the kernel and raise CellFailed("hang")."""
        if self.stuck:
            raise CellFailed("skipped", "kernel stuck after an earlier hang")
        ex = self.submit(code)
        if not self.wait(ex, timeout):
            self.free(ex)
            raise CellFailed("hang", f">{timeout:g} s" + stderr_hint(ex.stderr))
        return ex

    def figures(self, code: str, timeout: float = 30.0) -> dict:
        """Run a cell that must succeed and return what it ``_emit``-ed."""
        ex = self.run(code, timeout)
        if ex.error:
            raise CellFailed("error", ex.error.split(":")[0] + stderr_hint(ex.stderr))
        return ex.figures

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        try:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=self.stuck)
        finally:
            gone, alive = psutil.wait_procs(procs, timeout=2)
            for p in alive:
                try:
                    p.kill()
                    self.leaked += 1
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=2)

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stderr_hint(stderr: str) -> str:
    """The last telling line of a kernel's stderr (worker tracebacks land there)."""
    for line in reversed(stderr.strip().splitlines()):
        if "Error" in line or "error" in line:
            return f" ({line.strip()[:120]})"
    return ""


def cell(*parts: str) -> str:
    """Cell code from lines and blocks (kept as given: indentation is meaningful)."""
    return "\n".join(p.rstrip("\n") for p in parts if p) + "\n"


def timed_loop(stmt: str, reps: int, warm: int = 1) -> str:
    """Cell code: run ``stmt`` warm+reps times; keep the last ``reps`` times in ``_ts``."""
    return cell(
        "_ts = []",
        f"for _i in range({warm + reps}):",
        "    _t = time.perf_counter()",
        textwrap.indent(stmt, "    "),
        "    _ts.append(time.perf_counter() - _t)",
        f"_ts = _ts[{warm}:]",
    )


# ===================================================================== peers
@dataclass
class Peer:
    key: str
    label: str
    module: str  # importable in this venv, else the peer is skipped
    imports: str
    create: str  # cell code that creates (and starts) the pool; {w} the number of workers
    expr: str = ""  # map expression returning a list; {f} function, {it} iterable, {w} workers
    chunk_expr: str = ""  # same with chunk size {c} (executors only)
    auto_chunk: bool = False  # executors default to chunksize 1: use Pool's len/(4*workers)
    magic: bool = False  # poolmagic: map through %%poolmap, the cell defines the function
    tiny_n: int = 100_000  # items of the tiny workload (dask: one task per item, ~ms each)
    reference: bool = False  # not a pool: a serial reference, run only where a workload names it
    env: dict = field(default_factory=dict)  # extra environment of its kernels (a baseline's PYTHONPATH)
    rows: tuple | None = None  # the only workloads it runs (None: every workload open to all peers)

    def create_code(self, workers: int = WORKERS) -> str:
        return self.create.format(w=workers)

    def map_stmt(self, f: str, src: str, it: str, n: int | None = None, chunk: int | None = None,
                 quiet: bool = True, workers: int = WORKERS) -> str:
        """A statement that maps function ``f`` (source ``src``) over ``it`` into ``r``."""
        if self.magic:
            line = " ".join(o for o in ["-q" if quiet else "", f"-c {chunk}" if chunk else "", "-o r", it] if o)
            return f"get_ipython().run_cell_magic('poolmap', {line!r}, {src!r})"
        if chunk is None and self.auto_chunk and n:
            chunk = max(1, math.ceil(n / (4 * workers)))
        if chunk and not self.chunk_expr:
            raise ValueError(f"{self.key}: no chunk size template")
        tpl = self.chunk_expr if chunk else self.expr
        return "r = " + tpl.format(f=f, it=it, c=chunk, w=workers)


def _mp(method: str) -> Peer:
    return Peer(
        f"mp_{method}", f"multiprocessing.Pool ({method})", "multiprocessing",
        "import multiprocessing as mp", f"P = mp.get_context({method!r}).Pool({{w}})", "P.map({f}, {it})",
    )


_LOKY = "get_reusable_executor(max_workers={w})"
_JOBLIB = "Parallel(n_jobs={w}, backend='loky'"
PEERS = [
    Peer("poolmagic", "poolmagic (forkserver)", "poolmagic", "", "%load_ext poolmagic\n%poolsize {w}",
         magic=True),
    _mp("fork"),
    _mp("forkserver"),
    Peer("ppe_forkserver", "ProcessPoolExecutor (forkserver)", "concurrent.futures",
         "import multiprocessing as mp\nfrom concurrent.futures import ProcessPoolExecutor",
         "P = ProcessPoolExecutor({w}, mp_context=mp.get_context('forkserver'))",
         "list(P.map({f}, {it}))", "list(P.map({f}, {it}, chunksize={c}))", auto_chunk=True),
    Peer("loky", "loky reusable executor", "loky", "from loky import get_reusable_executor", f"P = {_LOKY}",
         f"list({_LOKY}.map({{f}}, {{it}}))", f"list({_LOKY}.map({{f}}, {{it}}, chunksize={{c}}))",
         auto_chunk=True),
    Peer("joblib", "joblib Parallel (loky)", "joblib", "from joblib import Parallel, delayed", f"P = {_JOBLIB})",
         f"{_JOBLIB})(delayed({{f}})(x) for x in {{it}})"),
    Peer("mpire", "mpire WorkerPool (fork)", "mpire", "from mpire import WorkerPool",
         "P = WorkerPool(n_jobs={w}, start_method='fork', keep_alive=True)",
         # a list of results, as the others return (by default mpire concatenates numpy results)
         "P.map({f}, {it}, concatenate_numpy_output=False)"),
    # Every listening socket on 127.0.0.1, no dashboard.
    Peer("dask", "dask.distributed LocalCluster", "distributed",
         "import logging\nfrom dask.distributed import Client, LocalCluster\n"
         "logging.getLogger('distributed').setLevel(logging.ERROR)",
         "C = Client(LocalCluster(n_workers={w}, threads_per_worker=1, processes=True,"
         " host='127.0.0.1', dashboard_address=None))",
         "C.gather(C.map({f}, {it}, pure=False))", tiny_n=2_000),
]
# Thread pools, for maps that wait: only the rows where threads mean something (a crash
# in the failures row would end their kernel, the cpu row is the GIL's, and the cold row
# times the magic on the default backend).
THREAD_ROWS = ("wait", "overhead")
PEERS += [
    Peer("poolmagic_threads", "poolmagic (threads backend)", "poolmagic", "",
         "%load_ext poolmagic\n%poolsize {w} --backend threads", magic=True, rows=THREAD_ROWS),
    Peer("tpe", "ThreadPoolExecutor", "concurrent.futures", "from concurrent.futures import ThreadPoolExecutor",
         "P = ThreadPoolExecutor({w})", "list(P.map({f}, {it}))", "list(P.map({f}, {it}, chunksize={c}))",
         rows=THREAD_ROWS),
]
# poolmagic's dask backend, and raw dask on a cluster started elsewhere: only the rows that
# time a map's own cost (a crash or an interrupt is the dask_rows.py script's, and the
# magic's cold row would time the default backend). tiny is dask-sized, as the dask peer's.
DASK_ROWS = ("overhead", "tiny", "cpu")
# A scheduler and {w} workers (1 thread each) on 127.0.0.1, plain tcp, in a folder of their
# own, as `dask scheduler` / `dask worker` from this venv: "a cluster someone else runs".
# Each in a session of its own (the kernel's interrupt does not reach it), killed with the
# kernel even if the kernel is SIGKILLed (Linux PR_SET_PDEATHSIG: the nanny's worker then
# exits when its pipe to the nanny closes), and at the kernel's exit (atexit).
REMOTE_CLUSTER = '''\
import atexit, ctypes, json, os, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path
def _start_cluster(n):
    home = Path(tempfile.mkdtemp(prefix="poolmagic-bench-cluster-"))
    exe = Path(sys.executable).with_name("dask")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]
    common = ["--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    kernel = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    def die_with_kernel():  # in the child, before exec: as little Python as can be
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != kernel:  # the kernel died before the line above
            os._exit(1)
    procs = []
    def stop():
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + 1.5
        for p in procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
        shutil.rmtree(home, ignore_errors=True)
    atexit.register(stop)
    def launch(*args):
        procs.append(subprocess.Popen([*cli, *args, *common], cwd=home, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=open(home / f"log-{len(procs)}.txt", "w"),
                                      start_new_session=True, preexec_fn=die_with_kernel))
    sched = home / "scheduler.json"
    launch("scheduler", "--port", "0", "--scheduler-file", str(sched))
    deadline, address = time.monotonic() + 30, None
    while address is None:  # the file may be there before all of it is
        try:
            address = json.loads(sched.read_text())["address"]
        except (OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: see {home}")
            time.sleep(0.05)
    for _ in range(n):
        launch("worker", "--scheduler-file", str(sched), "--nthreads", "1")
    from distributed import Client
    with Client(address, timeout=30) as c:  # every worker in before the first map
        c.wait_for_workers(n, timeout=30)
    return address
'''
DASK_IMPORTS = ("import logging\nfrom dask.distributed import Client, LocalCluster\n"
                "logging.getLogger('distributed').setLevel(logging.ERROR)")
PEERS += [
    Peer("poolmagic_dask", "poolmagic dask backend (its LocalCluster)", "distributed", "",
         "%load_ext poolmagic\n%poolsize {w} --backend dask", magic=True, tiny_n=2_000, rows=DASK_ROWS),
    Peer("poolmagic_remote", "poolmagic dask backend (CLI cluster, tcp)", "distributed", REMOTE_CLUSTER,
         "_ADDR = _start_cluster({w})\n%load_ext poolmagic\n%poolsize {w} --backend dask --address $_ADDR",
         magic=True, tiny_n=2_000, rows=DASK_ROWS),
    Peer("dask_remote", "dask.distributed Client (CLI cluster, tcp)", "distributed", REMOTE_CLUSTER + DASK_IMPORTS,
         "C = Client(_start_cluster({w}))", "C.gather(C.map({f}, {it}, pure=False))", tiny_n=2_000, rows=DASK_ROWS),
]
# The numpy row's serial reference: a plain loop in one kernel, numpy's default BLAS threads.
SERIAL = Peer("serial", "plain loop, one process (no pool)", "numpy", "", "", reference=True)
PEER_BY_KEY = {p.key: p for p in PEERS + [SERIAL]}

WARM_SRC = "def _warm(x):\n    return x\n"


def setup(k: Kernel, peer: Peer, defs: str, extra: str = "", timeout: float = 30.0) -> None:
    """Preamble, the notebook's functions, then a warm pool (one small map done)."""
    k.figures(cell(PREAMBLE, extra), timeout)
    k.figures(cell(defs, WARM_SRC), timeout)  # before the pool: fork-based pools see them
    k.figures(cell(peer.imports, peer.create_code()), timeout)
    try:
        k.figures(peer.map_stmt("_warm", WARM_SRC, "range(4)", n=4) + "\n", timeout)
    except CellFailed as exc:
        raise PeerBroken(exc.status, exc.detail) from None


# ===================================================================== workloads
# Each takes (peer, cfg, fresh) where fresh() gives a new Kernel, and returns figures.

def wl_cold(peer: Peer, cfg, fresh) -> dict:
    """Fresh kernel: from before the imports / %load_ext to the first 2-item map's return."""
    src = "def f(x):\n    return x\n"
    if peer.magic:
        with fresh() as k:  # load and map in one cell
            k.figures(PREAMBLE)
            out = k.figures(cell(
                "_t0 = time.perf_counter()",
                "get_ipython().run_line_magic('load_ext', 'poolmagic')",
                peer.map_stmt("f", src, "range(2)"),
                "import poolmagic",
                "_emit(cold_s=time.perf_counter() - _t0, backend=poolmagic.get_pool().backend.description,"
                " size=poolmagic.get_pool().size)",
            ), cfg.hang)
        with fresh() as k:  # %load_ext in its own cell, the map cell right after
            k.figures(PREAMBLE)
            out.update(k.figures(cell("_t0 = time.perf_counter()", "%load_ext poolmagic",
                                      "_emit(load_cell_s=time.perf_counter() - _t0)"), cfg.hang))
            out.update(k.figures(cell("_t1 = time.perf_counter()", peer.map_stmt("f", src, "range(2)"),
                                      "_emit(map_cell_s=time.perf_counter() - _t1)"), cfg.hang))
        return out
    with fresh() as k:
        k.figures(cell(PREAMBLE, src))
        try:
            return k.figures(cell(
                "_t0 = time.perf_counter()", peer.imports, "_t1 = time.perf_counter()", peer.create_code(),
                peer.map_stmt("f", src, "range(2)", n=2),
                "assert list(r) == [0, 1], r",
                "_emit(cold_s=time.perf_counter() - _t0, import_s=_t1 - _t0)",
            ), cfg.hang)
        except CellFailed as exc:
            raise PeerBroken(exc.status, exc.detail) from None


def wl_tiny(peer: Peer, cfg, fresh) -> dict:
    """x*x over range(100_000): µs per item, median of warm repeats."""
    n, src = peer.tiny_n, "def f(x):\n    return x * x\n"
    with fresh() as k:
        setup(k, peer, src)
        fig = k.figures(cell(timed_loop(peer.map_stmt("f", src, f"range({n})", n=n), cfg.reps),
                             f"assert len(r) == {n} and r[-1] == {(n - 1) ** 2}", "_emit(ts=_ts)"), 120)
        out = {"us_per_item": statistics.median(fig["ts"]) / n * 1e6, "n": n, "ts": fig["ts"]}
        if peer.magic:  # what --checkpoint costs on the same map: interleaved pairs, each a new file
            plain = peer.map_stmt("f", src, f"range({n})", n=n)
            ck = (f"get_ipython().run_cell_magic('poolmap', '-q -o r --checkpoint ' + "
                  f"os.path.join(_d, f'c{{_i}}.ckpt') + ' range({n})', {src!r})")
            pairs = k.figures(cell(
                "import os, shutil, tempfile", "_d = tempfile.mkdtemp()", "_a, _b = [], []",
                f"for _i in range({cfg.reps_ck}):",
                "    _t = time.perf_counter()", textwrap.indent(plain, "    "), "    _a.append(time.perf_counter() - _t)",
                "    _t = time.perf_counter()", textwrap.indent(ck, "    "), "    _b.append(time.perf_counter() - _t)",
                f"    assert len(r) == {n} and r[-1] == {(n - 1) ** 2}",
                "shutil.rmtree(_d)", "_emit(plain=_a, ck=_b)"), 300)
            a, b = statistics.median(pairs["plain"]), statistics.median(pairs["ck"])
            out.update(ck_plain_s=a, ck_s=b, ck_pct=(b / a - 1) * 100)
    return out


def wl_cpu(peer: Peer, cfg, fresh) -> dict:
    """16 pure-Python items of ~25 ms: serial time / parallel wall, median of alternating pairs, in this kernel."""
    src = "def work(n):\n    s = 0\n    for i in range(n):\n        s += i\n    return s\n"
    with fresh() as k:
        setup(k, peer, src)
        # warm first: a pool still starting in the background (a forkserver importing,
        # workers booting) slowed this calibration and made the items half as long
        k.figures(peer.map_stmt("work", src, "[1000] * 16", n=16), 60)
        k.figures(textwrap.dedent("""
            _ds = []
            for _i in range(5):
                _t = time.perf_counter(); work(300_000); _ds.append(time.perf_counter() - _t)
            N = int(300_000 * 0.025 / min(_ds))  # ~25 ms per item
            ITEMS = [N] * 16
        """))
        # Serial and parallel runs alternate, and the speedup is the median of the pairs'
        # ratios: this machine's speed drifts (shared host), which skews a ratio of two
        # separately measured minima by up to ±10 %.
        k.figures("_s = [work(x) for x in ITEMS]\n" + peer.map_stmt("work", src, "ITEMS", n=16), 60)  # warm
        fig = k.figures(cell(
            "_pairs = []",
            f"for _i in range({cfg.reps_cpu}):",
            "    _t = time.perf_counter(); _s = [work(x) for x in ITEMS]; _ser = time.perf_counter() - _t",
            "    _t = time.perf_counter()",
            textwrap.indent(peer.map_stmt("work", src, "ITEMS", n=16), "    "),
            "    _pairs.append((_ser, time.perf_counter() - _t))",
            "assert list(r) == _s",
            "_emit(pairs=_pairs, N=N)",
        ), 120)
    pairs = fig["pairs"]
    ratio = statistics.median(a / b for a, b in pairs)
    s, p = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
    return {"speedup": ratio, "serial_s": s, "parallel_s": p, "item_ms": s / 16 * 1e3, "N": fig["N"]}


def wl_overhead(peer: Peer, cfg, fresh) -> dict:
    """4 no-op items on a warm pool, per cell; poolmagic: the whole magic, summary shown."""
    src = "def noop(x):\n    return x\n"
    out = {}
    with fresh() as k:
        setup(k, peer, src)
        variants = {"ms": False, "ms_quiet": True} if peer.magic else {"ms": True}
        for key, quiet in variants.items():
            fig = k.figures(cell("sys.stdout.flush()", "_T0 = time.perf_counter()",
                                 timed_loop(peer.map_stmt("noop", src, "range(4)", n=4, quiet=quiet),
                                            cfg.reps_overhead, warm=3),
                                 "sys.stdout.flush()  # the loop's cards sent: their I/O-thread work counted",
                                 "_T = time.perf_counter() - _T0",
                                 "assert list(r) == [0, 1, 2, 3]", "_emit(ts=_ts, total=_T)"), 60)
            out[key] = statistics.median(fig["ts"]) * 1e3
            # the median leaves out the I/O thread's batches of cards (they land on a few maps): the
            # whole loop, divided by its maps, keeps them
            out[key.replace("ms", "loop_ms")] = fig["total"] / (cfg.reps_overhead + 3) * 1e3
    return out


def wl_big(peer: Peer, cfg, fresh) -> dict:
    """A 50 MB numpy global read by the function: first map after defining the array."""
    src = "def f(i):\n    return float(ARR[i])\n"

    def timed(stmt: str, n: int) -> str:
        return cell("with _Peak() as _m:", "    _t = time.perf_counter()", textwrap.indent(stmt, "    "),
                    "    _d = time.perf_counter() - _t",
                    f"assert len(r) == {n} and r[3] == float(ARR[3])",
                    "_emit(s=_d, rss_peak_mb=_m.mb('peak'), rss_after_mb=_m.mb('end'))")

    def first_map(stmt: str, n: int) -> dict:  # a fresh kernel each: RSS high-water marks stay comparable
        with fresh() as k:
            setup(k, peer, src, extra=PEAK_RSS + "import numpy as np\n")
            k.figures("ARR = np.random.rand(50_000_000 // 8)\n")
            return k.figures(timed(stmt, n), 120)

    out = first_map(peer.map_stmt("f", src, "range(64)", n=64), 64)
    if peer.magic:
        out.update({f"c4_1024_{key}": v for key, v in
                    first_map(peer.map_stmt("f", src, "range(1024)", chunk=4), 1024).items()})
    return out


GEN_STMT = {  # mapping x*x over a generator of 10 million items
    "poolmagic": None,  # the magic, below
    "mp_fork": "r = list(P.imap(f, (i for i in range(10_000_000)), chunksize=10_000))",
}


def wl_gen(peer: Peer, cfg, fresh) -> dict:
    """Peak kernel RSS growth while mapping over a 10M-item generator ÷ the result's size."""
    src = "def f(x):\n    return x * x\n"
    stmt = GEN_STMT.get(peer.key) or peer.map_stmt("f", src, "(i for i in range(10_000_000))")
    with fresh() as k:
        setup(k, peer, src, extra=PEAK_RSS + "import gc\n")
        return k.figures(cell(
            "gc.collect()",
            "with _Peak() as _m:", "    _t = time.perf_counter()", textwrap.indent(stmt, "    "),
            "    _d = time.perf_counter() - _t",
            "_res_mb = (sys.getsizeof(r) + sum(map(sys.getsizeof, r))) / 2**20",
            "assert len(r) == 10_000_000 and r[-1] == 9_999_999 ** 2",
            "_emit(s=_d, peak_mb=_m.mb('peak'), result_mb=_res_mb,"
            " ratio=_m.mb('peak') / _res_mb)",
        ), cfg.hang_gen)


def wl_failures(peer: Peer, cfg, fresh) -> dict:
    """Issue #3: a worker crash, recovery, and an interrupt during long tasks."""
    srcs = {
        "crash": "def crash(x):\n    import os\n    if x == 1:\n        os._exit(1)\n    return x\n",
        "inc": "def inc(x):\n    return x + 1\n",
        "sleepy": "def sleepy(x):\n    import time\n    time.sleep(30)\n    return x\n",
    }
    out: dict = {}

    def step(name: str, fn: str, n: int, check: str = "None") -> None:
        """Map ``fn`` over range(n); record time, the error raised, and whether ``check`` holds."""
        code = cell(
            "_t = time.perf_counter()",
            "try:",
            textwrap.indent(peer.map_stmt(fn, srcs[fn], f"range({n})", n=n), "    "),
            "    _e = None",
            "except BaseException as e:",
            "    _e = f'{type(e).__name__}: {e}'[:160]",
            f"_emit(s=time.perf_counter() - _t, error=_e, ok=({check}) if _e is None else False)",
        )
        try:
            fig = k.figures(code, cfg.hang)
            out[f"{name}_s"], out[f"{name}_error"], out[f"{name}_ok"] = fig["s"], fig["error"], fig["ok"]
        except CellFailed as exc:
            out[f"{name}_s"], out[f"{name}_error"] = exc.status, exc.detail

    with fresh() as k:
        setup(k, peer, "\n".join(srcs.values()))
        step("crash", "crash", 4)
        step("recovery", "inc", 4, check="list(r) == [1, 2, 3, 4]")
        # Interrupt from outside during a map of 30 s sleeps, as the notebook's stop button does.
        if k.stuck:
            out["interrupt_s"] = "skipped"
        else:
            ex = k.submit(cell("print('@@STARTED', flush=True)",
                               peer.map_stmt("sleepy", srcs["sleepy"], "range(4)", n=4)))
            k.wait(ex, cfg.hang, until="@@STARTED")
            time.sleep(1.0)  # let the workers pick up their tasks
            t_int = time.monotonic()
            k.km.interrupt_kernel()
            if k.wait(ex, cfg.hang):
                out["interrupt_s"], out["interrupt_error"] = ex.done_at - t_int, (ex.error or "none").split(":")[0]
            else:
                out["interrupt_s"] = "hang"
                k.free(ex)
        step("next", "inc", 2, check="list(r) == [1, 2]")
    return out


# --------------------------------------------------------------------- data-science rows
# Issue "Real data-science items": numpy inside workers, big results, big arguments, many
# workers. Each (row, variant, peer) runs in a fresh kernel: the kernel's RSS high-water
# mark cannot be reset. The numpy and big-result functions import numpy themselves, so that
# a fork-based pool whose workers were forked before the kernel imported numpy can still
# run them; the big-argument one uses the kernel's np, as users write it.
DS_PEERS = ["poolmagic", "mp_fork", "loky", "joblib", "mpire", "dask"]
DS_WORKLOADS = ("numpy", "bigresult", "bigarg", "many")
MANY_WORKERS = 32

HWM = """\
import gc
def _status_kb(field):
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(field + ':'):
                return int(line.split()[1])
class _Hwm:
    '''This kernel's peak RSS growth over a block: VmHWM after it minus VmRSS before it.

    The high-water mark cannot be reset (hence a fresh kernel per row and peer). If it
    did not rise during the block, the difference is only an upper bound: exact=False.'''
    def __enter__(self):
        gc.collect()
        self.rss0, self.hwm0 = _status_kb('VmRSS'), _status_kb('VmHWM')
        return self
    def __exit__(self, *exc):
        self.hwm1, self.rss1 = _status_kb('VmHWM'), _status_kb('VmRSS')
    def figures(self, prefix=''):
        return {prefix + 'rss_peak_mb': (self.hwm1 - self.rss0) / 1024,
                prefix + 'rss_after_mb': (self.rss1 - self.rss0) / 1024,
                prefix + 'rss_peak_exact': self.hwm1 > self.hwm0,
                prefix + 'rss_base_mb': self.rss0 / 1024}
"""

MATMUL_SRC = """\
def matmul(i):
    import numpy as np
    rng = np.random.default_rng(i)
    a, b = rng.random((400, 400)), rng.random((400, 400))
    for _ in range(12):
        a = a @ b
        a /= np.abs(a).max()  # keeps the values finite
    return float(a.sum())
"""

BLAS_SRC = """\
def blas_threads(i):
    import os, time
    import numpy
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.getpid(), None
    time.sleep(0.05)  # so that every worker takes some of the items
    return os.getpid(), sorted({(d['user_api'], d['internal_api'], d['num_threads']) for d in threadpool_info()})
"""

BIGRES_SRC = "def big_result(i):\n    import numpy as np\n    return np.full(4_000_000, i, dtype=np.float64)\n"
SMALLRES_SRC = "def small_result(i):\n    import numpy as np\n    return np.full(1_000, i, dtype=np.float64)\n"
# As users write it: the kernel's global np. With numpy imported after the pool, a fork-based
# pool's workers have no np (NameError), and a worker that unpickles the items (numpy arrays)
# while it loads the function (which imports numpy) imports numpy on two threads at once.
ARGSUM_SRC = "def arg_sum(a):\n    return float(np.sum(a))\n"
NAP_SRC = "def nap(x):\n    import time\n    time.sleep(0.02)\n    return x\n"
TRIV_SRC = "def triv(x):\n    return x\n"

# numpy in the kernel: after the pool is created (what users do: %load_ext first), or before.
NUMPY_ORDERS = ("after", "before")


def budget_loop(stmt: str, reps: int, budget: float, first: str = "", pre: str = "") -> str:
    """Cell code: up to ``reps`` timed runs of ``stmt`` into ``_ts`` (counting ``first``, a time
    already measured), fewer once they add up to ``budget`` seconds: a slow peer is not
    timed over and over. ``pre`` runs untimed before each run."""
    return cell(
        f"_ts = [{first}]",
        f"while len(_ts) < {reps} and sum(_ts) < {budget}:",
        textwrap.indent(pre, "    "),
        "    _t = time.perf_counter()",
        textwrap.indent(stmt, "    "),
        "    _ts.append(time.perf_counter() - _t)",
    )


def failed(out: dict, prefix: str, exc: CellFailed) -> None:
    """Record a sub-measurement that hung or raised, so the other ones still count."""
    out[f"{prefix}s"], out[f"{prefix}error"] = exc.status, exc.detail


def ds_setup(k: Kernel, peer: Peer, defs: str, order: str, extra: str = "") -> None:
    """Like setup(), with numpy imported by the kernel before or after the pool."""
    if order == "before":
        extra += "import numpy as np\n"
    setup(k, peer, defs, extra=extra, timeout=60)
    if order == "after":
        k.figures("import numpy as np\n")


def blas_summary(rows: list) -> dict:
    """What threadpoolctl says in each worker: BLAS (and OpenMP) threads per library."""
    if any(libs is None for _, libs in rows):
        return {"blas": "no threadpoolctl"}
    per = {pid: tuple(n for api, _, n in libs if api == "blas") for pid, libs in rows}
    kinds = sorted({"+".join(map(str, v)) or "none" for v in per.values()})
    libs = sorted({f"{api}:{lib}={n}" for _, ls in rows for api, lib, n in ls})
    return {"blas": "/".join(kinds), "blas_workers_seen": len(per), "blas_libs": libs}


def wl_numpy(peer: Peer, cfg, fresh) -> dict:
    """8 items of 12 matmuls of 400×400 on 2 workers; numpy imported after / before the pool."""
    out: dict = {}
    n = 8
    if peer.reference:  # a plain loop in this kernel, BLAS threads as numpy starts them
        with fresh() as k:
            k.figures(cell(PREAMBLE, "import numpy as np", MATMUL_SRC, BLAS_SRC))
            fig = k.figures(cell(timed_loop(f"r = [matmul(i) for i in range({n})]", cfg.reps), "_emit(ts=_ts)"),
                            60)
            out.update(after_s=statistics.median(fig["ts"]), after_ts=fig["ts"])
            rows = k.figures("_emit(rows=[blas_threads(0)])")["rows"]
            out.update({f"after_{key}": v for key, v in blas_summary(rows).items()})
        return out
    for order in NUMPY_ORDERS:
        p = f"{order}_"
        try:
            with fresh() as k:
                ds_setup(k, peer, MATMUL_SRC + BLAS_SRC, order)
                stmt = peer.map_stmt("matmul", MATMUL_SRC, f"range({n})", n=n)
                k.figures(stmt + "\n", cfg.hang_ds)  # first map: the workers import numpy
                fig = k.figures(cell(timed_loop(stmt, cfg.reps, warm=0),
                                     f"assert np.allclose(r, [matmul(i) for i in range({n})]), r",
                                     "_emit(ts=_ts)"), cfg.hang_ds + 10 * cfg.reps)
                out.update({f"{p}s": statistics.median(fig["ts"]), f"{p}ts": fig["ts"]})
                nb = 4 * WORKERS
                try:
                    rows = k.figures(cell(peer.map_stmt("blas_threads", BLAS_SRC, f"range({nb})", n=nb),
                                          "_emit(rows=list(r))"), cfg.hang_ds)["rows"]
                    out.update({f"{p}{key}": v for key, v in blas_summary(rows).items()})
                except CellFailed as exc:  # keep the timing
                    out[f"{p}blas"] = f"{exc.status} ({exc.detail.split(' (')[0]})"
        except CellFailed as exc:
            failed(out, p, exc)
    return out


def wl_bigresult(peer: Peer, cfg, fresh) -> dict:
    """16 items each returning a 32 MB float64 array: wall, and the kernel's peak RSS growth."""
    n, item_mb = 16, 4_000_000 * 8 / 2**20
    stmt = peer.map_stmt("big_result", BIGRES_SRC, f"range({n})", n=n)
    check = (f"assert len(r) == {n} and all(a.shape == (4_000_000,) and a[0] == i and a[-1] == i"
             " for i, a in enumerate(r))")
    out: dict = {"result_mb": n * item_mb}
    with fresh() as k:
        ds_setup(k, peer, BIGRES_SRC + SMALLRES_SRC, "after", extra=HWM)
        # the workers import numpy and ship one small array first: a warm pool
        k.figures(peer.map_stmt("small_result", SMALLRES_SRC, "range(4)", n=4) + "\n", cfg.hang_ds)
        fig = k.figures(cell("with _Hwm() as _m:", "    _t = time.perf_counter()", textwrap.indent(stmt, "    "),
                             "    _d = time.perf_counter() - _t", check,
                             "_emit(first_s=_d, **_m.figures())"), cfg.hang_ds)
        out.update(fig)
        fig = k.figures(cell(budget_loop(stmt, cfg.reps_ds, cfg.budget_ds, first="_d", pre="del r; gc.collect()"),
                             check, "_emit(ts=_ts)"), cfg.hang_ds + cfg.budget_ds)
    out.update(s=statistics.median(fig["ts"]), ts=fig["ts"], rss_ratio=out["rss_peak_mb"] / out["result_mb"])
    return out


def wl_bigarg(peer: Peer, cfg, fresh) -> dict:
    """map over 16 arrays of 32 MB returning a float: wall, and the kernel's peak RSS growth."""
    n = 16
    stmt = peer.map_stmt("arg_sum", ARGSUM_SRC, "ARRS", n=n)
    check = f"assert r == [4_000_000.0 * i for i in range({n})], r"
    out: dict = {"args_mb": n * 4_000_000 * 8 / 2**20}
    for order in NUMPY_ORDERS:
        p = f"{order}_"
        try:
            with fresh() as k:
                ds_setup(k, peer, ARGSUM_SRC, order, extra=HWM)
                k.figures(f"ARRS = [np.full(4_000_000, i, dtype=np.float64) for i in range({n})]\n")
                # the workers unpickle a few small arrays first (and so import numpy): a warm pool
                k.figures(cell("SMALL = [np.ones(1_000) for _ in range(4)]",
                               peer.map_stmt("arg_sum", ARGSUM_SRC, "SMALL", n=4)), cfg.hang_ds)
                fig = k.figures(cell("with _Hwm() as _m:", "    _t = time.perf_counter()",
                                     textwrap.indent(stmt, "    "), "    _d = time.perf_counter() - _t", check,
                                     f"_emit(**_m.figures({p!r}))"), cfg.hang_ds)
                out.update(fig)
                fig = k.figures(cell(budget_loop(stmt, cfg.reps_ds, cfg.budget_ds, first="_d"), check,
                                     "_emit(ts=_ts)"), cfg.hang_ds + cfg.budget_ds)
                out.update({f"{p}s": statistics.median(fig["ts"]), f"{p}ts": fig["ts"]})
        except CellFailed as exc:
            failed(out, p, exc)
    return out


def wl_many(peer: Peer, cfg, fresh) -> dict:
    """32 workers: cold start to a 32-item map's return, then 1,600 × 20 ms sleeps on the warm pool."""
    w, n = MANY_WORKERS, 1_600
    out: dict = {"workers": w, "ideal_s": n * 0.02 / w}
    with fresh() as k:
        k.figures(cell(PREAMBLE, NAP_SRC, TRIV_SRC))  # before the pool: fork-based pools see them
        # imports are not part of the cold start; poolmagic's %load_ext (in the timed cell) registers
        # the magics and starts the pool, so its import here is the public API only
        k.figures(("import poolmagic\npoolmagic.Pool\n" if peer.magic else peer.imports + "\n"), 60)
        try:
            fig = k.figures(cell("_t0 = time.perf_counter()", peer.create_code(w),
                                 peer.map_stmt("triv", TRIV_SRC, f"range({w})", n=w, workers=w),
                                 f"assert list(r) == list(range({w})), r",
                                 "_emit(s=time.perf_counter() - _t0)"), cfg.hang_many)
            out["cold_s"] = fig["s"]
        except CellFailed as exc:
            failed(out, "cold_", exc)
            out["sleep_s"] = "skipped"
            return out
        stmt = peer.map_stmt("nap", NAP_SRC, f"range({n})", n=n, workers=w)
        try:
            k.figures(stmt + "\n", cfg.hang_many)  # warm-up map on the same pool
            fig = k.figures(cell(budget_loop(stmt, cfg.reps_ds, cfg.budget_ds), f"assert list(r) == list(range({n}))",
                                 "_emit(ts=_ts)"), cfg.hang_many + cfg.budget_ds)
            out.update(sleep_s=statistics.median(fig["ts"]), sleep_ts=fig["ts"])
        except CellFailed as exc:
            failed(out, "sleep_", exc)
    return out


WAIT_W, WAIT_N, WAIT_S = 16, 64, 0.02  # the wait row: 16 workers, 64 items that each wait 20 ms


def wl_wait(peer: Peer, cfg, fresh) -> dict:
    """64 items that each wait 20 ms (a sleep, as an HTTP request or a file read waits) on 16 workers.

    Wall s per map (ideal 64 × 20 ms / 16 = 0.08 s), median of warm repeats; and a 4-item
    no-op map on the same 16 workers, ms per cell (poolmagic: the whole magic, -q).
    """
    src = f"def wait(x):\n    time.sleep({WAIT_S})\n    return x\n"
    noop = "def noop(x):\n    return x\n"
    with fresh() as k:
        k.figures(PREAMBLE)
        k.figures(cell(src, noop, WARM_SRC))
        k.figures(cell(peer.imports, peer.create_code(WAIT_W)), 60)
        stmt = peer.map_stmt("wait", src, f"range({WAIT_N})", n=WAIT_N, workers=WAIT_W)
        k.figures(stmt + "\n", 60)  # warm: every worker started
        fig = k.figures(cell(timed_loop(stmt, cfg.reps_wait), f"assert list(r) == list(range({WAIT_N}))",
                             "_emit(ts=_ts)"), 120)
        ov = k.figures(cell(timed_loop(peer.map_stmt("noop", noop, "range(4)", n=4, workers=WAIT_W),
                                       cfg.reps_overhead // 3, warm=3),
                            "assert list(r) == [0, 1, 2, 3]", "_emit(ts=_ts)"), 120)
    wall = statistics.median(fig["ts"])
    return {"wall_s": wall, "ideal_s": WAIT_N * WAIT_S / WAIT_W, "ms_4": statistics.median(ov["ts"]) * 1e3,
            "ts": fig["ts"]}


WORKLOADS = {  # name: (function, peers it runs for: None = all peers but the reference)
    "cold": (wl_cold, None),
    "tiny": (wl_tiny, None),
    "cpu": (wl_cpu, None),
    "overhead": (wl_overhead, None),
    "big": (wl_big, None),
    "gen": (wl_gen, list(GEN_STMT)),
    "failures": (wl_failures, None),
    "wait": (wl_wait, ["poolmagic", "poolmagic_threads", "tpe"]),
    "numpy": (wl_numpy, DS_PEERS + ["serial"]),
    "bigresult": (wl_bigresult, DS_PEERS),
    "bigarg": (wl_bigarg, DS_PEERS),
    "many": (wl_many, DS_PEERS),
}


# ===================================================================== report
def num(v) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def ratio(r: float) -> str:
    return f"×{r:.2g}" if r < 10 else f"×{r:.0f}"


def shown(res: dict | None, key: str, fmt: str, base: dict | None = None) -> str:
    """A table cell: the figure, its ratio to poolmagic's, or why there is none."""
    if res is None or res.get("status") == "broken":
        return "—"
    if res.get("status") != "ok":
        short = (res.get("note") or "").split(" (")[0]
        return f"{res['status']} ({short})" if short else res["status"]
    v = res.get(key)
    if num(v) is None:
        err = (res.get(key.replace("_s", "_error")) or "").split(" (")[0]
        return f"{v} ({err})" if v == "hang" and err else (str(v) if v is not None else "—")
    text = fmt.format(v)
    b = num((base or {}).get(key))
    if base is not None and b:
        text += f" ({ratio(v / b)})"
    return text


COLUMNS = [  # (workload, key, header, format)
    ("cold", "cold_s", "cold s", "{:.3f}"),
    ("overhead", "ms", "warm ms (4 items)", "{:.2f}"),
    ("tiny", "us_per_item", "tiny µs/item (100k)", "{:.3f}"),
    ("cpu", "speedup", "CPU speedup /2", "{:.2f}"),
    ("big", "s", "50 MB global, 64 items, s", "{:.3f}"),
    ("failures", "crash_s", "worker crash → error s", "{:.3f}"),
    ("failures", "recovery_s", "4-item map after crash s", "{:.3f}"),
    ("failures", "interrupt_s", "interrupt → return s", "{:.3f}"),
    ("failures", "next_s", "2-item map after interrupt s", "{:.3f}"),
    ("wait", "wall_s", f"wait: {WAIT_N}×{WAIT_S * 1e3:.0f} ms on {WAIT_W} workers s", "{:.3f}"),
    ("wait", "ms_4", f"4 no-ops on {WAIT_W} workers ms", "{:.2f}"),
]


def table_cell(wl: str, key: str, fmt: str, res: dict | None, base: dict | None) -> str:
    """``shown`` plus the figures that go with it: RSS growth, failed or wrong follow-up maps."""
    text = shown(res, key, fmt, base)
    if not res or res.get("status") != "ok" or num(res.get(key)) is None:
        return text
    if wl == "big" and num(res.get("rss_peak_mb")) is not None:
        text += f" +{res['rss_peak_mb']:.0f} MB"
    if wl == "failures" and key in ("recovery_s", "next_s") and not res.get(key.replace("_s", "_ok")):
        text += f" **failed: {(res.get(key.replace('_s', '_error')) or 'wrong results').split(':')[0]}**"
    if wl == "failures" and key == "crash_s" and not res.get("crash_error"):
        text += " **no error raised**"
    return text


def md_notes(results: dict) -> list[str]:
    """What the table cannot hold: poolmagic's extra figures, errors, hangs and caveats."""
    label = {k: p.label for k, p in PEER_BY_KEY.items()}
    pm = {wl: results[wl].get("poolmagic") or {} for wl in results}
    notes = ["Ratios in brackets are peer ÷ poolmagic (for times, > 1 means the peer is slower; "
             "for CPU speedup, > 1 means the peer is better). \"+N MB\": the kernel's peak RSS growth."]
    if pm.get("cold", {}).get("status") == "ok":
        c = pm["cold"]
        notes.append(f"poolmagic cold: load + map in one cell {c['cold_s']:.3f} s; in separate cells the "
                     f"`%load_ext` cell takes {c['load_cell_s']:.3f} s and the first map cell right after "
                     f"{c['map_cell_s']:.3f} s (the pool warms in the background). Backend: {c['backend']}.")
    if pm.get("overhead", {}).get("status") == "ok":
        o = pm["overhead"]
        notes.append("poolmagic warm ms is the whole `%%poolmap` magic with its summary displayed; "
                     f"with `-q`: {o['ms_quiet']:.2f} ms. Warm ms is the median map of a loop; the loop's "
                     f"whole time per map, which also counts the cards' sending in batches by the kernel's "
                     f"I/O thread: {o['loop_ms']:.2f} ms, with `-q` {o['loop_ms_quiet']:.2f} ms"
                     + "".join(f"; {label[k]} {results['overhead'][k]['loop_ms']:.2f} ms"
                               for k in results["overhead"] if k != "poolmagic"
                               and results["overhead"][k].get("status") == "ok"
                               and "loop_ms" in results["overhead"][k]) + ".")
    if pm.get("big", {}).get("status") == "ok" and "c4_1024_s" in pm["big"]:
        b = pm["big"]
        notes.append(f"poolmagic 50 MB global, 1024 items with `-c 4`: {b['c4_1024_s']:.3f} s, "
                     f"peak RSS +{b['c4_1024_rss_peak_mb']:.0f} MB.")
    for peer, g in (results.get("gen") or {}).items():
        how = "`%%poolmap`" if peer == "poolmagic" else "`Pool.imap(chunksize=10_000)`"
        if g.get("status") == "ok":
            notes.append(f"{label[peer]}, x*x over a 10M-item generator with {how}: {g['s']:.2f} s, peak RSS "
                         f"growth {g['peak_mb']:.0f} MB = {g['ratio']:.2f}× the result list ({g['result_mb']:.0f} MB).")
    if pm.get("tiny", {}).get("status") == "ok" and "ck_pct" in pm["tiny"]:
        t = pm["tiny"]
        notes.append(f"poolmagic tiny with `--checkpoint` (a new file each map, medians of interleaved pairs): "
                     f"{t['ck_plain_s'] * 1e3:.2f} ms → {t['ck_s'] * 1e3:.2f} ms, {t['ck_pct']:+.1f} %.")
    for peer, t in (results.get("tiny") or {}).items():
        if t.get("status") == "ok" and t["n"] != 100_000:
            if PEER_BY_KEY[peer].magic:  # poolmagic chunks: a small n weighs the map's own cost more
                notes.append(f"{label[peer]}, tiny: over range({t['n']:_}) as the dask peers, in chunks "
                             f"({t['us_per_item'] * t['n'] / 1e3:.1f} ms a map).")
                continue
            notes.append(f"{label[peer]}, tiny: over range({t['n']:_}) only (one task per item, "
                         f"{t['us_per_item'] * t['n'] / 1e6:.1f} s a map); the per-item cost does not depend on n.")
    notes += dask_ratios(results, label)
    errs = [f"{peer}: `{f['crash_error'] if peer == 'poolmagic' else f['crash_error'].split(':')[0]}`"
            for peer, f in (results.get("failures") or {}).items()
            if f.get("status") == "ok" and num(f.get("crash_s")) is not None and f.get("crash_error")]
    if errs:
        notes.append("Error raised on the worker crash — " + "; ".join(errs) + ".")
    blind = [p for p, r in (results.get("big") or {}).items()
             if r.get("status") == "error" and r.get("note", "").startswith("NameError")]
    if blind:
        notes.append(f"{', '.join(label[p] for p in blind)}, 50 MB global: NameError — the warm pool forked its "
                     "workers before `ARR` was defined, and a fork-based pool does not see globals defined later.")
    for wl in results:
        if wl in DS_WORKLOADS:  # ds_notes()
            continue
        for peer, res in results[wl].items():
            if res.get("note") and res["status"] != "broken" and not (wl == "big" and peer in blind):
                later = " (its other workloads were skipped)" if res.get("skips_rest") else ""
                notes.append(f"{label[peer]}, {wl}: {res['status']} — {res['note']}{later}")
    return notes


DASK_PAIRS = (  # (a, b): a ÷ b on the same cluster shape, the table's ratios being to poolmagic (local)
    ("poolmagic_dask", "dask"),  # each on its own LocalCluster
    ("poolmagic_remote", "dask_remote"),  # each on a CLI cluster of its own
    ("poolmagic_remote", "poolmagic_dask"),  # what a cluster started elsewhere costs poolmagic
)


def dask_ratios(results: dict, label: dict) -> list[str]:
    """The dask peers' figures against each other: a ÷ b for each of DASK_PAIRS run."""
    notes = []
    figs = (("overhead", "ms", "warm 4-item cell ms", "{:.2f}"), ("overhead", "ms_quiet", "with -q", "{:.2f}"),
            ("tiny", "us_per_item", "tiny µs/item", "{:.1f}"), ("cpu", "speedup", "CPU speedup", "{:.2f}"))
    for a, b in DASK_PAIRS:
        parts = []
        for wl, key, what, fmt in figs:
            ra, rb = ((results.get(wl) or {}).get(p) or {} for p in (a, b))
            x, y = num(ra.get(key)), num(rb.get(key) if key in rb else rb.get("ms"))  # raw dask: no -q
            if ra.get("status") == rb.get("status") == "ok" and x is not None and y:
                parts.append(f"{what} {fmt.format(x)} vs {fmt.format(y)} ({ratio(x / y)})")
        if parts:
            notes.append(f"{label[a]} ÷ {label[b]}: " + "; ".join(parts) + ".")
    return notes


DS_COLUMNS = [  # (workload, key, header, kind) of the data-science table
    ("numpy", "after_s", "numpy 8 × 12 matmuls s (np after pool)", "time"),
    ("numpy", "before_s", "same, np before pool s", "time"),
    ("numpy", "blas", "BLAS threads per worker (after / before)", "blas"),
    ("bigresult", "s", "16 × 32 MB results s", "time"),
    ("bigresult", "rss_peak_mb", "results: peak RSS growth (÷ their 488 MiB)", "rss"),
    ("bigarg", "after_s", "16 × 32 MB args s (np after pool)", "time"),
    ("bigarg", "before_s", "same, np before pool s", "time"),
    ("bigarg", "rss", "args: peak RSS growth (after / before)", "rss2"),
    ("many", "sleep_s", f"{MANY_WORKERS} workers, 1,600 × 20 ms s (ideal 1.0)", "time"),
    ("many", "cold_s", f"{MANY_WORKERS}-worker cold start s", "time"),
]


def ds_cell(key: str, kind: str, res: dict | None, base: dict | None) -> str:
    """A cell of the data-science table; times get their ratio to poolmagic's."""
    if res is None or res.get("status") == "broken":
        return "—"
    if res.get("status") != "ok":
        short = (res.get("note") or "").split(" (")[0]
        return f"{res['status']} ({short})" if short else res["status"]

    def mb(prefix: str) -> str | None:
        v = num(res.get(f"{prefix}rss_peak_mb"))
        return None if v is None else ("" if res.get(f"{prefix}rss_peak_exact") else "≤") + f"+{v:.0f}"

    if kind == "blas":
        got = [res.get(f"{o}_blas") for o in NUMPY_ORDERS]
        return " / ".join(g for g in got if g) or "—"
    if kind == "rss":
        m = mb("")
        return f"{m} MiB ({res['rss_ratio']:.2f}×)" if m else "—"
    if kind == "rss2":
        got = [mb(f"{o}_") or "—" for o in NUMPY_ORDERS]
        return " / ".join(got) + " MiB" if any(g != "—" for g in got) else "—"
    v = res.get(key)
    if v is None:
        return "—"
    if num(v) is None:
        err = (res.get(key[:-1] + "error") or "").split(" (")[0]
        return f"{v} ({err})" if err else str(v)
    b = num((base or {}).get(key))
    return f"{v:.3f}" + (f" ({ratio(v / b)})" if base is not None and b else "")


def ds_rows(results: dict, meta: dict, label) -> list[list[str]]:
    """Header and one row per peer (and the serial reference) of the data-science table."""
    cols = [c for c in DS_COLUMNS if c[0] in results]
    if not cols:
        return []
    rows = [["peer"] + [c[2] for c in cols]]
    for peer in meta["peers"]:
        if not any(peer in results[wl] for wl, *_ in cols):
            continue
        base = {wl: None if peer == "poolmagic" else results[wl].get("poolmagic") for wl, *_ in cols}
        rows.append([label(peer)] + [ds_cell(key, kind, results[wl].get(peer), base[wl])
                                     for wl, key, _, kind in cols])
    return rows


def ds_notes(results: dict) -> list[str]:
    """How to read the data-science table, and every sub-measurement that hung or failed."""
    label = {k: p.label for k, p in PEER_BY_KEY.items()}
    notes = []
    if not any(c[0] in results for c in DS_COLUMNS):
        return notes
    how = {"numpy": "`matmul(i)` imports numpy itself", "bigresult": "`big_result(i)` imports numpy itself",
           "bigarg": "`arg_sum(a)` is `float(np.sum(a))` with the kernel's `np`"}
    told = "; ".join(v for wl, v in how.items() if wl in results)
    notes.append("Data-science rows: every (row, variant, peer) in a fresh kernel, the mapped function defined "
                 f"in a notebook cell{f' ({told})' if told else ''}. Times are medians, ratios peer ÷ poolmagic "
                 "(> 1: the peer is slower).")
    if "numpy" in results or "bigarg" in results:
        notes.append("\"np after pool\": the kernel imports numpy after creating the pool (`%load_ext` first, as "
                     "users do); \"before\": before it.")
    if "bigresult" in results or "bigarg" in results:
        notes.append("Peak RSS growth: the kernel's VmHWM after the map minus its VmRSS before (≤: the mark did "
                     "not rise, an upper bound); the 16 arrays are 488 MiB (512 MB).")
    for peer, r in (results.get("numpy") or {}).items():
        libs = sorted({x for o in NUMPY_ORDERS for x in r.get(f"{o}_blas_libs") or []})
        if libs:
            notes.append(f"{label[peer]}, threadpoolctl in a worker{' (the kernel itself)' if peer == 'serial' else ''}: "
                         + ", ".join(f"`{x}`" for x in libs) + ".")
    for wl in DS_WORKLOADS:
        for peer, r in (results.get(wl) or {}).items():
            if r.get("note") and r["status"] != "broken":
                notes.append(f"{label[peer]}, {wl}: {r['status']} — {r['note']}")
            if r.get("leaked_processes_killed"):
                notes.append(f"{label[peer]}, {wl}: {r['leaked_processes_killed']} process(es) still running under "
                             "the kernel after its shutdown were killed.")
            for key, v in r.items():
                if key.endswith("error") and v and num(r.get(key[:-5] + "s")) is None:
                    what = key[:-5].rstrip("_") or "map"
                    notes.append(f"{label[peer]}, {wl} ({what}): {r.get(key[:-5] + 's')} — {v}")
    return notes


def md_table(rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def render(results: dict, meta: dict) -> str:
    """The Markdown file: header, one row per peer, then notes; the data-science table after."""
    cols = [c for c in COLUMNS if c[0] in results]
    lines = []
    if cols:
        head = ["peer"] + [c[2] for c in cols]
        rows = [head]
        for peer in meta["peers"]:
            if PEER_BY_KEY[peer].reference:
                continue
            base = {wl: None if peer == "poolmagic" else results[wl].get("poolmagic") for wl in results}
            rows.append([PEER_BY_KEY[peer].label] + [table_cell(wl, key, fmt, results[wl].get(peer), base[wl])
                                                     for wl, key, _, fmt in cols])
        lines = md_table(rows) + [""] + [f"- {n}" for n in md_notes(results)] + [""]
    ds = ds_rows(results, meta, lambda k: PEER_BY_KEY[k].label)
    if ds:
        lines += ["Data-science rows (issue \"Real data-science items\"):", ""] + md_table(ds) + [""]
        lines += [f"- {n}" for n in ds_notes(results)] + [""]
    load = "/".join(f"{meta[k][0]:.1f}" for k in ("loadavg_before", "loadavg_after"))
    hdr = (f"Benchmark run {meta['date']} · {meta['machine']}, {meta['cores']} cores, Python {meta['python']} · "
           f"poolmagic {meta['poolmagic_commit']} ({meta['poolmagic_path']}) · {WORKERS} workers · each peer in its own Jupyter kernel, function defined in a notebook cell · "
           f"1-min load average before/after {load}.\n\n"
           f"Command: `{meta['command']}`\n")
    return hdr + "\n" + "\n".join(lines)


def console_table(results: dict, meta: dict) -> str:
    def text(rows: list[list[str]]) -> str:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

    out = []
    cols = [c for c in COLUMNS if c[0] in results]
    if cols:
        base = {wl: results[wl].get("poolmagic") for wl in results}
        rows = [["peer"] + [c[2] for c in cols]]
        for peer in meta["peers"]:
            if PEER_BY_KEY[peer].reference:
                continue
            rows.append([peer] + [shown(results[wl].get(peer), key, fmt, None if peer == "poolmagic" else base.get(wl))
                                  for wl, key, _, fmt in cols])
        out.append(text(rows))
    ds = ds_rows(results, meta, str)
    if ds:
        out.append(text(ds))
    return "\n\n".join(out)


# ===================================================================== main
def poolmagic_dir() -> Path | None:
    """Where the kernels will import poolmagic from (an editable install may point anywhere)."""
    spec = importlib.util.find_spec("poolmagic")
    return Path(spec.origin).resolve().parent if spec and spec.origin else None


def git_commit(where: Path | None) -> str:
    """The commit checked out where poolmagic is imported from, "+dirty" if the package has local changes."""
    if where is None:
        return "?"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True).stdout.strip()
    try:
        return (git("rev-parse", "--short", "HEAD") or "?") + ("+dirty" if git("status", "--porcelain", ".") else "")
    except OSError:
        return "?"


@dataclass
class Config:
    reps: int = 5
    reps_cpu: int = 5
    reps_overhead: int = 300  # ~1 ms each; the summary's I/O-thread work makes single runs noisy
    reps_ck: int = 40  # pairs of tiny maps without and with --checkpoint (~7 ms each)
    reps_wait: int = 15  # maps of the wait row (~0.1 s each)
    hang: float = 10.0  # seconds before a map counts as hung
    hang_gen: float = 120.0
    hang_ds: float = 30.0  # a data-science row's map (the first one imports numpy in the workers)
    hang_many: float = 120.0  # a 32-worker pool's cold start, and a 1,600-item map on it
    reps_ds: int = 3  # timed maps of ~1 s in the data-science rows...
    budget_ds: float = 5.0  # ...or fewer, once they took this many seconds


def compile_poolmagic() -> bool:
    """Write poolmagic's bytecode, as pip does when it installs a package.

    The peers come from site-packages with their .pyc files; an editable
    checkout under PYTHONDONTWRITEBYTECODE=1 would compile poolmagic from
    source in every kernel and every worker, which no installed copy does.
    """
    spec = importlib.util.find_spec("poolmagic")
    if spec is None or not spec.submodule_search_locations:
        return False
    return all(compileall.compile_dir(d, quiet=1) for d in spec.submodule_search_locations)


BASE_KEY = "poolmagic_base"


def baseline_peer(ref: str) -> Peer:
    """poolmagic as it was at git REF: its src/ exported from this repository, compiled,
    and put first on its kernels' PYTHONPATH (so they and their workers import it instead
    of the working tree; every other package is this environment's)."""
    repo = HERE.parent
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=repo, capture_output=True, text=True)
    if sha.returncode:
        raise SystemExit(f"--baseline: git does not know {ref!r} here: {sha.stderr.strip()}")
    sha = sha.stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"poolmagic-baseline-{sha}"
    if not (dest / "src" / "poolmagic" / "__init__.py").exists():
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "src"], cwd=repo, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        compileall.compile_dir(str(dest / "src"), quiet=1)
    base = PEER_BY_KEY["poolmagic"]
    return replace(base, key=BASE_KEY, label=f"poolmagic {sha} (baseline)",
                   env={"PYTHONPATH": str(dest / "src")})


def median_figures(runs: list[dict]) -> dict:
    """One result from several rounds: the median of each number, the rest from the first ok run."""
    ok = [r for r in runs if r.get("status") == "ok"] or runs
    out = dict(ok[0])
    for key in ok[0]:
        vals = [num(r.get(key)) for r in ok]
        if all(v is not None for v in vals) and key != "harness_s":
            out[key] = statistics.median(vals)
    out["rounds"] = len(ok)
    return out


def baseline_table(results: dict, sha_label: str) -> str:
    """Every number of every workload: the working tree, the baseline, and their ratio."""
    rows = [["workload", "figure", "working tree", sha_label, "ratio (tree ÷ baseline)"], ["---"] * 5]
    for wl, res in results.items():
        a, b = res.get("poolmagic") or {}, res.get(BASE_KEY) or {}
        for key in a:
            x, y = num(a.get(key)), num(b.get(key))
            if x is None or y is None or key in ("harness_s", "rounds", "size") or key.endswith(("_n", "_items")):
                continue
            rows.append([wl, key, f"{x:.4g}", f"{y:.4g}", f"{x / y:.2f}" if y else "—"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOADS))
    ap.add_argument("--peers", help="comma-separated peers: " + ",".join(PEER_BY_KEY))
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--baseline", metavar="REF", help="also run poolmagic as it was at git REF, alternating "
                    "with the working tree on the same workloads, and print both and their ratio")
    ap.add_argument("--rounds", type=int, default=3, help="with --baseline: rounds of (tree, baseline) per workload")
    args = ap.parse_args()
    if args.baseline:
        PEER_BY_KEY[BASE_KEY] = baseline_peer(args.baseline)
    workloads = list(dict.fromkeys(args.only.split(","))) if args.only else list(WORKLOADS)
    peers = list(dict.fromkeys(args.peers.split(","))) if args.peers else [k for k in PEER_BY_KEY if k != BASE_KEY]
    if args.baseline:  # right after poolmagic, which it alternates with
        peers = [k for k in peers if k != BASE_KEY]
        peers.insert(peers.index("poolmagic") + 1 if "poolmagic" in peers else 0, BASE_KEY)
        if "poolmagic" not in peers:
            peers.insert(0, "poolmagic")
    for name, known in ((workloads, WORKLOADS), (peers, PEER_BY_KEY)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown: {', '.join(bad)}")
    cfg = Config(reps=3, reps_cpu=2, reps_overhead=50, reps_ds=2, reps_ck=10) if args.quick else Config()
    pm_dir = poolmagic_dir()
    if pm_dir is not None and not pm_dir.is_relative_to(HERE.parent.resolve()):
        print(f"note: poolmagic is imported from {pm_dir}, not from this checkout ({HERE.parent})",
              file=sys.stderr, flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).as_posix(), "benchmarks/bench.py"] + sys.argv[1:]),
        "peers": peers,
        "loadavg_before": list(os.getloadavg()),
        "poolmagic_commit": git_commit(pm_dir),
        "poolmagic_path": str(pm_dir),
        "poolmagic_bytecode": compile_poolmagic(),
    }

    kernels: list[Kernel] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` shuts the kernels down

    def fresh_for(peer: Peer):
        def fresh() -> Kernel:
            k = Kernel(env_extra=peer.env)
            kernels.append(k)
            return k
        return fresh

    results: dict = {wl: {} for wl in workloads}
    broken: dict[str, str] = {}  # peer -> the workload where it could not map a notebook function
    t_start = time.monotonic()

    def run_one(peer: Peer, fn, wl: str) -> dict:
        """One workload for one peer, in fresh kernels; failures become a status."""
        t0, n0 = time.monotonic(), len(kernels)
        try:
            res = {"status": "ok", **fn(peer, cfg, fresh_for(peer))}
        except CellFailed as exc:
            res = {"status": exc.status, "note": exc.detail}
            if isinstance(exc, PeerBroken) and not peer.magic:
                broken[peer.key] = wl
                res["skips_rest"] = True
        except Exception as exc:  # a harness problem: report it, keep going
            res = {"status": "harness error", "note": repr(exc)[:200]}
        res["harness_s"] = round(time.monotonic() - t0, 2)
        leaked = sum(k.leaked for k in kernels[n0:])  # its kernels are closed by now
        if leaked:
            res["leaked_processes_killed"] = leaked
        return res

    def say(wl: str, key: str, res: dict) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {wl:9s} {key:15s} "
              + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                            if k != "ts"})[:220], flush=True)

    try:
        for wl in workloads:
            fn, only = WORKLOADS[wl]
            for key in peers:
                peer = PEER_BY_KEY[key]
                if key == BASE_KEY or ((key not in only) if only is not None else peer.reference):
                    continue  # the baseline runs in rounds with poolmagic
                if peer.rows is not None and wl not in peer.rows:
                    continue  # a thread pool, in a row where threads mean nothing
                if importlib.util.find_spec(peer.module) is None:
                    results[wl][key] = {"status": "skipped", "note": f"{peer.module} not importable"}
                elif key in broken:
                    results[wl][key] = {"status": "broken", "note": f"see {broken[key]}"}
                elif args.baseline and key == "poolmagic":
                    runs: dict[str, list] = {key: [], BASE_KEY: []}
                    for _ in range(args.rounds):  # A B A B ...: a drift of the machine's speed hits both
                        for p in (peer, PEER_BY_KEY[BASE_KEY]):
                            runs[p.key].append(run_one(p, fn, wl))
                    for k in runs:
                        results[wl][k] = median_figures(runs[k])
                        say(wl, k, results[wl][k])
                    continue
                else:
                    results[wl][key] = run_one(peer, fn, wl)
                say(wl, key, results[wl][key])
    finally:
        for k in kernels:
            try:
                k.close()
            except Exception as exc:  # keep closing the others
                print(f"closing kernel {k.pid}: {exc!r}", file=sys.stderr)
    if poolmagic_dir() != pm_dir:  # the environment was changed under the run (a shared venv)
        meta["poolmagic_path_changed_to"] = str(poolmagic_dir())
        print(f"WARNING: poolmagic now imports from {poolmagic_dir()}, not {pm_dir} as at the start: "
              "the figures may mix two versions", file=sys.stderr, flush=True)
    meta["leaked_processes_killed"] = sum(k.leaked for k in kernels)
    meta["loadavg_after"] = list(os.getloadavg())
    meta["kernel_python"] = sorted({k.python for k in kernels})
    meta["total_s"] = round(time.monotonic() - t_start, 1)

    RESULTS.mkdir(parents=True, exist_ok=True)
    # Only a full run replaces the table the README quotes; a partial one is kept beside it.
    stem = "partial" if (args.only or args.peers or args.quick or args.baseline) else "latest"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = render(results, meta)
    (RESULTS / f"{stem}.md").write_text(md)
    print("\n" + console_table(results, meta) + "\n")
    print(md)
    if args.baseline:
        label = PEER_BY_KEY[BASE_KEY].label.replace(" (baseline)", "")
        table = (f"Working tree ({meta['poolmagic_commit']}) against {label}, {args.rounds} alternating rounds per "
                 f"workload, medians; command: `{meta['command']}`\n\n" + baseline_table(results, label) + "\n")
        # both commits in the name: two trees measured against one baseline keep both tables
        (RESULTS / f"baseline-{label.split()[-1]}-tree-{meta['poolmagic_commit']}.md").write_text(table)
        print(table)
    print(f"total {meta['total_s']} s; kernels: {len(kernels)}; leftover processes killed: "
          f"{meta['leaked_processes_killed']}; wrote {RESULTS / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
