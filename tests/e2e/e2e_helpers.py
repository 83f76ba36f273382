"""Helpers of the end-to-end tests: kernels, executing code, watching processes.

There is deliberately no conftest.py here: a second ``conftest`` module would
shadow tests/conftest.py for ``from conftest import ...``. Test modules import
the ``kernel_spec_manager`` fixture from this module instead.

The kernels must run this checkout of poolmagic, so they must run the test
process's own ``sys.executable``. A ``python3`` kernelspec found on the search
path may point at another Python (a user-level one in ``~/.local/share/jupyter``
wins over the one ipykernel installs into the venv), so the tests write their
own into a temporary folder and use a KernelSpecManager that looks only there.
It is named ``python3`` so that jupyter_client and nbclient treat it as
ipykernel (history kept in memory, not in the user's profile).
"""
from __future__ import annotations

import json
import queue
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import psutil
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from conftest import wait_for  # noqa: F401  (re-exported: the tests' one poller; a timeout raises with `what`)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]


# --------------------------------------------------------------------------- kernels


@pytest.fixture(scope="session")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    """A KernelSpecManager whose only ``python3`` runs ``sys.executable``."""
    kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
    spec = kernels / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (poolmagic e2e)",
                "language": "python",
                "interrupt_mode": "signal",
                "env": {"PYTHONUNBUFFERED": "1"},
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
    assert ksm.get_kernel_spec("python3").argv[0] == sys.executable
    return ksm


def new_kernel_manager(ksm: KernelSpecManager, cls: type = KernelManager) -> Any:
    km = cls(kernel_name="python3", kernel_spec_manager=ksm)
    assert km.format_kernel_cmd()[0] == sys.executable
    return km


def start_kernel(ksm: KernelSpecManager, cwd: Path | str | None = None) -> tuple[KernelManager, Any]:
    km = new_kernel_manager(ksm)
    km.start_kernel(extra_arguments=KERNEL_ARGS, cwd=str(cwd or REPO))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def stop_kernel(km: KernelManager, kc: Any) -> None:
    """Shut down; whatever survives (a test failed half-way) is killed, never leaked."""
    pid = kernel_pid(km)
    tree = process_tree(pid) if pid else []
    try:
        kc.stop_channels()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        kill_all(tree)


def kernel_pid(km: KernelManager) -> int | None:
    prov = km.provisioner
    proc = getattr(prov, "process", None)
    return getattr(proc, "pid", None)


# --------------------------------------------------------------------------- executing


@dataclass
class Result:
    """What one execute request produced."""

    reply: dict
    msgs: list[dict] = field(default_factory=list)  # iopub messages of the request
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def error(self) -> dict | None:
        """The reply content when it is an error (ename, evalue, traceback)."""
        return self.reply["content"] if self.status == "error" else None

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            m["content"]["text"]
            for m in self.msgs
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    def data(self, mime: str) -> list[str]:
        """Every ``mime`` representation shown (display_data and execute_result)."""
        return [
            m["content"]["data"][mime]
            for m in self.msgs
            if m["msg_type"] in ("display_data", "execute_result", "update_display_data")
            and mime in m["content"]["data"]
        ]

    @property
    def value(self) -> str | None:
        """text/plain of the cell's value (execute_result), if any."""
        for m in self.msgs:
            if m["msg_type"] == "execute_result":
                return m["content"]["data"].get("text/plain")
        return None

    @property
    def traceback(self) -> str:
        return "\n".join(self.error["traceback"]) if self.error else ""

    def __repr__(self) -> str:
        return (
            f"Result(status={self.status!r}, seconds={self.seconds:.2f}, error="
            f"{(self.error or {}).get('ename')!r}, stdout={self.stdout[-300:]!r}, "
            f"stderr={self.stderr[-600:]!r})"
        )


def collect(kc: Any, msg_id: str, timeout: float, t0: float | None = None) -> Result:
    """Wait for the reply to ``msg_id`` and its iopub output up to 'idle'.

    Raises TimeoutError naming what was seen if either does not come within
    ``timeout`` seconds: a hang must fail the test, not stall it.
    """
    t0 = time.monotonic() if t0 is None else t0
    deadline = t0 + timeout
    reply = None
    reply_at = None
    msgs: list[dict] = []
    idle = False
    while reply is None or not idle:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"no {'reply' if reply is None else 'idle status'} after {timeout} s; "
                f"iopub so far: {[m['msg_type'] for m in msgs]}"
            )
        if reply is None:
            try:
                msg = kc.get_shell_msg(timeout=min(left, 0.05))
            except queue.Empty:
                pass
            else:
                if msg["parent_header"].get("msg_id") == msg_id:
                    reply = msg
                    reply_at = time.monotonic()
        try:
            msg = kc.get_iopub_msg(timeout=min(max(left, 0.01), 0.05))
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status":
            idle = msg["content"]["execution_state"] == "idle"
        elif msg["msg_type"] != "execute_input":
            msgs.append(msg)
    return Result(reply, msgs, (reply_at or time.monotonic()) - t0)


def run(kc: Any, code: str, timeout: float = 30) -> Result:
    """Execute ``code`` in the kernel and wait (at most ``timeout`` s) for it."""
    t0 = time.monotonic()
    msg_id = kc.execute(code, store_history=True)
    return collect(kc, msg_id, timeout, t0)


def run_ok(kc: Any, code: str, timeout: float = 30) -> Result:
    r = run(kc, code, timeout)
    assert r.status == "ok", f"{r!r}\n{r.traceback}"
    return r


def evaluate(kc: Any, expr: str, timeout: float = 30) -> Any:
    """The value of a Python expression in the kernel (it must print as JSON)."""
    r = run_ok(kc, f"import json as _j; print(_j.dumps({expr}))", timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- processes


def strip_ansi(text: str) -> str:
    """Tracebacks come colored; compare their plain text."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every live process below it (zombies left out)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if alive(p)]


def alive(p: psutil.Process) -> bool:
    """Running (not a zombie) and still the same process (pid not reused)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_alive(procs: Iterable[psutil.Process], within: float = 0.0) -> list[psutil.Process]:
    """The processes of ``procs`` still alive, after waiting up to ``within`` s for them to go."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def describe(procs: Iterable[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out


def kill_all(procs: Iterable[psutil.Process]) -> None:
    for p in procs:
        if alive(p):
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


def helper_kind(p: psutil.Process) -> str | None:
    """'forkserver', 'resource_tracker' or None, from the command line."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return None
    if "multiprocessing.forkserver" in cmd:
        return "forkserver"
    if "multiprocessing.resource_tracker" in cmd:
        return "resource_tracker"
    return None


def pool_processes(kernel: int) -> dict[str, list[psutil.Process]]:
    """The kernel's descendants: its forkserver, its resource tracker, the rest.

    Workers are forks of the forkserver and show its command line, so the
    helpers are told by being the kernel's own children.
    """
    out: dict[str, list[psutil.Process]] = {"forkserver": [], "resource_tracker": [], "other": []}
    try:
        children = {p.pid for p in psutil.Process(kernel).children()}
    except psutil.NoSuchProcess:
        return out
    for p in process_tree(kernel)[1:]:
        kind = helper_kind(p) if p.pid in children else None
        out[kind or "other"].append(p)
    return out


def processes(pids: Iterable[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out

