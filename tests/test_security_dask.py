"""Issue 23: a LocalCluster only its kernel can use, --address that says what is wrong,
and runtime files that are private and do not outlive their kernel.

The attacker is real: where the suite runs as root, a subprocess drops to the
user ``nobody`` (``os.setuid``) and tries to reach poolmagic's LocalCluster
without its certificate, over tls:// and tcp://, and to run a function there
that would create a marker file. The same script against a plain-TCP
LocalCluster (what poolmagic started before) does create the marker: the
control that shows the attacker's side works.
"""
from __future__ import annotations

import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import cloudpickle
import psutil
import pytest

pytest.importorskip(
    "distributed", reason='the dask backend needs dask.distributed: pip install "poolmagic[dask]"'
)
pytest.importorskip("cryptography", reason="poolmagic's LocalCluster needs cryptography for its certificate")

from conftest import wait_dead, wait_for  # noqa: E402

import poolmagic  # noqa: E402
from poolmagic import Pool, PoolmapError  # noqa: E402
from poolmagic.engine import runtimedir  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def slow_square(x):
    import time

    time.sleep(0.4)
    return x * x


@pytest.fixture(scope="module")
def dask_pool():
    pool = Pool(2, backend="dask")
    pool.backend.wait_ready(90)
    yield pool
    pids = pool.backend.worker_pids()
    pool.shutdown()
    assert not wait_dead(pids), "a dask worker outlived pool.shutdown()"


# ---------------------------------------------------------------- the attacker

ATTACKER = r'''
import json, os, sys
import cloudpickle, distributed, distributed.comm.tcp, ssl, asyncio, concurrent.futures
from distributed import Client
from distributed.security import Security
import distributed.protocol.pickle, distributed.protocol.serialize, msgpack
target, marker, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
own = Security.temporary()  # a certificate of the attacker's own: not the cluster's
if plan["user"] is not None:
    os.setgroups([])
    os.setgid(plan["gid"])
    os.setuid(plan["user"])
host_port = target.split("://", 1)[1]

def plant(path):
    with open(path, "w") as f:
        f.write(str(os.getuid()))
    return os.getuid()

out = {"uid": os.getuid()}
for name, address, kw in [("tls-none", "tls://" + host_port, {}),
                          ("tls-own-cert", "tls://" + host_port, {"security": own}),
                          ("tcp", "tcp://" + host_port, {})]:
    try:
        with Client(address, timeout=plan["timeout"], set_as_default=False, **kw) as c:
            out[name] = "CONNECTED"
            try:
                out[name] += " ran as uid %s" % c.submit(plant, marker, pure=False).result(timeout=30)
            except Exception as exc:
                out[name] += " submit failed: %s" % type(exc).__name__
    except (ImportError, PermissionError) as exc:
        out[name] = "SETUP %s: %s" % (type(exc).__name__, exc)
    except Exception as exc:
        out[name] = "refused: %s: %s" % (type(exc).__name__, str(exc)[:200])
print(json.dumps(out))
'''


def _attack(address: str, marker: Path, user: int | None, gid: int | None) -> dict:
    plan = {"user": user, "gid": gid, "timeout": 5}
    proc = subprocess.run([sys.executable, "-c", ATTACKER, address, str(marker), json.dumps(plan)],
                          capture_output=True, text=True, timeout=100, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(str(v).startswith("SETUP") for v in out.values()), out
    return out


def _nobody() -> tuple[int, int]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the attacker as another user (os.setuid to nobody); "
                    "test_a_process_without_the_certificate_cannot_use_the_cluster covers the same user")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    return pw.pw_uid, pw.pw_gid


def test_another_user_cannot_connect_submit_or_run_code_on_our_local_cluster(dask_pool, tmp_path):
    """issue 23: as `nobody`, Client('tls://…') without the certificate, with a certificate
    of its own, and Client('tcp://…'): all refused, the marker never appears."""
    uid, gid = _nobody()
    marker = tmp_path / "pwned"
    address = dask_pool.backend.client.scheduler.address
    assert address.startswith("tls://127.0.0.1:"), address
    workers = list(dask_pool.backend.client.scheduler_info()["workers"])
    for target in [address, *workers]:  # the workers listen too: they must refuse as well
        out = _attack(target, marker, uid, gid)
        assert out["uid"] == uid
        for name in ("tls-none", "tls-own-cert", "tcp"):
            assert out[name].startswith("refused"), (target, name, out)
    assert not marker.exists(), "a stranger's function ran in our cluster"
    assert dask_pool.map(slow_square, range(3)) == [0, 1, 4]  # ours still works


def test_the_attacker_script_does_reach_a_cluster_without_tls(tmp_path):
    """The control: the same attacker (as nobody where root) runs its function on a plain-TCP
    LocalCluster on 127.0.0.1, which is what poolmagic started before issue 23."""
    from distributed import LocalCluster

    user = gid = None
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("nobody")
            user, gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            pass
    marker = tmp_path / "control"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        out = _attack(cluster.scheduler_address.replace("tcp://", "tls://"), marker, user, gid)
    assert out["tcp"].startswith("CONNECTED ran as uid"), out
    assert marker.exists()


def test_a_process_without_the_certificate_cannot_use_the_cluster(dask_pool, tmp_path):
    """Any user (the same one too): a client must hold the cluster's certificate."""
    marker = tmp_path / "pwned"
    out = _attack(dask_pool.backend.client.scheduler.address, marker, None, None)
    for name in ("tls-none", "tls-own-cert", "tcp"):
        assert out[name].startswith("refused"), (name, out)
    assert not marker.exists()


def _listening(pids) -> list[tuple[int, str, int]]:
    found = []
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append((pid, conn.laddr.ip, conn.laddr.port))
    return found


def _ss_listening(pids) -> list[str]:
    """What `ss -ltnp` says these processes listen on (the same as psutil, by another tool)."""
    if shutil.which("ss") is None:
        return []
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    local = []
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            local.append(line.split()[3])
    return local


def test_every_listening_socket_is_on_loopback_and_needs_tls(dask_pool):
    """Scheduler, nannies and workers only: the HTTP servers dask starts are closed."""
    backend = dask_pool.backend
    pids = [os.getpid(), *backend.worker_pids()]
    listening = _listening(pids)
    assert listening and all(ip == "127.0.0.1" for _, ip, _ in listening), listening
    ss = _ss_listening(pids)
    assert all(addr.startswith("127.0.0.1:") for addr in ss), ss
    tls_ports = {int(a.rsplit(":", 1)[1]) for a in [backend.client.scheduler.address,
                                                    *backend.client.scheduler_info()["workers"]]}
    tls_ports |= {int(n.address.rsplit(":", 1)[1]) for n in backend.cluster.workers.values()}  # the nannies
    assert all(port in tls_ports for _, _, port in listening), f"listening without TLS: {listening} (TLS: {tls_ports})"
    http = getattr(backend.cluster.scheduler, "http_server", None)
    assert http is None or http.port not in {port for _, _, port in listening}, "the scheduler's HTTP server listens"
    assert "dashboard off" in dask_pool.status()


def test_the_dashboard_when_asked_for_is_on_loopback_and_says_it_has_no_password():
    pool = Pool(1, backend="dask", dashboard=True)
    try:
        pool.backend.wait_ready(90)
        status = pool.status()
        assert "dashboard http://127.0.0.1:" in status and "no password" in status, status
        port = pool.backend.cluster.scheduler.http_server.port
        assert (os.getpid(), "127.0.0.1", port) in _listening([os.getpid()])
    finally:
        pool.shutdown()


def test_poolsize_dashboard_starts_a_local_cluster_with_it(ip, capsys):
    ip.run_line_magic("poolsize", "1 --backend dask --dashboard")
    try:
        out = capsys.readouterr().out
        assert "scheduler tls://127.0.0.1:" in out and "dashboard http://127.0.0.1:" in out, out
    finally:
        ip.run_line_magic("poolsize", "auto --backend local")


def test_a_dashboard_for_a_cluster_at_an_address_is_refused():
    with pytest.raises(poolmagic.BadInputError, match="has its own"):
        Pool(backend="dask", address="tcp://127.0.0.1:9", dashboard=True)


# ---------------------------------------------------------------- --address


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(address: str) -> str:
    pool = Pool(backend="dask", address=address)
    try:
        with pytest.raises(PoolmapError) as ei:
            pool.backend.wait_ready(60)
        return str(ei.value)
    finally:
        pool.shutdown()


@pytest.mark.timeout(40)
def test_an_http_server_at_the_address_is_named_as_not_a_scheduler():
    """issue 22: it hung for a minute; now dask's handshake is bounded (5 s)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        msg = _refused(f"tcp://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert "did not answer as a dask scheduler" in msg, msg


@pytest.mark.timeout(20)
def test_a_closed_port_says_nothing_listens_there_at_once():
    port = _closed_port()
    msg = _refused(f"tcp://127.0.0.1:{port}")
    assert f"tcp://127.0.0.1:{port}: nothing listens there (connection refused)" in msg, msg


@pytest.mark.timeout(20)
def test_an_unknown_host_is_named():
    assert "unknown host 'no-such-host.invalid'" in _refused("tcp://no-such-host.invalid:8786")


def test_a_worker_address_is_not_a_scheduler(dask_pool):
    import dask

    sec = dask_pool.backend.cluster.security  # (our own cluster's certificate, as dask's configuration)
    worker = next(iter(dask_pool.backend.client.scheduler_info()["workers"]))
    config = {"distributed.comm.tls.ca-file": sec.tls_ca_file, "distributed.comm.tls.client.cert": sec.tls_client_cert,
              "distributed.comm.tls.client.key": sec.tls_client_key}
    with dask.config.set(config):
        msg = _refused(worker)
    assert "that is a dask worker, not a scheduler" in msg, msg


def test_tcp_to_a_tls_scheduler_suggests_tls(dask_pool):
    port = dask_pool.backend.client.scheduler.address.rsplit(":", 1)[1]
    msg = _refused(f"tcp://127.0.0.1:{port}")
    assert "a tls:// scheduler? Then give tls://" in msg, msg


@pytest.mark.timeout(20)
def test_a_tls_address_without_dasks_tls_configuration_says_what_is_not_set():
    import dask

    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}):
        msg = _refused(f"tls://127.0.0.1:{_closed_port()}")
    assert "needs dask's TLS configuration" in msg and "not set: distributed.comm.tls.ca-file, " \
        "distributed.comm.tls.client.cert" in msg, msg


def test_a_tls_configuration_naming_a_missing_file_names_it(tmp_path):
    import dask

    missing = str(tmp_path / "nope.pem")
    with dask.config.set({"distributed.comm.tls.ca-file": missing, "distributed.comm.tls.client.cert": missing}):
        msg = _refused(f"tls://127.0.0.1:{_closed_port()}")
    assert f"distributed.comm.tls.ca-file is {missing!r}, which cannot be read" in msg, msg


def test_the_address_path_works_with_our_clusters_certificate_as_dask_configuration(dask_pool):
    """--address tls://… with the user's own certificate (here: our LocalCluster's, in
    dask's configuration, as ~/.config/dask/distributed.yaml would give it)."""
    import dask

    sec = dask_pool.backend.cluster.security
    config = {"distributed.comm.tls.ca-file": sec.tls_ca_file, "distributed.comm.tls.client.cert": sec.tls_client_cert,
              "distributed.comm.tls.client.key": sec.tls_client_key}
    with dask.config.set(config):
        pool = Pool(backend="dask", address=dask_pool.backend.client.scheduler.address)
        try:
            pool.backend.wait_ready(60)
            assert pool.map(slow_square, range(4)) == [0, 1, 4, 9]
        finally:
            pool.shutdown()


# ---------------------------------------------------------------- private runtime files


def _modes(root: str) -> list[tuple[str, int, int]]:
    found = [(root, os.lstat(root).st_mode, os.lstat(root).st_uid)]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found.append((os.path.join(dirpath, name), st.st_mode, st.st_uid))
    return found


def test_every_runtime_file_is_private_during_a_map(dask_pool):
    """Directories 0700, files and sockets 0600, all ours, all in the pid-named runtime
    directory: multiprocessing's sockets, dask's scratch space, the workers' marks."""
    import numpy as np

    global BIG
    BIG = np.ones(1 << 18)  # 2 MB: goes to the workers through a memfd
    local = Pool(2)
    try:
        handle = dask_pool.map_async(big_sum, range(6), chunksize=1)
        assert local.map(abs, [-1, -2]) == [1, 2]  # the local forkserver's socket too
        wait_for(lambda: dask_pool.backend.link.marks and os.path.isdir(dask_pool.backend.link.marks)
                 and os.listdir(dask_pool.backend.link.marks), what="the workers' marks")
        root = runtimedir.runtime_dir()
        assert os.path.basename(root).startswith(f"poolmagic-{os.getpid()}-")
        entries = _modes(root)
        kinds = {stat.S_IFMT(m) for _, m, _ in entries}
        assert stat.S_IFSOCK in kinds and stat.S_IFDIR in kinds and stat.S_IFREG in kinds, entries
        for path, mode, uid in entries:
            assert uid == os.getuid(), path
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            assert stat.S_IMODE(mode) == want, (path, oct(mode))
        dirs = dask_pool.backend.client.run(lambda dask_worker: dask_worker.local_directory)
        assert dirs and all(d.startswith(root + os.sep) for d in dirs.values()), dirs
        assert dask_pool.backend.cluster.scheduler.local_directory.startswith(root + os.sep)
        from multiprocessing import util

        assert util.get_temp_dir().startswith(root + os.sep)
        memfds = [fd for fd in dask_pool.backend.link.memfds.values()]
        assert memfds and all(stat.S_IMODE(os.fstat(fd).st_mode) == 0o600 for fd in memfds)
        assert handle.get(60) == [1.0 + i for i in range(6)]
        cluster_dir = dask_pool.backend.link.dir
    finally:
        local.shutdown()
    assert cluster_dir and os.path.isdir(cluster_dir)


BIG = None


def big_sum(i):
    import time

    time.sleep(0.3)
    return float(BIG[i]) + i


def test_a_closed_cluster_leaves_nothing_behind():
    pool = Pool(1, backend="dask")
    pool.backend.wait_ready(90)
    assert pool.map(abs, [-3]) == [3]
    folder = pool.backend.link.dir
    assert folder and os.path.isdir(folder)
    pool.shutdown()
    assert not os.path.exists(folder)


KERNEL = r'''
import os, sys, time
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "poolmagic")
if sys.argv[1] == "victim":
    ip.run_line_magic("poolsize", "1 --backend dask")
    ip.run_cell("%%poolmap -q -o r range(3)\ndef f(x):\n    return x + 1\n")
    assert ip.user_ns["r"] == [1, 2, 3], ip.user_ns.get("r")
    from poolmagic.engine import runtimedir
    print("RUNTIME", runtimedir.runtime_dir(), flush=True)
    time.sleep(600)
else:
    print("loaded", flush=True)
'''


@pytest.mark.timeout(240)
def test_the_next_load_ext_removes_what_a_sigkilled_kernel_left(tmp_path):
    """A real process with the extension and a dask LocalCluster, SIGKILLed: its
    runtime directory stays; the next %load_ext removes it, but not a live
    process's, nor (as root) another user's."""
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL)
    victim = subprocess.Popen([sys.executable, str(script), "victim"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        left = ""
        for line in victim.stdout:
            if line.startswith("RUNTIME "):
                left = line.split(" ", 1)[1].strip()
                break
        assert left, victim.stderr.read()[-3000:] if victim.poll() is not None else "no runtime directory printed"
        assert os.path.isdir(left) and os.path.basename(left).startswith(f"poolmagic-{victim.pid}-")
        assert any(n.startswith("dask-") for n in os.listdir(left)), os.listdir(left)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
    assert os.path.isdir(left), "gone already?"
    tmp = tempfile.gettempdir()
    alive = tempfile.mkdtemp(prefix=f"poolmagic-{os.getpid()}-", dir=tmp)  # this live process's (a stand-in)
    others = None
    if os.geteuid() == 0:  # a dead pid's directory that belongs to another user: not ours to remove
        others = tempfile.mkdtemp(prefix=f"poolmagic-{victim.pid}-", dir=tmp)
        os.chown(others, 65534, 65534)
    try:
        nxt = subprocess.run([sys.executable, str(script), "next"], capture_output=True, text=True, timeout=120,
                             start_new_session=True)
        assert nxt.returncode == 0 and "loaded" in nxt.stdout, nxt.stderr[-3000:]
        assert not os.path.exists(left), f"{left} outlived the next %load_ext"
        assert os.path.isdir(alive), "a live process's runtime directory was removed"
        if others is not None:
            assert os.path.isdir(others), "another user's directory was removed"
    finally:
        shutil.rmtree(alive, ignore_errors=True)
        if others is not None:
            shutil.rmtree(others, ignore_errors=True)
    # the SIGKILLed kernel's worker and forkserver processes did not outlive it either
    wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                          if left in " ".join(p.info["cmdline"] or [])], timeout=10, what="its processes to exit")


def test_remove_stale_skips_symlinks_and_other_names(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    dead = _dead_pid()
    link = tmp_path / f"poolmagic-{dead}-link"
    link.symlink_to(target)
    stale = tmp_path / f"poolmagic-{dead}-abc123"
    stale.mkdir(mode=0o700)
    other = tmp_path / f"poolmagic-test-{dead}"
    other.mkdir()
    removed = runtimedir.remove_stale(str(tmp_path))
    assert removed == [str(stale)]
    assert (target / "keep").exists() and link.is_symlink() and other.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
