"""poolmagic in a real Jupyter kernel: interrupt, signals, crashes, shutdown.

Each test provokes the case for real (a SIGINT to the kernel's process group,
a SIGKILL to a worker, a shutdown request) and checks the outcome against a
generous time bound that still tells a prompt return from a hang.

One kernel serves the module (``kernel``); tests that end or restart a kernel,
or unload the extension, get a short-lived one of their own (``fresh``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import poolmagic
from e2e_helpers import kernel_spec_manager  # noqa: F401  (a fixture)
from e2e_helpers import (
    alive,
    collect,
    describe,
    evaluate,
    kernel_pid,
    pool_processes,
    process_tree,
    processes,
    run,
    run_ok,
    start_kernel,
    still_alive,
    stop_kernel,
    strip_ansi,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

# Defined in every test kernel: a helper the mapped functions call to tell the
# test, through a file, that an item has started and in which process.
SETUP = """\
%load_ext poolmagic
import os, sys, time, poolmagic

def mark(folder, x):
    tmp = os.path.join(folder, f".{x}.tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(folder, f"{x}.pid"))
"""


class Kernel:
    def __init__(self, km, kc):
        self.km, self.kc = km, kc
        self.pid = kernel_pid(km)

    def worker_pids(self, n: int = 2, timeout: float = 15) -> list[int]:
        """The pool's worker pids once ``n`` are up (the pool warms in the background)."""

        def warm() -> list[int] | None:
            pids = evaluate(self.kc, "poolmagic.get_pool().backend.worker_pids()")
            return pids if len(pids) >= n else None

        return wait_for(warm, timeout, f"{n} warm workers", every=0.1)


def _start(ksm, cwd, backend: str = "local") -> Kernel:
    km, kc = start_kernel(ksm, cwd)
    k = Kernel(km, kc)
    run_ok(k.kc, SETUP)
    run_ok(k.kc, "%poolsize 2")  # the tests assume two workers, whatever the machine
    if backend == "dask":  # a LocalCluster of 2 that poolmagic starts and owns
        run_ok(k.kc, "%poolsize --backend dask", timeout=60)
    k.backend = backend
    return k


def _backend(request) -> str:
    if request.param == "dask":
        pytest.importorskip("distributed")
    return request.param


# The same tests on both backends: the local pool, and a dask LocalCluster.
@pytest.fixture(scope="module", params=["local", "dask"])
def kernel(request, kernel_spec_manager, tmp_path_factory):
    k = _start(kernel_spec_manager, tmp_path_factory.mktemp("kernel"), _backend(request))
    yield k
    stop_kernel(k.km, k.kc)


@pytest.fixture(params=["local", "dask"])
def fresh(request, kernel_spec_manager, tmp_path):
    k = _start(kernel_spec_manager, tmp_path, _backend(request))
    yield k
    stop_kernel(k.km, k.kc)


def pid_files(folder: Path) -> dict[int, int]:
    """item -> pid of the worker that started it (from ``mark``)."""
    return {int(p.stem): int(p.read_text()) for p in folder.glob("*.pid")}


def started(folder: Path, n: int, timeout: float = 15) -> dict[int, int]:
    """item -> worker pid, once ``n`` items have started."""

    def enough() -> dict[int, int] | None:
        found = pid_files(folder)
        return found if len(found) >= n else None

    return wait_for(enough, timeout, f"{n} items started")


def assert_maps(kc, n: int = 2, within: float = 10.0) -> None:
    """A fresh %%poolmap returns the right results (``within``: only a hang fails it)."""
    r = run(kc, f"%%poolmap range({n})\ndef double(x):\n    return 2 * x\n", timeout=within + 20)
    assert r.status == "ok", f"{r!r}\n{r.traceback}"
    assert r.value == repr([2 * i for i in range(n)])


# --------------------------------------------------------------------------- the kernel itself


def test_kernel_runs_this_interpreter_and_checkout(kernel):
    """The kernel is this venv's Python importing this checkout, not some other install."""
    exe, path = evaluate(kernel.kc, "[sys.executable, poolmagic.__file__]")
    assert Path(exe) == Path(sys.executable)
    assert Path(path).resolve() == Path(poolmagic.__file__).resolve()
    out = run_ok(kernel.kc, "%poolsize").stdout
    where = {
        "local": r"local processes \(forkserver\)",
        "dask": r"dask LocalCluster",
    }[kernel.backend]
    first = rf"poolmagic: 2 workers · {where} · \d+ cores? available · \d+ native threads? per worker · pool (warm|starting)\n"
    cluster = (r"dask LocalCluster started by poolmagic: scheduler tls://127\.0\.0\.1:\d+ · 2 workers"
               r" × 1 thread \(task slots; the cores are counted above\) · TLS with a certificate of its own"
               r" · dashboard off \(%poolsize --backend dask --dashboard\)\n")
    assert re.fullmatch(first + (cluster if kernel.backend == "dask" else ""), out), out


# --------------------------------------------------------------------------- interrupt and SIGINT


def test_interrupt_stops_running_items(kernel, tmp_path):
    """Interrupt (SIGINT to the kernel's process group) ends the map at once.

    The workers running the sleeping items are killed rather than left
    sleeping for 30 s, queued items never start, and the pool serves the next
    map straight away.
    """
    kernel.worker_pids()
    # items sleep 120 s: a map the interrupt did not end cannot end within collect's 30 s either
    code = f"%%poolmap range(6)\ndef sleepy(x):\n    mark({str(tmp_path)!r}, x)\n    time.sleep(120)\n    return x\n"
    t0 = time.monotonic()
    msg_id = kernel.kc.execute(code)
    running = started(tmp_path, 2)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))  # about a second into the map
    t_int = time.monotonic()
    kernel.km.interrupt_kernel()
    r = collect(kernel.kc, msg_id, timeout=30, t0=t_int)

    assert r.error and r.error["ename"] == "KeyboardInterrupt", repr(r)
    tb = strip_ansi(r.traceback)  # starts at the function, as a failed map's: not the cell as a string
    assert "run_cell_magic(" not in tb and "----> 1 def sleepy(x):" in tb, tb
    summary = "\n".join(r.data("text/plain"))
    assert "interrupted" in summary and "0/6 items" in summary, summary
    # the two workers it ran on, though neither finished a chunk; no verdict on a gain
    # whose stopped items' time is unknown
    assert "· 2 workers ·" in summary and "slower" not in summary and "why:" not in summary, summary
    left = still_alive(processes(running.values()), within=10.0)  # only a hang
    assert not left, f"workers still running their items after the interrupt: {describe(left)}"
    assert set(pid_files(tmp_path)) == set(running), "queued items started after the interrupt"
    assert_maps(kernel.kc)


def test_workers_ignore_sigint(kernel, tmp_path):
    """A SIGINT sent to the workers themselves neither stops them nor prints anything."""
    before = kernel.worker_pids()
    code = f"%%poolmap range(8)\ndef nap(x):\n    mark({str(tmp_path)!r}, x)\n    time.sleep(0.3)\n    return x\n"
    msg_id = kernel.kc.execute(code)
    started(tmp_path, 1)
    for pid in before:
        os.kill(pid, signal.SIGINT)
    r = collect(kernel.kc, msg_id, timeout=30)
    after = run_ok(kernel.kc, "time.sleep(0.2)")  # late fd output would land here

    assert r.status == "ok", f"{r!r}\n{r.traceback}"
    assert r.value == repr(list(range(8)))
    for text in (r.stdout, r.stderr, after.stdout, after.stderr):
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert set(pid_files(tmp_path).values()) <= set(before)
    assert all(alive(p) for p in processes(before)), "a worker died of SIGINT"
    assert sorted(kernel.worker_pids()) == sorted(before), "workers were replaced"


# --------------------------------------------------------------------------- what data scientists map


def test_numpy_and_pandas_items_and_results(kernel):
    """Frames and arrays as items, frames and big arrays as results, with numpy and
    pandas imported after %load_ext (the pool, or the cluster, already running)."""
    run_ok(kernel.kc, "import numpy as np, pandas as pd\n"
                      "frames = [pd.DataFrame({'a': np.arange(i, i + 5), 'b': np.ones(5) * i}) for i in range(6)]")
    r = run(kernel.kc, "%%poolmap -q -o out frames\n"
                       "def stats(df):\n"
                       "    return df.assign(total=df['a'] + df['b']), np.full((1000, 1000), float(df['b'].iloc[0]))\n",
            timeout=60)
    assert r.status == "ok", f"{r!r}\n{r.traceback}"
    checks = evaluate(kernel.kc, "[(o[0].equals(f.assign(total=f['a'] + f['b'])), o[1].shape, float(o[1].sum()), "
                                 "o[1].flags.writeable) for o, f in zip(out, frames)]")
    assert checks == [[True, [1000, 1000], 1e6 * i, True] for i in range(6)], checks


# --------------------------------------------------------------------------- crashes


def test_worker_killed_with_sigkill(kernel, tmp_path):
    """A worker killed from outside fails its item by name; the pool recovers."""
    kernel.worker_pids()
    # items sleep 120 s: a crash not reported at once is not reported within collect's 30 s
    code = f"%%poolmap range(2)\ndef stuck(x):\n    mark({str(tmp_path)!r}, x)\n    time.sleep(120)\n    return x\n"
    msg_id = kernel.kc.execute(code)
    victim = started(tmp_path, 2)[1]
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    r = collect(kernel.kc, msg_id, timeout=30, t0=t_kill)

    assert r.error and r.error["ename"] == "WorkerCrashedError", repr(r)
    message = r.error["evalue"]
    assert f"pid {victim}" in message and "item 1 (1)" in message and "SIGKILL" in message, message
    other = still_alive(processes([started(tmp_path, 2)[0]]), within=10.0)  # only a hang
    assert not other, "the worker still sleeping on item 0 was left running"
    assert_maps(kernel.kc)
    assert victim not in kernel.worker_pids()


# --------------------------------------------------------------------------- tracebacks


def test_exception_from_a_helper_function(fresh):
    """An exception raised in a helper the mapped function calls keeps its type and frames.

    (A kernel of its own: today this failure leaves the pool dead.)
    """
    run_ok(fresh.kc, "def check(x):\n    if x == 3:\n        raise KeyError(x)\n    return x\n")
    r = run(fresh.kc, "%%poolmap range(6)\ndef work(x):\n    return check(x) + 1\n", timeout=20)
    assert r.error and r.error["ename"] == "KeyError", repr(r)
    tb = strip_ansi(r.traceback)
    assert "return check(x) + 1" in tb and "raise KeyError(x)" in tb, tb
    assert_maps(fresh.kc)


def test_failing_map_names_the_item_and_the_cell(kernel):
    """A worker's exception: same type, the cell's own line and number, the item named."""
    r = run(kernel.kc, "%%poolmap range(10)\ndef work(x):\n    if x == 7:\n        raise ValueError(f'no {x}')\n    return x\n")
    assert r.error and r.error["ename"] == "ValueError" and r.error["evalue"] == "no 7", repr(r)
    tb = strip_ansi(r.traceback)
    assert "raise ValueError(f'no {x}')" in tb and "poolmagic: item 7 (value 7) failed." in tb, tb
    n = r.reply["content"]["execution_count"]
    cells = re.findall(r"Cell In\[(\d+)\], line \d+", tb)
    assert cells and set(cells) == {str(n)}, f"the cell is In[{n}]; the traceback names {cells}"


# --------------------------------------------------------------------------- lifecycle


def _snapshot(k: Kernel) -> dict[str, list[psutil.Process]]:
    """The kernel's pool processes, after checking the expected ones are all there."""
    workers = set(k.worker_pids())
    run_ok(k.kc, "%%poolmap -q range(4)\ndef square(x):\n    return x * x\n")
    procs = pool_processes(k.pid)
    # dask: the server its LocalCluster's workers are forked from, and the local
    # pool's forkserver, kept for --backend local (%poolsize 2 started it)
    assert len(procs["forkserver"]) == (2 if k.backend == "dask" else 1), describe(process_tree(k.pid))
    found = {p.pid for p in procs["other"]}
    assert workers <= found, (workers, describe(process_tree(k.pid)))
    return procs


RECORD_SIGNALS = """\
import json
_k = get_ipython().kernel
def _recording_signal_children(signum, _orig=_k._signal_children, _path={path!r}):
    with open(_path, "a") as fh:
        fh.write(json.dumps([int(signum), [p.pid for p in _k._process_children()]]) + "\\n")
    return _orig(signum)
_k._signal_children = _recording_signal_children
"""


def test_shutdown_with_warm_pool_is_fast_and_clean(fresh, tmp_path):
    """Shutting down a kernel with a warm pool ends every pool process through
    poolmagic's hook, and leaves nothing behind.

    Without the hook, the workers, forkserver and resource tracker outlive the
    request until ipykernel's own SIGTERM/SIGKILL rounds reach them (the tracker
    ignores SIGTERM: 2.6 s). So, with no clock: the kernel records every process
    its rounds signal, and none of the pool's may be among them (they were gone
    before the rounds began). bench.py's shutdown row times it.
    """
    procs = _snapshot(fresh)
    children = process_tree(fresh.pid)[1:]
    assert len(children) >= 4, describe(children)  # tracker, forkserver, 2 workers
    record = tmp_path / "signalled.jsonl"
    run_ok(fresh.kc, RECORD_SIGNALS.format(path=str(record)))
    fresh.kc.stop_channels()
    fresh.km.shutdown_kernel(now=False)
    left = still_alive(process_tree(fresh.pid) + children, within=10.0)  # only a hang
    assert not left, f"left behind by the shutdown: {describe(left)}"
    rounds = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    pool = {p.pid for group in procs.values() for p in group} | {p.pid for p in children}
    reached = sorted({pid for _, pids in rounds for pid in pids} & pool)
    assert not reached, f"ipykernel's SIGTERM/SIGKILL rounds had to end pool processes {reached}: {rounds}"


def test_restart_leaves_no_old_process(fresh, tmp_path):
    """restart_kernel() ends the old kernel's workers, forkserver and tracker."""
    _snapshot(fresh)
    old = process_tree(fresh.pid)
    fresh.km.restart_kernel()
    left = still_alive(old)
    assert not left, f"left behind by the restart: {describe(left)}"
    fresh.pid = kernel_pid(fresh.km)
    fresh.kc.wait_for_ready(timeout=60)
    run_ok(fresh.kc, SETUP)
    assert_maps(fresh.kc, within=20)


def test_unload_ext_stops_workers_and_forkserver(fresh):
    """%unload_ext poolmagic leaves no worker and no forkserver behind; reloading works.

    multiprocessing's resource tracker is left alone on purpose (other code in
    the kernel may use it); it goes with the kernel (see the shutdown test).
    """
    procs = _snapshot(fresh)
    pool = procs["forkserver"] + procs["other"]
    run_ok(fresh.kc, "%unload_ext poolmagic", timeout=30)  # the timeout only catches a hang
    left = still_alive(pool, within=10.0)
    assert not left, f"left behind by %unload_ext: {describe(left)}"
    assert not pool_processes(fresh.pid)["other"], describe(process_tree(fresh.pid))
    gone = run(fresh.kc, "%%poolmap range(2)\ndef f(x):\n    return x\n")
    assert gone.status == "error" and "poolmap" in gone.stderr + gone.traceback, repr(gone)
    run_ok(fresh.kc, "%load_ext poolmagic")
    assert_maps(fresh.kc, within=20)


def test_summary_comes_after_printed_output(kernel):
    """Text printed by the cell and by the workers is sent before the summary display.

    (The summary skips ipykernel's stream flush when nothing is pending; when
    something is, the flush must still happen first.)
    """
    code = (
        "%%poolmap -c 1 range(4)\n"
        "print('cell body prints first')\n"
        "def talk(x):\n"
        "    print('worker says', x)\n"
        "    return x\n"
    )
    r = run(kernel.kc, code)
    assert r.status == "ok", repr(r)
    kinds = [
        "summary" if m["msg_type"] == "display_data" else m["content"]["text"]
        for m in r.msgs
        if m["msg_type"] in ("stream", "display_data")
    ]
    text = "".join(k for k in kinds if k != "summary")
    assert text == "cell body prints first\n" + "".join(f"worker says {i}\n" for i in range(4)), kinds
    assert kinds[-1] == "summary", kinds
    # only the cell body printed (the workers did not): it must still come first
    body_only = run(kernel.kc, "%%poolmap range(3)\nprint('just the body')\ndef f(x):\n    return x\n")
    order = [m["msg_type"] for m in body_only.msgs if m["msg_type"] in ("stream", "display_data")]
    assert order == ["stream", "display_data"], order


def test_async_map_display_updates_in_place(kernel):
    """--async shows a live display (progress) that is updated in place to the final summary."""
    first = run(kernel.kc, "%%poolmap --async -o h -c 1 range(6)\nimport time\ndef slow(x):\n    time.sleep(0.25)\n    return x\n")
    assert first.status == "ok", repr(first)
    shown = [m for m in first.msgs if m["msg_type"] == "display_data"]
    assert len(shown) == 1, first.msgs
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert "running" in shown[0]["content"]["data"]["text/plain"]
    second = run(kernel.kc, "import time\nr = h.get(30)\ntime.sleep(0.7)\nprint(r)")
    assert second.stdout.strip() == "[0, 1, 2, 3, 4, 5]", repr(second)
    updates = [
        m for m in first.msgs + second.msgs
        if m["msg_type"] == "update_display_data" and m["content"]["transient"]["display_id"] == display_id
    ]
    assert updates, "no update_display_data for the async map's display"
    final = updates[-1]["content"]["data"]
    assert "6 items" in final["text/plain"] and "running" not in final["text/plain"]
    assert "poolmagic" in final["text/html"]


def test_async_map_without_o_shows_one_card(kernel):
    """Without -o the handle is the cell's value: its display was a second card, frozen at
    '0/4 items · workers starting' under the live card that ends at '4 items'."""
    first = run(kernel.kc, "%%poolmap --async -c 1 range(4)\nimport time\ndef nap(x):\n    time.sleep(0.3)\n    return x\n")
    assert first.status == "ok", repr(first)
    cards = [m for m in first.msgs if m["msg_type"] == "display_data"]
    assert len(cards) == 1 and "running" in cards[0]["content"]["data"]["text/plain"], first.msgs
    value = first.value
    assert value.startswith("<MapHandle: nap() runs in the background; its card follows it"), value
    assert "items" not in value, value
    second = run(kernel.kc, "handle = _\nhandle.get(30)")
    assert second.value == "[0, 1, 2, 3]", repr(second)
    shown = run(kernel.kc, "handle").value  # finished: the handle shows the map's card again
    assert shown.startswith("poolmagic: nap() · 4 items in"), shown
