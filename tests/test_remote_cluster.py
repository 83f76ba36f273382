"""A cluster that does not share the kernel's disk or environment (issue 27).

A real ``dask scheduler`` and ``dask worker`` started by the test in a folder
of their own, with a clean environment (another cwd and HOME, no PYTHONPATH
but a folder of packages the kernel does not have): nothing of the "notebook's"
folder is visible to them, as on a cluster someone else started.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")

import poolmagic  # noqa: E402
from poolmagic import BadInputError, Pool  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def cell(source: str, **names):
    """The last function a notebook cell defines (in ``__main__``, as in a kernel)."""
    ns: dict = {"__name__": "__main__", **names}
    exec(textwrap.dedent(source), ns)
    return [v for v in ns.values() if callable(v) and getattr(v, "__module__", None) == "__main__"][-1]


def _dask_cli() -> list[str]:
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """(pool, folders) for a CLI cluster in a clean environment, and the notebook's folder."""
    import wcwidth

    root = tmp_path_factory.mktemp("remote")
    home, site_dir, notebook = root / "cluster-home", root / "worker-site", root / "notebook"
    for d in (home, site_dir, notebook):
        d.mkdir()
    # The workers' environment differs: another minor version of wcwidth (pure Python), and a
    # package that is installed here but broken there.
    ours = importlib.metadata.version("wcwidth").split(".")
    theirs = f"{ours[0]}.{int(ours[1]) + 1}.0"
    (site_dir / "wcwidth").mkdir()
    (site_dir / "wcwidth" / "wcwidth.py").write_text("def wcswidth(s):\n    return len(s)\n")
    (site_dir / "wcwidth" / "__init__.py").write_text(f"from .wcwidth import wcswidth\n__version__ = {theirs!r}\n")
    (site_dir / f"wcwidth-{theirs}.dist-info").mkdir()
    (site_dir / f"wcwidth-{theirs}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: wcwidth\nVersion: {theirs}\n")
    (site_dir / "pure_eval").mkdir()
    (site_dir / "pure_eval" / "__init__.py").write_text("raise ImportError('not installed on this worker')\n")
    # the workers run the poolmagic under test (its folder, not the notebook's)
    ours_src = Path(poolmagic.__file__).resolve().parents[1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(site_dir), str(ours_src)]),
           "LANG": "C.UTF-8"}
    sched_file = home / "scheduler.json"
    procs = []

    def launch(*args: str) -> None:
        procs.append(subprocess.Popen(
            [*_dask_cli(), *args, "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
            cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=open(home / f"log-{len(procs)}.txt", "w"),
            start_new_session=True))

    launch("scheduler", "--port", "0", "--scheduler-file", str(sched_file))
    deadline = time.monotonic() + 30
    while not sched_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched_file.exists(), "dask scheduler did not start"
    launch("worker", "--scheduler-file", str(sched_file), "--nthreads", "1")
    address = json.loads(sched_file.read_text())["address"]
    sys.path.insert(0, str(notebook))
    pool = Pool(1, backend="dask", address=address)
    try:
        pool.backend.wait_ready(30)
        pool.backend.client.wait_for_workers(1, timeout=30)
        yield pool, notebook, home
    finally:
        pool.shutdown()
        sys.path.remove(str(notebook))
        for p in procs:
            try:
                os.killpg(p.pid, 9)
            except OSError:
                pass
            p.wait(10)


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    sys.modules.pop(name, None)


def test_a_helper_module_next_to_the_notebook_follows_the_function(remote):
    pool, notebook, home = remote
    write_module(notebook, "nbtools", """
        FACTOR = 3
        def scale(x):
            return x * FACTOR
    """)
    f = cell("""
        import nbtools
        def f(x):
            return nbtools.scale(x)
    """)
    assert pool.map(f, range(5)) == [0, 3, 6, 9, 12]
    assert "nbtools" in pool.status()  # %poolsize names what it sends


def test_an_edited_and_reloaded_helper_reaches_the_workers(remote):
    pool, notebook, _ = remote
    write_module(notebook, "nbedit", "def scale(x):\n    return x * 3\n")
    import nbedit

    f = cell("""
        import nbedit
        def f(x):
            return nbedit.scale(x)
    """)
    assert pool.map(f, range(3)) == [0, 3, 6]
    (notebook / "nbedit.py").write_text("def scale(x):\n    return x * 10\n")
    importlib.reload(nbedit)  # what %autoreload does
    assert pool.map(f, range(3)) == [0, 10, 20]


def test_a_helper_imported_inside_the_function_and_a_helper_class_as_items(remote):
    pool, notebook, _ = remote
    write_module(notebook, "nbinner", """
        class Point:
            def __init__(self, x):
                self.x = x
        def norm(p):
            return abs(p.x)
    """)
    import nbinner

    f = cell("""
        def f(p):
            import nbinner
            return nbinner.norm(p)
    """)
    assert pool.map(f, [nbinner.Point(-2), nbinner.Point(5)]) == [2, 5]


def test_a_package_of_another_version_is_a_note_and_a_broken_one_an_error(remote):
    pool, _, _ = remote
    f = cell("""
        import wcwidth
        def f(s):
            return wcwidth.wcswidth(s)
    """)
    report = pool.run(f, ["ab", "cde"])
    assert report.results == [2, 3]
    note = [n for n in report.notes if n.startswith("wcwidth ")]
    assert note and "on the workers" in note[0], report.notes
    assert "wcwidth" in pool.status()
    g = cell("""
        import pure_eval
        def g(x):
            return pure_eval.Evaluator({}) and x
    """)
    with pytest.raises(BadInputError, match=r"uses pure_eval, which the dask worker .* cannot import"):
        pool.run(g, [1])


def test_variables_the_user_set_follow_and_the_kernels_own_do_not(remote, monkeypatch):
    pool, _, home = remote
    monkeypatch.setenv("POOLMAGIC_REMOTE_TEST", "42")
    f = cell("""
        import os
        def f(name):
            return os.environ.get(name)
    """)
    assert pool.map(f, ["POOLMAGIC_REMOTE_TEST", "HOME"]) == ["42", str(home)]


def test_a_relative_path_in_the_items_is_refused_before_work(remote, monkeypatch):
    pool, notebook, _ = remote
    (notebook / "data").mkdir(exist_ok=True)
    (notebook / "data" / "part-001.csv").write_text("a,b\n")
    monkeypatch.chdir(notebook)
    f = cell("""
        def f(path):
            return open(path).read()
    """)
    with pytest.raises(BadInputError, match=r"item 0 \('data/part-001.csv'\) is a path relative to this kernel's folder"):
        pool.map(f, ["data/part-001.csv"])
    assert pool.map(f, [str(notebook / "data" / "part-001.csv")]) == ["a,b\n"]  # absolute: fine here


def test_an_item_that_kills_its_worker_is_blamed_not_the_chunk_before_it(remote):
    """The worker dies as its next item starts: its "began" must not die with it (2 ms batching),
    or the chunk it finished just before is blamed and retried, and item 3 runs once more."""
    pool, _, _ = remote
    f = cell("""
        import os, time
        def risky(x):
            if x == 3:
                os._exit(1)
            time.sleep(0.05)  # its "began" has left, its result is still in the 2 ms batch
            return x
    """)
    with pytest.raises(poolmagic.MapFailedError) as info:
        pool.run(f, range(6), retries=1, keep_going=True, chunksize=1)
    report = info.value.report
    assert report.results[:3] + report.results[4:] == [0, 1, 2, 4, 5]
    assert list(report.errors) == [3]
    assert list(report.attempts) == [3] and len(report.attempts[3]) == 2
    assert report.retried == 1
    # each death left the cluster without a worker for a moment: said once, not once a death
    assert sum("had no worker for a while" in n for n in report.notes) == 1


def test_the_status_shows_no_dashboard_where_the_scheduler_serves_none(remote):
    """The scheduler runs its HTTP server (and lists it as its "dashboard" service) with
    --no-dashboard or without bokeh too, where /status only says "Dask needs bokeh": no link then."""
    pool, _, _ = remote
    link = pool.backend.client.dashboard_link
    assert link.startswith("http://127.0.0.1:")  # the HTTP server is there...
    text = pool.status()
    assert "no dashboard" in text and link not in text and "http" not in text, text  # ...the dashboard is not


def test_a_dashboard_is_told_from_an_http_server_without_one():
    """What the scheduler's individual-plots.json lists (dask-labextension reads it): the plots, or {}."""
    import http.server
    import threading

    from poolmagic.engine.dask.plumbing import serves_dashboard

    answers = {"/individual-plots.json": b'{"Individual Task Stream": "/individual-task-stream"}'}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = answers.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert serves_dashboard(f"{base}/status") is True
        answers["/individual-plots.json"] = b"{}"  # no bokeh on the scheduler, or --no-dashboard
        assert serves_dashboard(f"{base}/status") is False
        del answers["/individual-plots.json"]  # not a dask scheduler's server
        assert serves_dashboard(f"{base}/status") is False
        assert serves_dashboard(f"{base}/proxy/8787/other") is None  # a link template of the user's: cannot tell
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_workers_with_another_poolmagic_version_are_refused_with_both_versions(tmp_path):
    """Each chunk runs poolmagic's own code on the worker: another version was let through
    without a word (only a missing poolmagic was said), and a changed protocol fails obscurely."""
    site_dir = tmp_path / "site"
    meta = site_dir / "poolmagic-0.0.1.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: poolmagic\nVersion: 0.0.1\n")
    ours_src = Path(poolmagic.__file__).resolve().parents[1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join([str(site_dir), str(ours_src)])}
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([*_dask_cli(), *args, "--host", "127.0.0.1", "--no-dashboard",
                               "--dashboard-address", "127.0.0.1:0"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for args in [("scheduler", "--port", "0", "--scheduler-file", str(sched_file))]]
    pool = None
    try:
        deadline = time.monotonic() + 30
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        procs.append(subprocess.Popen([*_dask_cli(), "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                                       "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"], cwd=tmp_path, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        address = json.loads(sched_file.read_text())["address"]
        with Client(address, timeout=30) as c:
            c.wait_for_workers(1, timeout=30)
        pool = Pool(backend="dask", address=address)
        with pytest.raises(poolmagic.PoolmapError, match=r"poolmagic 0\.0\.1, this kernel .*install poolmagic=="):
            pool.map(abs, [-1, 2])
    finally:
        if pool is not None:
            pool.shutdown()
        for p in procs:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, 9)
            p.wait(10)
