"""--checkpoint across kernels, for real: a kernel SIGKILLed in the middle of a
checkpointed map, then a new kernel that runs the same cell with the same PATH.

What the first kernel had received (and so written: one chunk per item with
``-c 1``) is read from the SQLite file itself after the kill; the items the
second kernel runs are read from a file the mapped function appends to. No
assertion depends on how fast anything is: the test polls with deadlines.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from e2e_helpers import (
    describe,
    evaluate,
    kernel_pid,
    kernel_spec_manager,  # noqa: F401  (a fixture)
    kill_all,
    pool_processes,
    process_tree,
    run,
    run_ok,
    start_kernel,
    still_alive,
    stop_kernel,
    wait_for,
)

from poolmagic import checkpointfile

N = 40


def cell(ck: Path, calls: Path) -> str:
    """The notebook cell both kernels run, character for character."""
    return (
        f"%%poolmap -q -c 1 --checkpoint {ck} range({N})\n"
        "import time\n"
        "def slow_square(x):\n"
        f"    with open({str(calls)!r}, 'a') as fh:\n"
        "        fh.write(f'{x}\\n')\n"
        "    time.sleep(0.2)\n"
        "    return x * x\n"
    )


def recorded(calls: Path) -> list[int]:
    return [int(s) for s in calls.read_text().split()] if calls.exists() else []


def stored_chunks(ck: Path) -> int:
    """Whole chunk records a live kernel has written so far (a record being written is torn: skipped)."""
    return len(checkpointfile.read(str(ck)).chunks) if ck.exists() else 0


def start(ksm, cwd: Path, backend: str):
    km, kc = start_kernel(ksm, cwd)
    try:
        run_ok(kc, "%load_ext poolmagic")
        run_ok(kc, "%poolsize 2")
        if backend == "dask":
            run_ok(kc, "%poolsize --backend dask", timeout=60)
    except BaseException:
        stop_kernel(km, kc)
        raise
    return km, kc


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["local", "dask"])
def test_killed_kernel_resumes_from_its_checkpoint_in_a_new_kernel(kernel_spec_manager, tmp_path, backend):
    if backend == "dask":
        pytest.importorskip("distributed")
    ck = tmp_path / "run.ckpt"
    calls = tmp_path / "calls"
    code = cell(ck, calls)

    # ---- kernel 1: start the map, kill the kernel once it is well under way
    km, kc = start(kernel_spec_manager, tmp_path, backend)
    pool: list = []
    try:
        pid = kernel_pid(km)
        kc.execute(code)
        wait_for(lambda: len(recorded(calls)) >= 10 and stored_chunks(ck) >= 1, 30,
                 "10 calls recorded and a chunk committed", every=0.02)
        procs = pool_processes(pid)
        pool = procs["forkserver"] + procs["resource_tracker"] + procs["other"]
        assert procs["forkserver"] and len(procs["other"]) >= 2, describe(process_tree(pid))
        os.kill(pid, signal.SIGKILL)
        left = still_alive(pool, within=10.0)
        assert not left, f"left behind by the killed kernel: {describe(left)}"
    finally:
        kill_all(pool)
        stop_kernel(km, kc)

    first = recorded(calls)
    assert len(first) < N, "the whole map ran before the kill: nothing left to resume"
    held = checkpointfile.read(str(ck))
    chunks = len(held.chunks)
    stored = sorted(i for idx, *_ in held.chunks for i in idx)
    assert chunks >= 1 and len(stored) == chunks, (chunks, stored)  # -c 1: an item per chunk
    assert set(stored) <= set(first)

    # ---- kernel 2: the same cell, the same PATH
    km, kc = start(kernel_spec_manager, tmp_path, backend)
    try:
        r = run(kc, code, timeout=60)
        assert r.status == "ok", f"{r!r}\n{r.traceback}"
        results = evaluate(kc, "_poolmap.results")
        resumed = evaluate(kc, "list(_poolmap.resumed or ())")
        notes = evaluate(kc, "_poolmap.notes")
    finally:
        stop_kernel(km, kc)

    second = recorded(calls)[len(first):]
    print(f"kernel 1: {len(first)} calls, {chunks} chunks stored; kernel 2: {len(second)} calls")
    assert results == [x * x for x in range(N)]
    assert len(second) <= N - chunks, (len(second), chunks)
    assert not set(second) & set(stored), f"items whose results were stored ran again: {set(second) & set(stored)}"
    assert sorted(second) == sorted(set(range(N)) - set(stored)), (second, stored)
    assert resumed == [len(stored), N - len(stored)], resumed
    assert notes == [], notes  # the very same cell: the function did not change


# ---------------------------------------------------------------- items a new kernel must recognise

SETUP = (
    "import dataclasses\n"
    "import pandas as pd\n"
    "@dataclasses.dataclass\n"
    "class Task:\n"
    "    name: str\n"
    "    tags: frozenset\n"
    f"df = pd.DataFrame({{'a': range({N}), 'b': [f'r{{i}}' for i in range({N})]}})\n"
    f"tasks = [Task(f't{{i}}', frozenset({{f'x{{i}}', 'y', 'z'}})) for i in range({N})]\n"
    f"sets = [frozenset({{f'w{{i}}', 'common', 'other'}}) for i in range({N})]\n"
)
KINDS = {  # the ITERABLE, and how the mapped function tells an item's number
    "itertuples": ("df.itertuples()", "item.a"),
    "dataclasses": ("tasks", "int(item.name[1:])"),
    "frozensets": ("sets", "int(next(s for s in item if s.startswith('w'))[1:])"),
}


def identity_cell(ck: Path, calls: Path, kind: str) -> str:
    iterable, number = KINDS[kind]
    return (
        f"%%poolmap -q -c 1 --checkpoint {ck} {iterable}\n"
        "import time\n"
        "def slow_number(item):\n"
        f"    x = {number}\n"
        f"    with open({str(calls)!r}, 'a') as fh:\n"
        "        fh.write(f'{x}\\n')\n"
        "    time.sleep(0.2)\n"
        "    return x * x\n"
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_new_kernel_recognises_the_items_of_a_killed_one(kernel_spec_manager, tmp_path, kind):
    """Before: the new kernel refused with "the ITERABLE changed" (itertuples' generated row
    class, a notebook dataclass and sets of str pickle differently in every process)."""
    ck = tmp_path / "run.ckpt"
    calls = tmp_path / "calls"
    code = identity_cell(ck, calls, kind)

    km, kc = start(kernel_spec_manager, tmp_path, "local")
    pool: list = []
    try:
        pid = kernel_pid(km)
        run_ok(kc, SETUP, timeout=60)
        kc.execute(code)
        wait_for(lambda: len(recorded(calls)) >= 8 and stored_chunks(ck) >= 2, 30,
                 "8 calls recorded and 2 chunks committed", every=0.02)
        procs = pool_processes(pid)
        pool = procs["forkserver"] + procs["resource_tracker"] + procs["other"]
        os.kill(pid, signal.SIGKILL)
        still_alive(pool, within=10.0)
    finally:
        kill_all(pool)
        stop_kernel(km, kc)

    first = recorded(calls)
    stored = sorted(i for idx, *_ in checkpointfile.read(str(ck)).chunks for i in idx)
    assert len(first) < N and stored, (first, stored)

    km, kc = start(kernel_spec_manager, tmp_path, "local")
    try:
        run_ok(kc, SETUP, timeout=60)
        r = run(kc, code, timeout=60)
        assert r.status == "ok", f"{r!r}\n{r.traceback}"
        results = evaluate(kc, "_poolmap.results")
        resumed = evaluate(kc, "list(_poolmap.resumed or ())")
    finally:
        stop_kernel(km, kc)

    second = recorded(calls)[len(first):]
    assert results == [x * x for x in range(N)]
    assert sorted(second) == sorted(set(range(N)) - set(stored)), (second, stored)
    assert resumed == [len(stored), N - len(stored)], resumed
