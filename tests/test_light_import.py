"""``import poolmagic`` and ``%load_ext poolmagic`` load nothing heavy (issue 26).

Cold start is ``%load_ext`` plus the first map: every module imported there is
paid for before the first result. Progress bars (tqdm), BLAS control
(threadpoolctl), dask, numpy and the display code load when first needed.
Each check runs in a fresh interpreter and reads its ``sys.modules``.
"""
from __future__ import annotations

import json

from conftest import run_script

# Third-party packages poolmagic must not import before they are needed.
HEAVY_PACKAGES = ("tqdm", "threadpoolctl", "dask", "distributed", "numpy", "pandas", "hypothesis",
                  "ipywidgets", "matplotlib", "psutil")
# poolmagic's own modules a map needs only once it shows or explains something.
LATER_MODULES = ("poolmagic.display", "poolmagic.charts", "poolmagic.style", "poolmagic.diagnose",
                 "poolmagic.timeline", "poolmagic.tune", "poolmagic.switch", "poolmagic.executor",
                 "poolmagic.imap", "poolmagic.poolsize", "poolmagic.pooldebug",
                 # --checkpoint only: the file format, its signing, its writer threads
                 "poolmagic.checkpointing", "poolmagic.checkpointfile", "poolmagic.checkpointformat",
                 "poolmagic.checkpointpaths",
                 # --resume only, or a map that ends with items missing: the items' keys
                 "poolmagic.resume", "poolmagic.identity", "poolmagic.identityencoding",
                 "poolmagic.itemkeys", "poolmagic.threadqueues")


def heavy(names: list[str]) -> list[str]:
    """The modules of ``names`` that should not have been imported yet."""
    return sorted(n for n in names if n.split(".")[0] in HEAVY_PACKAGES or n in LATER_MODULES
                  or (n.startswith("poolmagic.") and "dask" in n))


def test_import_poolmagic_is_light():
    out, err, code = run_script("""
        import json, sys
        before = set(sys.modules)
        import poolmagic
        poolmagic.__version__
        print(json.dumps(sorted(set(sys.modules) - before)))
    """)
    assert code == 0, err
    new = json.loads(out.splitlines()[-1])
    assert heavy(new) == [], new
    assert "poolmagic.api" not in new, "the API (and the engine) load on first use of a public name"


def test_load_ext_imports_nothing_heavy_even_once_the_pool_is_warm():
    """What %load_ext imports in the kernel, its background start included (the pool
    warms up on threads of its own: waited for until its workers run)."""
    out, err, code = run_script("""
        import json, sys, time
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        before = set(sys.modules)
        ip.run_line_magic("load_ext", "poolmagic")
        import poolmagic
        deadline = time.monotonic() + 20
        while poolmagic.get_pool().backend.state != "warm" and time.monotonic() < deadline:
            time.sleep(0.01)
        warm = poolmagic.get_pool().backend.state
        new = sorted(set(sys.modules) - before)
        ip.run_line_magic("unload_ext", "poolmagic")
        print(json.dumps({"new": new, "warm": warm}))
    """, timeout=60)
    assert code == 0, err
    seen = json.loads(out.splitlines()[-1])
    assert seen["warm"] == "warm", seen
    assert heavy(seen["new"]) == [], seen["new"]


def test_the_worker_module_the_forkserver_preloads_skips_the_kernels_memory_code():
    """The forkserver's boot (preloading engine/worker.py) is the serial part of a cold start:
    the memory guard's module and its pathlib are the kernel's, not a worker's (~4 ms)."""
    out, err, code = run_script("""
        import json, sys
        import poolmagic.engine.worker
        print(json.dumps(sorted(sys.modules)))
    """)
    assert code == 0, err
    loaded = json.loads(out.splitlines()[-1])
    assert "poolmagic.engine.memory" not in loaded and "pathlib" not in loaded, loaded
    assert heavy(loaded) == [], loaded
