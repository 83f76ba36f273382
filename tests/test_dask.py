"""The dask backend: the same maps on a dask.distributed cluster (issue: outgrow one machine).

Behaviour every backend must share is tested once per backend in
tests/backends/ (the ``backend`` fixture of tests/conftest.py); this module
keeps what is dask's own: task sizes, the cluster, its security. The address path is proven against a scheduler and two workers
started as processes of their own with the ``dask`` command line, as a user
would start a cluster.

Functions mapped here are pickled by value (like notebook code), so the
workers never import this test module.
"""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

pytest.importorskip(
    "distributed", reason='the dask backend needs dask.distributed: pip install "poolmagic[dask]"'
)

from conftest import run_script, wait_dead, wait_for  # noqa: E402

import poolmagic  # noqa: E402
from poolmagic import NOT_DONE, BadInputError, Pool  # noqa: E402
from poolmagic.engine.dask import forkserver as daskforkserver  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- mapped functions


def double(x):
    return 2 * x


def scaled(x, factor=1, offset=0):
    return x * factor + offset


def rnd(_x):
    import numpy as np

    return (random.random(), float(np.random.random()))


def raise_at(x, bad=5):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return 2 * x


def sleep_at(x, bad=1, seconds=30.0):
    if x == bad:
        time.sleep(seconds)
    return x


def _until(condition, timeout: float = 30.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the cluster did not get there"
        time.sleep(0.02)


def pid_or_stuck(x, mark, bad=1):
    """Item ``bad`` writes its worker's pid to ``mark`` and hangs; the others return their pid."""
    if x == bad:
        with open(mark, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(3.0)
    return os.getpid()


def exit_at(x, bad=3):
    if x == bad:
        time.sleep(0.2)  # the items before it finish first
        os._exit(1)
    return 2 * x


def touch(path):
    Path(path).write_text("ran")
    return path


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dask_pool():
    """One real LocalCluster (2 worker processes) for the module."""
    pool = Pool(2, backend="dask")
    pool.backend.wait_ready(60)
    yield pool
    pids = pool.backend.worker_pids()
    pool.shutdown()
    assert not wait_dead(pids), "a dask worker outlived pool.shutdown()"


def _dask_cli() -> list[str]:
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]


def _launch_cluster(tmp: Path, *security: str, port: int = 0, workers: int = 2):
    """``dask scheduler`` and ``dask worker`` processes, as a user starts a cluster."""
    sched_file = tmp / "scheduler.json"
    procs = []

    def launch(*args: str) -> subprocess.Popen:
        p = subprocess.Popen([*_dask_cli(), *args, *security], cwd=tmp, stdout=subprocess.DEVNULL,
                             stderr=open(tmp / f"log-{len(procs)}.txt", "w"), start_new_session=True)
        procs.append(p)
        return p

    # --no-dashboard alone still serves HTTP on 0.0.0.0: bind that to loopback too
    loopback = ("--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0")
    protocol = ("--protocol", "tls") if security else ()
    sched_file.unlink(missing_ok=True)
    launch("scheduler", *loopback, *protocol, "--port", str(port), "--scheduler-file", str(sched_file))
    deadline = time.monotonic() + 30
    while not sched_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched_file.exists(), "dask scheduler did not start"
    for _ in range(workers):
        launch("worker", *loopback, "--scheduler-file", str(sched_file), "--nthreads", "1")
    import json

    return json.loads(sched_file.read_text())["address"], procs


def _kill_cluster(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, 9)
        except OSError:
            pass
        p.wait(10)


def _stop_cluster(procs, tmp: Path) -> None:
    _kill_cluster(procs)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def remote_cluster():
    tmp = Path(tempfile.mkdtemp(prefix="poolmagic-test-cluster-"))
    address, procs = _launch_cluster(tmp)
    from distributed import Client

    with Client(address, timeout=30) as c:
        c.wait_for_workers(2, timeout=30)
    yield address, procs
    _stop_cluster(procs, tmp)


@pytest.fixture(scope="module")
def tls_cluster():
    """A cluster on tls://, with a self-signed certificate (openssl) for everyone:
    its address, and the dask configuration a client needs to reach it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    tmp = Path(tempfile.mkdtemp(prefix="poolmagic-test-tls-"))
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    address, procs = _launch_cluster(tmp, "--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key))
    config = {"distributed.comm.tls.ca-file": str(cert), "distributed.comm.tls.client.cert": str(cert),
              "distributed.comm.tls.client.key": str(key)}
    import dask
    from distributed import Client

    with dask.config.set(config), Client(address, timeout=30) as c:
        c.wait_for_workers(2, timeout=30)
    yield address, config
    _stop_cluster(procs, tmp)


@pytest.fixture(scope="module")
def remote_pool(remote_cluster):
    address, _ = remote_cluster
    pool = Pool(backend="dask", address=address)
    pool.backend.wait_ready(30)
    yield pool
    pool.shutdown()


# ---------------------------------------------------------------- this backend only
# (what every backend must do alike is in tests/backends/test_backend_maps.py)


def nap(x, seconds=0.025):
    time.sleep(seconds)  # as long on a loaded machine as on a quiet one
    return x


def test_a_short_map_goes_as_one_task_per_worker(dask_pool):
    """16 equal 25 ms items on 2 workers: each worker's share, 200 ms, as one
    task. Not a tail of one-item tasks (8 tasks, 4 of them singles), nor two
    tasks of 4 each: a task costs the kernel and its worker ~6 ms of CPU, on
    the cores the items need."""
    dask_pool.map(nap, range(16))  # the time per item is known from here on
    report = dask_pool.run(nap, range(16))
    assert report.results == list(range(16))
    sizes = [c.count for c in sorted(report.chunks, key=lambda c: c.start)]
    assert sizes == [8, 8], sizes
    assert len({c.worker for c in report.chunks}) == 2


def test_a_long_map_goes_in_tasks_of_about_200_ms_ending_together(dask_pool):
    """64 items of 25 ms: tasks of ~200 ms (8 items), not one per item, and a
    worker's last share whole rather than split off into a small tail."""
    dask_pool.map(nap, range(16))
    report = dask_pool.run(nap, range(64))
    assert report.results == list(range(64))
    sizes = [c.count for c in sorted(report.chunks, key=lambda c: c.start)]
    # 1.6 s of work: 8 tasks of 8, give or take a last share taken whole (at most 12)
    assert sum(sizes) == 64 and 6 <= len(sizes) <= 10, sizes
    assert max(sizes) <= 12, sizes
    assert len({c.worker for c in report.chunks}) == 2


def test_n_above_a_remote_clusters_workers_is_said(remote_pool):
    report = remote_pool.run(double, range(4), workers=4)
    assert report.results == [0, 2, 4, 6]
    assert any("-n 4" in n and "gave this pool 2 workers" in n for n in report.notes), report.notes
    assert "-n 4" in report.summary()


def test_seed_gives_the_same_results_on_both_backends(local_pool, dask_pool):
    pytest.importorskip("numpy")
    here = local_pool.map(rnd, range(12), seed=42)
    there = dask_pool.map(rnd, range(12), seed=42, chunksize=5)
    assert here == there
    assert len(set(here)) == 12


def drawn_slowly(_x):
    import numpy as np

    a = random.random()
    time.sleep(0.01)  # another item running meanwhile in this process would move the streams here
    b = float(np.random.random())
    time.sleep(0.01)
    return (a, b, random.random())


def test_seeded_items_on_a_worker_with_two_threads_draw_what_the_seed_promises(local_pool):
    """A worker process with 2 threads could run two seeded chunks at once, both on the process's
    one ``random`` and ``np.random``: each item's draws moved the other's, silently. Chunks hold
    task.py's per-process lock; the results equal the local pool's (the plain loop's) for the seed."""
    pytest.importorskip("numpy")
    from distributed import LocalCluster

    expect = local_pool.map(drawn_slowly, range(16), seed=7, chunksize=1)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        pool = Pool(backend="dask", address=cluster.scheduler_address)
        try:
            pool.backend.wait_ready(30)
            for chunksize in (1, 2):
                assert pool.map(drawn_slowly, range(16), seed=7, chunksize=chunksize) == expect, chunksize
        finally:
            pool.shutdown()
    assert len(set(expect)) == 16


# ---------------------------------------------------------------- dask only


def test_a_cluster_whose_workers_run_in_this_process_is_refused_and_leaves_it_able_to_pool():
    """LocalCluster(processes=False): the map ran its chunks in the kernel itself, which then counted
    as a worker (every later Pool: 'cannot start a pool inside one of its own workers'); its seeded
    chunks also reseeded the notebook's own random streams."""
    from distributed import LocalCluster

    random.seed(3)
    want = [random.random() for _ in range(2)]
    random.seed(3)
    got = [random.random()]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        pool = Pool(backend="dask", address=cluster.scheduler_address)
        try:
            pool.backend.wait_ready(30)
            with pytest.raises(poolmagic.PoolmapError, match=r"run inside this kernel.*processes=True"):
                pool.map(double, range(4), seed=1)
        finally:
            pool.shutdown()
    got.append(random.random())
    assert got == want  # the notebook's stream went on where it was
    after = Pool(1)
    try:
        assert after.map(double, range(3)) == [0, 2, 4]
    finally:
        after.shutdown()



def test_local_cluster_listens_on_loopback_only(dask_pool):
    pids = {os.getpid(), *dask_pool.backend.worker_pids()}
    listening = []
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append((pid, conn.laddr.ip, conn.laddr.port))
    assert listening, "the cluster listens nowhere?"
    assert all(ip == "127.0.0.1" for _, ip, _ in listening), listening


def test_cli_cluster_listens_on_loopback_only(remote_cluster):
    _, procs = remote_cluster
    listening = []
    for p in procs:
        for proc in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]:
            listening += [c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"127.0.0.1"}, listening


def test_status_names_scheduler_workers_cores_and_dashboard(dask_pool):
    text = dask_pool.status()
    assert dask_pool.backend.client.scheduler.address in text
    assert "2 workers × 1 thread" in text and text.count(" cores available") == 1, text  # cores counted once
    if importlib.util.find_spec("bokeh") is not None:
        assert "dashboard http://127.0.0.1:" in text


def test_missing_distributed_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    with pytest.raises(BadInputError, match=r'pip install "poolmagic\[dask\]"'):
        Pool(backend="dask")


def test_unknown_backend_is_named():
    with pytest.raises(BadInputError, match="the backends are: local, dask"):
        Pool(backend="spark")


def test_the_address_path_runs_maps_on_a_cluster_of_its_own(remote_pool, remote_cluster):
    address, procs = remote_cluster
    assert remote_pool.size == 2
    assert remote_pool.map(double, range(100)) == [2 * x for x in range(100)]
    with pytest.raises(ValueError, match="bad item 5"):
        remote_pool.map(raise_at, range(8))
    assert address in remote_pool.status()


def test_the_address_path_reports_a_crash_and_goes_on(remote_pool):
    with pytest.raises(poolmagic.WorkerCrashedError) as ei:
        remote_pool.map(exit_at, range(8), chunksize=1)
    assert ei.value.indices == [3]
    assert remote_pool.map(double, range(10)) == [2 * x for x in range(10)]


def test_the_address_path_times_out_an_item_whose_task_runs_on(remote_pool):
    with pytest.raises(poolmagic.ItemTimeoutError, match="runs on in its dask worker"):
        remote_pool.map(sleep_at, range(3), timeout=0.5, kwargs={"seconds": 2.0})
    assert remote_pool.map(double, range(4)) == [0, 2, 4, 6]


@pytest.mark.timeout(60)
def test_a_timed_out_task_on_a_remote_cluster_does_not_hold_the_chunks_queued_behind_it(remote_pool, tmp_path):
    """Its worker stays busy until the task ends: the chunks queued on that worker run on
    another one, not after the hung item (the map waited for the hang to end)."""
    mark = tmp_path / "stuck-pid"
    with pytest.raises(poolmagic.MapFailedError) as ei:
        remote_pool.run(pid_or_stuck, range(6), timeout=0.5, keep_going=True, chunksize=1,
                        kwargs={"mark": str(mark)})
    report = ei.value.report
    assert list(report.errors) == [1]
    stuck = int(mark.read_text())
    assert all(report.results[x] != stuck for x in range(2, 6))
    assert remote_pool.map(double, range(4)) == [0, 2, 4, 6]


@pytest.mark.timeout(60)
def test_a_map_that_waits_for_tasks_a_cancelled_map_left_running_says_why(remote_pool):
    """A remote task cannot be stopped: after a cancel, the next map of instant items waits
    for both workers to finish theirs. It said only "slower than a plain loop"."""
    shared = remote_pool.backend.shared
    _until(lambda: not shared.zombies)  # what an earlier test gave up on has ended
    handle = remote_pool.map_async(nap, [0, 1], chunksize=1, kwargs={"seconds": 2.0})
    _until(lambda: len(shared.inflight) == 2 and all(c.began for c in list(shared.inflight.values())))
    handle.cancel()  # both items run (their tasks said they began)
    report = remote_pool.run(double, range(4))
    assert report.results == [0, 2, 4, 6]
    assert any("an earlier map gave up on" in n for n in report.notes), report.notes


@pytest.mark.timeout(60)
def test_an_interrupted_map_on_a_remote_cluster_does_not_claim_its_running_items_stopped(remote_pool):
    """Ctrl-C: the note said 'the running items were stopped'; a remote task runs on to its end."""
    import _thread

    shared = remote_pool.backend.shared
    _until(lambda: not shared.zombies)  # what an earlier test gave up on has ended

    def interrupt_once_both_run():
        _until(lambda: len(shared.inflight) == 2 and all(c.began for c in list(shared.inflight.values())))
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as ei:
        remote_pool.run(nap, [0, 1], chunksize=1, kwargs={"seconds": 2.0})
    notes = getattr(ei.value, "__notes__", [])
    assert len(notes) == 1 and "the running items were not stopped (a task on a remote dask cluster" in notes[0], notes
    assert remote_pool.map(double, range(4)) == [0, 2, 4, 6]


def test_max_memory_on_a_remote_cluster_is_refused_before_any_work(remote_pool, tmp_path):
    """Its workers' memory is not on this machine: say so, and what to use instead."""
    ran = tmp_path / "ran"
    with pytest.raises(BadInputError, match=r"--max-memory reads each worker's memory on this machine.*"
                                            r"dask worker --memory-limit\)\. Drop it, or run this map on the local"):
        remote_pool.run(touch, [str(ran)], max_memory="1GB")
    remote_pool.max_memory = 1 << 30  # the pool's limit (%poolsize --max-memory) is refused the same way
    try:
        with pytest.raises(BadInputError, match=r"it is the pool's setting: clear it \(%poolsize --max-memory off\)"):
            remote_pool.map(touch, [str(ran)])
    finally:
        remote_pool.max_memory = None
    assert not ran.exists(), "the map ran before its bad option was caught"
    assert remote_pool.map(double, range(3)) == [0, 2, 4]


def _memory_monitors(dask_worker):
    return "memory_monitor" in dask_worker.periodic_callbacks, dask_worker.memory_manager.memory_pause_fraction


def test_our_workers_neither_spill_nor_pause_but_their_nannies_still_kill(dask_pool):
    """A worker paused at 80 % would hold our pinned chunks; poolmagic's guard stops it instead."""
    dask_pool.map(double, range(2))
    states = dask_pool.backend.client.run(_memory_monitors)
    assert states and all(s == (False, False) for s in states.values()), states
    nannies = list(dask_pool.backend.cluster.workers.values())
    assert nannies and all("memory_monitor" in n.periodic_callbacks for n in nannies)


def test_a_tls_cluster_with_dasks_own_security_configuration(tls_cluster):
    import dask

    address, config = tls_cluster
    assert address.startswith("tls://127.0.0.1:")
    with dask.config.set(config):  # as a user's ~/.config/dask/distributed.yaml would say
        pool = Pool(backend="dask", address=address)
        pool.backend.wait_ready(30)
    try:
        assert pool.map(double, range(10)) == [2 * x for x in range(10)]
        assert address in pool.status()
    finally:
        pool.shutdown()


TLS_UNCONFIGURED = """
import sys
from poolmagic import Pool, PoolmapError
pool = Pool(backend="dask", address=sys.argv[1])
try:
    pool.map(abs, range(3))
except PoolmapError as e:
    print("ERROR", str(e).replace("\\n", " "))
print("NEXT", Pool(1).map(abs, [-2]))
"""


def test_a_tls_address_without_the_configuration_says_what_is_missing_and_exits(tls_cluster, tmp_path):
    """The error names the address and dask's TLS settings; the half-made client it
    failed with is not left to be closed at exit (where that took 20 s)."""
    address, _ = tls_cluster
    script = tmp_path / "tls_unconfigured.py"
    script.write_text(TLS_UNCONFIGURED)
    proc = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True, timeout=15,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    msg = lines.get("ERROR", "")
    assert f"could not connect to the dask scheduler at {address}" in msg, proc.stdout
    assert "needs dask's TLS configuration: distributed.comm.tls.ca-file" in msg, msg
    assert lines.get("NEXT") == "[2]", proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_workers(address: str, n: int) -> None:
    from distributed import Client

    with Client(address, timeout=30) as c:
        c.wait_for_workers(n, timeout=30)


@pytest.mark.timeout(120)
def test_a_lost_scheduler_fails_the_map_keeping_what_finished_and_the_next_map_connects_again(tmp_path):
    """SIGKILL the scheduler of a cluster the pool is connected to, mid-map: the map
    fails with what happened (after one try to connect again), keeps the results
    that came; once a scheduler is back at the address, the next map runs there."""
    port = _free_port()
    address, procs = _launch_cluster(tmp_path, port=port, workers=2)
    _wait_workers(address, 2)
    pool = Pool(backend="dask", address=address)
    try:
        handle = pool.map_async(nap, range(40), chunksize=1, kwargs={"seconds": 0.3})
        assert wait_for(lambda: handle.report.done >= 2, 30), "no item finished"
        os.killpg(procs[0].pid, 9)  # the scheduler (its workers leave when it is gone)
        with pytest.raises(poolmagic.PoolmapError) as ei:
            handle.get(60)
        msg = str(ei.value)
        assert f"could not connect again to the dask scheduler at {address} after losing the connection" in msg, msg
        report = handle.report
        kept = [i for i, r in enumerate(report.results) if r is not NOT_DONE]
        assert len(kept) >= 2 and all(report.results[i] == i for i in kept), report.results
        _kill_cluster(procs)
        _, procs = _launch_cluster(tmp_path, port=port, workers=1)  # back, at the same address
        _wait_workers(address, 1)
        assert pool.map(double, range(4)) == [0, 2, 4, 6]
    finally:
        pool.shutdown()
        _stop_cluster(procs, tmp_path)


class Watch:
    """What a display of the map learns from its events (live.Progress), and nothing else."""

    def attach(self, job):
        from poolmagic.live import Progress

        self.progress = Progress(job.report.items, job.report.pool_size)
        job.observers.append(self.progress)

    def tick(self):
        pass

    def close(self):
        pass


def test_a_cluster_without_workers_says_the_map_waits_for_one(tmp_path):
    """A scheduler with no worker yet: the map waits (clusters scale up), its
    display says why and how to start one, and it runs once a worker comes."""
    address, procs = _launch_cluster(tmp_path, workers=0)
    pool = Pool(backend="dask", address=address)
    try:
        watch = Watch()
        handle = pool.map_async(double, range(6), watch=watch)
        assert wait_for(lambda: watch.progress.waiting, 30), "the map never said it waits"
        why = watch.progress.waiting
        assert f"the dask cluster at {address} has none" in why and f"dask worker {address}" in why, why
        assert handle.report.done == 0
        procs.append(subprocess.Popen(
            [*_dask_cli(), "worker", address, "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address",
             "127.0.0.1:0", "--nthreads", "1"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        assert handle.get(60) == [0, 2, 4, 6, 8, 10]
        assert watch.progress.waiting is None
        assert any("had no worker" in n for n in handle.report.notes), handle.report.notes
    finally:
        pool.shutdown()
        _stop_cluster(procs, tmp_path)


def test_shutdown_leaves_a_remote_cluster_running(remote_cluster):
    address, procs = remote_cluster
    pool = Pool(backend="dask", address=address)
    assert pool.map(double, range(3)) == [0, 2, 4]
    pool.shutdown()
    assert all(p.poll() is None for p in procs), "poolmagic stopped a cluster it did not start"
    from distributed import Client

    with Client(address, timeout=10) as c:  # (a worker an earlier test crashed may still be restarting)
        c.wait_for_workers(2, timeout=30)


def test_a_bad_address_fails_with_the_reason_and_keeps_the_pool(ip, monkeypatch):
    from IPython.core.error import UsageError

    from poolmagic.engine.dask import link as daskcluster

    monkeypatch.setattr(daskcluster, "CONNECT_TIMEOUT_S", 2.0)  # nothing listens there: no need to wait 10 s
    before = poolmagic.get_pool()
    with pytest.raises(UsageError, match="could not connect to the dask scheduler at tcp://127.0.0.1:9"):
        ip.run_line_magic("poolsize", "--backend dask --address tcp://127.0.0.1:9")
    assert poolmagic.get_pool() is before


def test_poolsize_switches_to_dask_and_back(ip, capsys):
    ip.run_line_magic("poolsize", "3 --backend dask")  # the count before the options, as people type it
    pool = poolmagic.get_pool()
    assert type(pool.backend).__name__ == "DaskBackend"
    out = capsys.readouterr().out
    assert "dask LocalCluster" in out and "scheduler tls://127.0.0.1:" in out
    assert "· 3 workers × 1 thread" in out, out  # started with 3, not with 2 and scaled up later
    ip.run_cell("%%poolmap -q -o got range(5)\ndef cube(x):\n    return x ** 3\n")
    assert ip.user_ns["got"] == [0, 1, 8, 27, 64]
    pids = pool.backend.worker_pids()
    assert pids
    ip.run_line_magic("poolsize", "auto --backend local")  # (back to the session's size too)
    assert type(poolmagic.get_pool().backend).__name__ == "LocalBackend"
    assert poolmagic.get_pool().size == poolmagic.get_pool().cores
    assert not wait_dead(pids), "the LocalCluster's workers outlived the switch back"


def test_tune_times_each_size_on_that_many_dask_workers(ip):
    """Sleeping items scale past the cores, on real worker processes: the
    LocalCluster is grown to the largest size before it is timed (4 "workers"
    were timed on 2 processes before), and keeps the chosen size. Items sleep
    0.5 s, so 4 workers give twice the throughput of 2 whatever the load (dask's
    few ms per item are far below the 5 % that --tune forgives), and the budget
    leaves 5 s to spare before the largest size is timed: no race on the machine's speed."""
    from poolmagic.tune import candidate_sizes

    ip.run_line_magic("poolsize", "2 --backend dask")
    pool = poolmagic.get_pool()
    try:
        ip.run_cell_magic("poolmap", "-q range(4)", "import time\ndef io_bound(x):\n    time.sleep(0.5)\n    return x\n")
        result = ip.run_line_magic("poolsize", "--tune --budget 10")
        largest = candidate_sizes(pool.cores)[-1]
        assert [r.workers for r in result.rows][-1] == largest, result
        assert result.chosen == largest and "waiting-bound" in result.reason, result
        assert pool.size == largest
        assert wait_for(lambda: len(pool.backend.worker_pids()) == largest, timeout=30), pool.backend.worker_pids()
    finally:
        ip.run_line_magic("poolsize", "auto --backend local")


def test_a_script_that_never_shuts_its_dask_pool_exits_cleanly(tmp_path):
    script = tmp_path / "never_shut.py"
    script.write_text(
        "import os, sys\n"
        "from poolmagic import Pool\n"
        "pool = Pool(2, backend='dask')\n"
        "print(pool.map(abs, range(-3, 0)))\n"
        "print('PIDS', *pool.backend.worker_pids(), flush=True)\n"
    )
    out, err, code = run_script(script, timeout=60)
    assert code == 0, err
    assert "[3, 2, 1]" in out
    pids = [int(p) for line in out.splitlines() if line.startswith("PIDS") for p in line.split()[1:]]
    assert pids and not wait_dead(pids), "a dask worker outlived the interpreter"


TWO_CLUSTERS = """
import logging
import distributed
from poolmagic import Pool
handlers = [h for h in logging.getLogger("distributed").handlers if isinstance(h, logging.StreamHandler)]
print("BEFORE", [h.level for h in handlers])
a = Pool(2, backend="dask")
b = Pool(2, backend="dask")
print(a.map(abs, [-1, -2]), b.map(abs, [-3, -4]))
a.shutdown()
print(b.map(abs, [-5]))
b.shutdown()
print("AFTER", [h.level for h in handlers])
"""


def test_two_clusters_closed_one_by_one_print_no_dask_log_lines(tmp_path):
    """Closing the first cluster used to give dask its INFO lines back while the second still ran."""
    script = tmp_path / "two_clusters.py"
    script.write_text(TWO_CLUSTERS)
    out, err, code = run_script(script, timeout=60)
    assert code == 0, err
    assert "[1, 2] [3, 4]" in out and "[5]" in out, out
    assert " - INFO - " not in err, err[-2000:]
    levels = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("BEFORE", "AFTER")))
    assert levels["AFTER"] == levels["BEFORE"], levels  # given back once the last one closed


# ---------------------------------------------------------------- worker processes from our server


def _parents(pids) -> set[int]:
    return {psutil.Process(p).ppid() for p in pids}


@pytest.mark.skipif(daskforkserver.CONTEXT is None, reason="no forkserver on this platform")
def test_workers_and_their_replacements_are_forked_by_poolmagics_dask_server(dask_pool):
    """A replacement is a fork of a server that has imported dask, not a fresh
    Python that imports it (what an interrupt, a timeout or a crash waits for)."""
    server = daskforkserver.server_pid()
    assert server is not None and server != os.getpid()
    before = dask_pool.backend.worker_pids()
    assert len(before) == 2 and _parents(before) == {server}
    with pytest.raises(poolmagic.WorkerCrashedError):
        dask_pool.map(exit_at, range(6))
    # one replacement per crash: two when item 3 crashed in a chunk of several, then alone (to name it)
    assert wait_for(lambda: len(dask_pool.backend.worker_pids()) == 2
                    and set(dask_pool.backend.worker_pids()) - set(before), 30), "no replacement came"
    assert _parents(dask_pool.backend.worker_pids()) == {server}
    assert dask_pool.map(double, range(4)) == [0, 2, 4, 6]


def test_dask_gets_its_own_process_context_back_when_our_last_cluster_closes():
    """(In a fresh interpreter: this module's own cluster stays up meanwhile.)"""
    out, err, code = run_script(
        """
        import distributed.nanny, distributed.process
        from poolmagic import Pool
        from poolmagic.engine.dask import forkserver as daskforkserver
        originals = (distributed.process.get_mp_context, distributed.nanny.get_mp_context)
        pool = Pool(1, backend="dask")
        assert pool.map(abs, [-1, -2]) == [1, 2]
        during = (distributed.process.get_mp_context, distributed.nanny.get_mp_context)
        assert (during != originals) == (daskforkserver.CONTEXT is not None), during
        pool.shutdown()
        assert (distributed.process.get_mp_context, distributed.nanny.get_mp_context) == originals
        assert daskforkserver.server_pid() is None
        print("OK")
        """,
        timeout=60,
    )
    assert code == 0 and "OK" in out, err[-2000:]


def test_a_users_own_local_cluster_is_left_to_dask(dask_pool):
    """Only poolmagic's nannies fork from its server: a LocalCluster the user
    starts in the same kernel spawns its workers as dask does."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        pids = [n.pid for n in cluster.workers.values()]
        assert pids and _parents(pids) == {os.getpid()}


@pytest.mark.skipif(daskforkserver.CONTEXT is None, reason="no forkserver on this platform")
def test_a_killed_kernel_takes_its_workers_and_what_they_started_along(tmp_path):
    """SIGKILL the process that owns the LocalCluster while an item has started
    a process of its own: the workers, that process and our server all go."""
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, subprocess, sys\n"
        "from poolmagic import Pool\n"
        "from poolmagic.engine.dask import forkserver as daskforkserver\n"
        "def start(x):\n"
        "    import subprocess\n"
        "    return subprocess.Popen(['sleep', '300']).pid\n"
        "pool = Pool(2, backend='dask')\n"
        "got = pool.map(start, range(2))\n"
        "print('PIDS', *got, *pool.backend.worker_pids(), daskforkserver.server_pid(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out, err, code = run_script(script, timeout=60)
    assert code == -9, err
    pids = [int(p) for line in out.splitlines() if line.startswith("PIDS") for p in line.split()[1:]]
    assert len(pids) == 5, out
    assert not wait_dead(pids, timeout=15), "a process outlived its killed kernel"


def test_a_scatter_to_a_worker_that_just_left_is_tried_again():
    """Found by the oracle on dask (a crash_once map): the client scattered the function
    to a worker directly, the worker died, and the scheduler's update_data raised
    KeyError of its address; the map failed at submit ("could not submit a task to
    the dask cluster: KeyError: 'tls://…'"). The scheduling part alone, with a client
    whose first scatter meets that."""
    from collections import OrderedDict

    from poolmagic.engine.dask.scheduling import Scheduler
    from poolmagic.engine.dask.state import State

    class Future:
        status = "finished"

    class Client:
        calls = 0

        def scatter(self, data, hash, timeout):
            Client.calls += 1
            if Client.calls == 1:
                raise KeyError("tls://127.0.0.1:45839")
            return Future()

    class Link:
        client = Client()
        memfds: dict = {}

        def refresh_workers(self, force=False):
            pass

    scheduler = Scheduler(State(owned=True), Link(), outcomes=None, size=lambda: 2)
    fut = scheduler._scattered(OrderedDict(), "v1", lambda: b"the function")
    assert isinstance(fut, Future) and Client.calls == 2


def note_then_maybe_exit(x, folder):
    """Leaves a file per call; item 1 then ends its worker at once (os._exit)."""
    import uuid

    Path(folder, f"{x}-{uuid.uuid4().hex}").write_text("ran")
    if x == 1:
        os._exit(1)
    return 2 * x


def test_a_result_lost_with_its_worker_is_run_again_and_said_to_be(dask_pool, tmp_path):
    """Issue 22 (found by the deep oracle run): a dask worker holds a finished task's result
    until the kernel fetches it. Item 0 finishes, item 1 kills the same worker at once: item
    0's result dies with it and item 0 runs again. The map said nothing (a --retries count one
    short, the function called twice); now ``report.lost`` and a note say so."""
    for run in range(4):
        folder = tmp_path / str(run)
        folder.mkdir()
        with pytest.raises(poolmagic.MapFailedError) as ei:
            dask_pool.run(note_then_maybe_exit, [0, 1], workers=1, chunksize=1, keep_going=True,
                          kwargs={"folder": str(folder)})
        r = ei.value.poolmap_report
        calls = len(list(folder.glob("0-*")))
        lost = getattr(r, "lost", {})
        assert r.results[0] == 0 and isinstance(r.errors[1], poolmagic.WorkerCrashedError)
        assert calls == 1 + lost.get(0, 0), (calls, lost)  # every run of item 0 accounted for
        assert set(lost) <= {0}, lost
        assert any("lost with a worker" in n for n in r.notes) == bool(lost), r.notes
        if lost:
            assert "1 item was run again (0)" in r.summary(), r.summary()


def test_a_worker_chosen_to_retire_is_never_kept_once_its_drop_was_asked(dask_pool):
    """Issue 22: ``-n 3`` on a pool of 2 grows the cluster, the next map shrinks it. A drop
    asked for on the scaling thread could be overtaken by a map that kept the worker after
    all: the drop then closed it under that map's chunk, blamed with WorkerCrashedError
    (exit code 0). A worker whose drop was asked for stays retiring. (The two asks run on the
    backend's manager thread, as a map's do, the pool sized 3 so that nothing else shrinks it.)"""
    backend = dask_pool.backend
    workers = lambda: backend.link.cluster.scheduler_info["workers"]  # noqa: E731
    backend.resize(3)
    try:
        assert wait_for(lambda: len(workers()) == 3, timeout=30)
        ids = {w["name"]: w["local_directory"] for w in workers().values()}  # (one per worker process)
        seen: dict = {}
        done = threading.Event()

        def on_the_manager_thread() -> None:
            try:
                scaler = backend.link.scaler
                scaler.fit(2, holds=lambda address: False)  # asks the scaling thread for a drop ...
                retired = getattr(scaler, "retired", ())  # (the drop may have run already)
                seen["chosen"] = [n for n in ids if n in scaler.retiring or ids[n] in retired]
                scaler.fit(3, holds=lambda address: False)  # ... and a map wants 3 again, before it ran
                seen["kept"] = [n for n in seen["chosen"]
                                if n not in scaler.retiring and ids[n] not in getattr(scaler, "retired", ())]
            finally:
                done.set()

        backend._q.put(on_the_manager_thread)
        assert done.wait(30)
        assert len(seen["chosen"]) == 1, (seen, ids)
        assert not seen["kept"], "a worker whose drop was asked was kept after all"
        gone = ids[seen["chosen"][0]]
        assert wait_for(lambda: gone not in {w["local_directory"] for w in workers().values()}, timeout=30), \
            "the worker chosen was not retired"
        assert wait_for(lambda: len(workers()) == 3, timeout=30), "the pool of 3 did not start a worker again"
    finally:
        backend.resize(2)
    assert dask_pool.map(double, range(6), workers=3, chunksize=1) == [2 * x for x in range(6)]


def test_a_worker_started_after_a_retirement_gets_chunks(dask_pool):
    """Issue 22 (a deep oracle run hung): dask started a new worker under a retired one's name,
    and retirement was by name, so the new worker was retiring for ever and got no chunk; once
    the others' ports were taken over as well (below), no worker was usable and the map waited
    for ever. Names are now never given twice, and retirement is by worker process."""
    backend = dask_pool.backend
    workers = lambda: backend.link.cluster.scheduler_info["workers"]  # noqa: E731
    assert dask_pool.map(double, range(6), workers=3, chunksize=1) == [2 * x for x in range(6)]
    assert wait_for(lambda: len(workers()) == 3, timeout=30)
    assert dask_pool.map(double, range(4), workers=2) == [2 * x for x in range(4)]  # retires one
    assert wait_for(lambda: len(workers()) == 2, timeout=30), "no worker was retired"
    before = {w["local_directory"] for w in workers().values()}
    backend.resize(3)  # a worker started now, the pool held at 3 (nothing shrinks it meanwhile)
    try:
        assert wait_for(lambda: len(workers()) == 3, timeout=30)
        new = next(a for a, w in workers().items() if w["local_directory"] not in before)

        def ran_on_new() -> bool:  # maps until one sends a chunk to it (it may join late on a loaded host)
            r = dask_pool.run(nap, range(12), chunksize=1, kwargs={"seconds": 0.05})
            assert r.results == list(range(12))
            return any(c.worker == backend.shared.slots.get(new) for c in r.chunks)

        assert wait_for(ran_on_new, timeout=60, every=0.0), "the worker started after a retirement got no chunk"
    finally:
        backend.resize(2)


def test_a_new_worker_on_the_port_of_one_that_left_gets_chunks(dask_pool):
    """Issue 22: the OS hands a dead worker's port to a new one (seen after ~100 deaths in a
    deep oracle run); the backend skipped every address it had seen leave, so the new worker
    never got a chunk. Here a worker's address is recorded as left by another worker (another
    dask id), as a port taken over looks (another worker process: another scratch folder)."""
    link, state = dask_pool.backend.link, dask_pool.backend.shared
    assert dask_pool.map(double, range(4)) == [0, 2, 4, 6]
    address = sorted(link.usable())[0]
    state.workers.pop(address)
    state.gone[address] = "/the/scratch/folder/of/a/worker/that/left"
    link.refresh_workers(force=True)
    assert address in state.workers and address in link.usable(), "a new worker on a port seen before is not used"
    assert dask_pool.map(double, range(4)) == [0, 2, 4, 6]


@pytest.mark.timeout(180)
def test_a_remote_clusters_card_counts_its_task_slots_not_the_kernels_cores(tmp_path):
    """Issue 24: the card judged a map on a remote cluster against this machine's cores: a
    speedup above them, real on a bigger cluster, was called a failed timing. The card now
    counts the cluster's task slots (its workers' threads). Three one-thread workers here."""
    address, procs = _launch_cluster(tmp_path, workers=3)
    try:
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(3, timeout=60)
        pool = Pool(backend="dask", address=address)
        try:
            pool.backend.wait_ready(30)
            report = pool.run(nap, range(6), chunksize=1)
            assert report.results == list(range(6))
            assert report.cores == 3, report.cores
            assert "3 cores" in report.summary() or "3 task slots" in report.summary(), report.summary()
        finally:
            pool.shutdown()
    finally:
        _kill_cluster(procs)


def crash_once_after(x, folder, seconds=0.5):
    """Ends its worker (os._exit) the first time it runs on ``x``, after ``seconds``."""
    flag = Path(folder, str(x))
    if not flag.exists():
        flag.write_text("crashed")
        time.sleep(seconds)
        os._exit(3)
    return x


def test_a_worker_chosen_to_retire_that_crashes_on_its_own_blames_its_item(dask_pool, tmp_path):
    """Issue 22 (the deep oracle run on dask): a worker chosen to retire while it still runs
    chunks is retired once idle; if one of its items crashes it first, that item is to blame.
    It was not (a retiring worker's removal counted as ours): its chunk ran again unblamed, and
    an item that crashes once came back with a value the loop would never give."""
    backend = dask_pool.backend
    workers = lambda: backend.link.cluster.scheduler_info["workers"]  # noqa: E731
    backend.resize(3)
    try:
        assert wait_for(lambda: len(workers()) == 3, timeout=30)
        dask_pool.map(double, range(6), chunksize=1)  # the three are the map's workers
        handle = dask_pool.map_async(crash_once_after, range(3), chunksize=1, keep_going=True,
                                     kwargs={"folder": str(tmp_path)})
        assert wait_for(lambda: len(list(tmp_path.iterdir())) == 3, timeout=30), "the items did not start"
        backend.resize(2)  # one of the three, busy, is chosen to retire
        with pytest.raises(poolmagic.MapFailedError):
            handle.get(timeout=60)
        r = handle.report
        assert sorted(r.errors) == [0, 1, 2], (r.results, r.errors)
        assert all(isinstance(e, poolmagic.WorkerCrashedError) for e in r.errors.values()), r.errors
    finally:
        backend.resize(2)
