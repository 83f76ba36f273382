"""Memory that must never kill the kernel: --max-memory and the always-on guard.

A worker grows in 50 MB steps (numpy arrays it writes to, so the pages are
resident) with a short sleep between steps, well past the limit if nothing
stopped it, but never near the machine's memory: at most 1.5 GB, once.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from IPython.core.error import UsageError

import poolmagic
from conftest import read_pid, run_script, wait_dead, wait_for, write_pid
from poolmagic import NOT_DONE, Pool
from poolmagic.engine import memory
from poolmagic.errors import BadInputError, WorkerMemoryError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers never import this module

pytestmark = pytest.mark.skipif(not memory.SUPPORTED, reason="the memory guard needs Linux /proc")

MB = 1 << 20
STEP = 50 * MB


def grow(x, piddir=None, which=3, upto_mb=1500):
    """Item ``which`` grows by 50 MB steps up to ``upto_mb`` (returns the steps); others return x."""
    if piddir is not None:
        write_pid(piddir, x)
    if x != which:
        return x
    import numpy as np

    held = []
    for _ in range(upto_mb // 50):
        held.append(np.ones(STEP // 8))
        time.sleep(0.05)
    return len(held)


def check_memory_error(exc: BaseException, item: int, limit_mb: int) -> None:
    assert isinstance(exc, WorkerMemoryError) and isinstance(exc, MemoryError), repr(exc)
    assert exc.indices == [item]
    assert exc.limit == limit_mb * MB
    msg = str(exc)
    assert f"item {item} (" in msg, msg
    assert f"--max-memory limit of {limit_mb:.1f} MB" in msg, msg
    m = re.search(r"its memory \(([\d.]+) (MB|GB)\)", msg)
    assert m, msg
    said = float(m.group(1)) * (1024 if m.group(2) == "GB" else 1)
    assert said == pytest.approx(exc.rss / MB, abs=0.06)
    assert limit_mb * MB < exc.rss < 1500 * MB, f"stopped at {exc.rss / MB:.0f} MB"


def backend_kwargs(backend: str) -> dict:
    """Pool() arguments for one backend: the local pool, or a dask LocalCluster poolmagic starts."""
    if backend == "dask":
        pytest.importorskip("distributed")
        return {"backend": "dask"}
    return {}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["local", "dask"])
def test_max_memory_stops_the_worker_and_names_the_item(tmp_path, backend):
    pytest.importorskip("numpy")
    with Pool(2, **backend_kwargs(backend)) as pool:
        with pytest.raises(WorkerMemoryError) as e:
            # one worker, one item per chunk: items 0-2 finish before item 3 runs
            pool.run(grow, range(6), kwargs={"piddir": str(tmp_path)}, chunksize=1, workers=1,
                     max_memory="300MB")
        exc = e.value
        check_memory_error(exc, 3, 300)
        assert exc.report is not None and exc.report.results[:3] == [0, 1, 2]
        assert exc.report.results[3] is NOT_DONE
        assert exc.report.errors.keys() == {3}
        pid = read_pid(tmp_path, 3)
        assert f"pid {pid})" in str(exc)
        assert wait_dead([pid]) == [], f"the worker {pid} that ran item 3 is still running"
        assert wait_for(lambda: pid not in pool.backend.worker_pids() and len(pool.backend.worker_pids()) == 2), \
            "the stopped worker was not replaced"
        assert pool.map(abs, range(-4, 0), chunksize=1) == [4, 3, 2, 1]
        report = pool.run(grow, range(4), kwargs={"which": -1})  # no growth: nothing is stopped
        assert report.results == [0, 1, 2, 3] and not report.errors


@pytest.mark.timeout(90)
def test_max_memory_option_of_the_magic(ip):
    pytest.importorskip("numpy")
    ip.run_cell("from test_memory import grow as grow_item")
    with pytest.raises(WorkerMemoryError) as e:
        ip.run_cell_magic("poolmap", "-q --max-memory 300MB -c 1 -n 1 range(6)",
                          "def grows(x):\n    return grow_item(x)\n")
    check_memory_error(e.value, 3, 300)
    report = ip.user_ns["_poolmap"]
    assert report is e.value.report and report.results[:3] == [0, 1, 2]
    assert ip.run_cell_magic("poolmap", "-q range(3)", "def fine(x):\n    return -x\n") == [0, -1, -2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["lots", "-5MB", "0", "12 parsecs"])
def test_bad_size_is_bad_input(bad):
    with Pool(1) as pool:
        with pytest.raises(BadInputError, match="max_memory must be a size such as 500MB"):
            pool.run(abs, range(3), max_memory=bad)
        assert pool.map(abs, [-1], max_memory="1GB") == [1]


@pytest.mark.timeout(30)
def test_bad_size_in_the_magic_is_a_usage_error(ip):
    ip.user_ns.pop("ran_anyway", None)
    with pytest.raises(UsageError, match=r"--max-memory takes a size such as 500MB or 4GB, not 'lots'"):
        ip.run_cell_magic("poolmap", "--max-memory lots range(3)", "ran_anyway = True\ndef f(x):\n    return x\n")
    assert "ran_anyway" not in ip.user_ns  # rejected before the cell ran
    with pytest.raises(UsageError, match="--max-memory takes a size"):
        ip.run_line_magic("poolsize", "--max-memory lots")


@pytest.mark.timeout(90)
def test_poolsize_max_memory_applies_to_maps_without_the_option(ip, capsys):
    pytest.importorskip("numpy")
    pool = poolmagic.get_pool()
    ip.run_cell("from test_memory import grow as grow_item")
    try:
        ip.run_line_magic("poolsize", "--max-memory 400MB")
        out = capsys.readouterr().out
        assert "at most 400.0 MB per worker" in out, out
        assert pool.max_memory == 400 * MB
        ip.run_line_magic("poolsize", "")
        assert "at most 400.0 MB per worker" in capsys.readouterr().out  # it stays
        with pytest.raises(WorkerMemoryError) as e:
            ip.run_cell_magic("poolmap", "-q -c 1 -n 1 range(5)", "def grows(x):\n    return grow_item(x, which=1)\n")
        check_memory_error(e.value, 1, 400)
        # a map's own option wins over the pool's
        with pytest.raises(WorkerMemoryError) as e:
            ip.run_cell_magic("poolmap", "-q --max-memory 300MB -c 1 -n 1 range(5)",
                              "def grows(x):\n    return grow_item(x, which=1)\n")
        check_memory_error(e.value, 1, 300)
    finally:
        ip.run_line_magic("poolsize", "--max-memory off")
    out = capsys.readouterr().out
    assert pool.max_memory is None and "at most" not in out, out
    # cleared: the same growth, up to 500 MB, now finishes
    steps = ip.run_cell_magic("poolmap", "-q -c 1 -n 1 range(3)",
                              "def grows(x):\n    return grow_item(x, which=1, upto_mb=500)\n")
    assert steps == [0, 10, 2]


GUARD_SCRIPT = r"""
import os, sys, time
from pathlib import Path
from poolmagic import Pool
from poolmagic.engine import memory
from poolmagic.errors import WorkerMemoryError

memory.ROOT = ROOT  # the host's figures: a fake cgroup (free memory on a shared host swings by GBs)
os.environ["POOLMAGIC_MEMORY_RESERVE"] = "100MB"

def grow(x, flag=FLAG):
    if x != 1:
        return x
    import numpy as np
    held = np.ones(300 * 2**20 // 8)  # real: this worker is the largest by far
    Path(flag).write_text(str(2**30 - 10 * 2**20))  # then memory runs short: 10 MB left of 1 GB
    time.sleep(30)
    return len(held)

with Pool(2, **BACKEND) as pool:
    pool.map(abs, range(4))
    try:
        print("RESULTS", pool.map(grow, range(4), chunksize=1))
    except WorkerMemoryError as e:
        print("INDICES", e.indices)
        print("LIMIT", e.limit)
        print("RSS", e.rss)
        print("MESSAGE", str(e).replace("\n", " "))
    Path(FLAG).write_text(str(100 * 2**20))  # memory is back
    print("NEXT", pool.map(abs, range(-3, 0)))
print("NUMPY_IN_KERNEL", "numpy" in sys.modules)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "dask"])
def test_always_on_guard_stops_the_largest_worker(backend, tmp_path):
    """No --max-memory: when the machine's memory runs short, the largest worker is stopped.

    The host's figures are a fake cgroup (a test on a shared CI host cannot use the real free
    memory: another lane's processes moved it by more than a worker grew, both ways); the
    workers, their sizes and the guard's choice are real."""
    pytest.importorskip("numpy")
    d = "/sys/fs/cgroup/memory/nb"
    root = fake_root(tmp_path / "root", "4:memory:/nb\n", V1_MOUNTS.format(root="/"),
                     v1_files(d, str(GB), 100 * MB), total=64 * GB, avail=60 * GB)
    flag = root / d.lstrip("/") / "memory.usage_in_bytes"
    head = f"BACKEND = {backend_kwargs(backend)!r}\nROOT = {str(root)!r}\nFLAG = {str(flag)!r}\n"
    out, err, code = run_script(head + GUARD_SCRIPT, timeout=90)
    assert code == 0, err[-3000:]
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert "RESULTS" not in lines, f"the worker was not stopped: {out}"
    assert lines.get("INDICES") == "[1]", out
    assert lines["LIMIT"] == "None"  # no --max-memory: the guard, not a limit
    assert "memory was nearly exhausted" in lines["MESSAGE"], lines["MESSAGE"]
    assert "this worker was the largest" in lines["MESSAGE"] and "item 1 (" in lines["MESSAGE"]
    assert 250 * MB < int(lines["RSS"]) < 2048 * MB
    assert lines["NEXT"] == "[3, 2, 1]", out


# ---------------------------------------------------------------- the kernel's limit: cgroup v1, v2, host
# The reader takes a root folder: each layout is written out as files, as the kernel shows it.

GB = 1 << 30
V1_UNLIMITED = "9223372036854771712"  # what cgroup v1 writes for "no limit" on x86-64
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "35 31 0:32 {root} /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V2_MOUNTS = "30 23 0:26 {root} /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_root(tmp_path, cgroup: str, mountinfo: str, files: dict[str, str],
              total: int = 16 * GB, avail: int = 10 * GB):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    (tmp_path / "proc/meminfo").write_text(
        f"MemTotal:       {total // 1024} kB\nMemFree:        1000 kB\nMemAvailable:   {avail // 1024} kB\n")
    for name, text in files.items():
        p = tmp_path / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def v1_files(d: str, limit: str, usage: int, inactive: int = 0) -> dict[str, str]:
    return {f"{d}/memory.limit_in_bytes": limit + "\n", f"{d}/memory.usage_in_bytes": f"{usage}\n",
            f"{d}/memory.stat": f"cache 5\nrss 7\ninactive_file 1\ntotal_inactive_file {inactive}\n"}


def v2_files(d: str, limit: str, current: int, inactive: int = 0) -> dict[str, str]:
    return {f"{d}/memory.max": limit + "\n", f"{d}/memory.current": f"{current}\n",
            f"{d}/memory.stat": f"anon 5\nfile 9\nactive_file 3\ninactive_file {inactive}\n"}


def test_cgroup_v1_limit_is_read(tmp_path):
    """The layout of a cgroup-v1 host (this one): the memory controller in its own hierarchy."""
    d = "/sys/fs/cgroup/memory/process_api/abc"
    root = fake_root(tmp_path, "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n",
                     V1_MOUNTS.format(root="/"),
                     {**v1_files(d, str(4 * GB), 3 * GB, inactive=GB // 2),
                      **v1_files("/sys/fs/cgroup/memory/process_api", V1_UNLIMITED, 3 * GB),
                      **v1_files("/sys/fs/cgroup/memory", V1_UNLIMITED, 5 * GB)})
    assert [v for v, _ in memory.cgroup_dirs(root)] == [1, 1, 1]
    assert memory.cgroup_dirs(root)[0][1] == root / d.lstrip("/")
    # 4 GB, of which 3 GB in use less 0.5 GB of inactive page cache (reclaimed before any kill)
    assert memory.cgroup_memory(root) == (4 * GB - (3 * GB - GB // 2), 4 * GB)
    assert memory.available(root) == (int(1.5 * GB), 4 * GB)


def test_cgroup_v1_unlimited_is_no_limit(tmp_path):
    d = "/sys/fs/cgroup/memory/process_api/abc"
    root = fake_root(tmp_path, "4:memory:/process_api/abc\n0::/\n", V1_MOUNTS.format(root="/"),
                     {**v1_files(d, V1_UNLIMITED, 3 * GB),
                      **v1_files("/sys/fs/cgroup/memory/process_api", V1_UNLIMITED, 3 * GB)})
    assert memory.cgroup_memory(root) is None
    assert memory.available(root) == (10 * GB, 16 * GB)  # the machine's


def test_cgroup_v1_limit_of_a_parent_applies(tmp_path):
    root = fake_root(tmp_path, "4:memory:/jobs/one\n", V1_MOUNTS.format(root="/"),
                     {**v1_files("/sys/fs/cgroup/memory/jobs/one", V1_UNLIMITED, GB),
                      **v1_files("/sys/fs/cgroup/memory/jobs", str(2 * GB), int(1.5 * GB))})
    assert memory.available(root) == (GB // 2, 2 * GB)


def test_cgroup_v1_in_a_container_whose_mount_is_its_own_cgroup(tmp_path):
    """docker without a cgroup namespace: /proc/self/cgroup names /docker/ID, mounted as the root."""
    root = fake_root(tmp_path, "12:memory:/docker/0123abcd\n", V1_MOUNTS.format(root="/docker/0123abcd"),
                     v1_files("/sys/fs/cgroup/memory", str(3 * GB), GB))
    assert memory.available(root) == (2 * GB, 3 * GB)


def test_cgroup_v2_limit_is_read(tmp_path):
    d = "/sys/fs/cgroup/user.slice/app.scope"
    root = fake_root(tmp_path, "0::/user.slice/app.scope\n", V2_MOUNTS.format(root="/"),
                     {**v2_files(d, str(8 * GB), 6 * GB, inactive=GB),
                      **v2_files("/sys/fs/cgroup/user.slice", "max", 7 * GB)})
    assert memory.cgroup_dirs(root)[0] == (2, root / d.lstrip("/"))
    assert memory.available(root) == (3 * GB, 8 * GB)


def test_cgroup_v2_max_is_no_limit_and_a_namespace_reads_its_mount(tmp_path):
    """In a cgroup namespace /proc/self/cgroup says "/": the mount point is the process's cgroup."""
    root = fake_root(tmp_path, "0::/\n", V2_MOUNTS.format(root="/kubepods/pod1"),
                     v2_files("/sys/fs/cgroup", "max", GB))
    assert memory.cgroup_memory(root) is None
    assert memory.available(root) == (10 * GB, 16 * GB)
    (root / "sys/fs/cgroup/memory.max").write_text(f"{2 * GB}\n")  # limits are read at each look
    assert memory.available(root) == (GB, 2 * GB)


def test_a_limit_above_the_machine_is_the_machine(tmp_path):
    root = fake_root(tmp_path, "0::/a\n", V2_MOUNTS.format(root="/"),
                     v2_files("/sys/fs/cgroup/a", str(64 * GB), GB))
    assert memory.available(root) == (10 * GB, 16 * GB)


def test_mountinfo_escapes_and_missing_files(tmp_path):
    root = fake_root(tmp_path, "4:memory:/my job\n",
                     "35 31 0:32 / /sys/fs/cgroup/mem\\040ory rw - cgroup cgroup rw,memory\n",
                     v1_files("/sys/fs/cgroup/mem ory/my job", str(GB), GB // 4))
    assert memory.available(root) == (3 * GB // 4, GB)
    bare = tmp_path / "bare"
    (bare / "proc").mkdir(parents=True)
    (bare / "proc/meminfo").write_text("MemTotal: 1024 kB\nMemAvailable: 512 kB\n")
    assert memory.cgroup_dirs(bare) == [] and memory.available(bare) == (512 * 1024, 1024 * 1024)


def test_this_machine_is_read(tmp_path):
    """Whatever this host is (v1, v2, none), the reader answers, and within the machine's memory."""
    free, total = memory.available()
    assert 0 <= free <= total


# ---------------------------------------------------------------- results held in the kernel


def big_result(x, flag=None, which=6):
    """64 MB arrays; item ``which`` says memory is short (a fake cgroup file) and keeps running."""
    import numpy as np

    if x == which:
        Path(flag).write_text(str(1 * 2**30 - 10 * 2**20))  # 10 MB left of the fake 1 GB cgroup
        time.sleep(30)
    a = np.empty(64 * MB // 8)
    a.fill(x)
    return a


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "dask"])
def test_the_guard_counts_the_results_held_in_the_kernel(tmp_path, backend, monkeypatch):
    """Results of a real map (6 x 64 MB numpy arrays) are counted in the kernel when memory runs short.

    The host's figures are a fake cgroup (deterministic on a shared machine);
    the results, their bytes and the guard's decision are real.
    """
    pytest.importorskip("numpy")
    d = "/sys/fs/cgroup/memory/nb"
    root = fake_root(tmp_path / "root", "4:memory:/nb\n", V1_MOUNTS.format(root="/"),
                     v1_files(d, str(GB), 100 * MB), total=64 * GB, avail=60 * GB)
    monkeypatch.setattr(memory, "ROOT", str(root))
    monkeypatch.setenv("POOLMAGIC_MEMORY_RESERVE", "100MB")
    flag = root / d.lstrip("/") / "memory.usage_in_bytes"
    with Pool(2, **backend_kwargs(backend)) as pool:
        with pytest.raises(WorkerMemoryError) as e:
            pool.run(big_result, range(8), kwargs={"flag": str(flag)}, chunksize=1, workers=1)
    exc = e.value
    assert exc.indices == [6]
    msg = str(exc)
    assert "memory was nearly exhausted" in msg and "of 1.0 GB" in msg, msg
    m = re.search(r"already hold ([\d.]+) (MB|GB) in the kernel", msg)
    assert m, msg
    held = float(m.group(1)) * (1024 if m.group(2) == "GB" else 1) * MB
    # what had come back when item 6 was stopped: all 6 results (dask may still be bringing the last)
    assert 4 * 64 * MB <= held < 7 * 64 * MB, msg
    assert "more than the workers" in msg, msg
    r = exc.report
    kept = [i for i, a in enumerate(r.results) if a is not NOT_DONE]
    assert all(float(r.results[i][0]) == i for i in kept)
    # the message is a snapshot; on dask a result already on its way may land after it
    # (late results are kept): then the report holds one more than the message counted
    late = 1 if backend == "dask" else 0
    n_held = round(held / (64 * MB))
    assert held == pytest.approx(n_held * 64 * MB, rel=0.01), msg
    assert kept == list(range(len(kept))) and n_held <= len(kept) <= n_held + late, (kept, msg)
    # the bytes counted are those of the chunks recorded (a late result is kept without a chunk record)
    recorded = round(sum(c.nbytes for c in r.chunks) / (64 * MB))
    assert sum(c.nbytes for c in r.chunks) == pytest.approx(recorded * 64 * MB, abs=0.06 * MB)
    assert len(kept) - late <= recorded <= len(kept), (recorded, kept)
