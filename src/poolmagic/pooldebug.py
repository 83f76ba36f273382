"""``%pooldebug``: re-run a failed item of the last map in the kernel, under IPython's debugger.

The item runs with the same function version, item, keyword constants and
seed as in the map (``RunReport.rerun``); the traceback shown and the
debugger start at the user's own frames, not poolmagic's.
"""
from __future__ import annotations

import os
from typing import Any

from IPython.core.error import UsageError

from .api import get_pool
from .errors import BadInputError
from .options import strip_comment

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _end_at_user_frames(tb: Any) -> None:
    """Cut poolmagic's own frames off the end of a traceback, so the debugger opens in the user's."""
    last_user = None
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_PKG_DIR):
            last_user = tb
        tb = tb.tb_next
    if last_user is not None:
        last_user.tb_next = None


def run_pooldebug(shell: Any, line: str) -> None:
    """``%pooldebug LINE`` (its help is the magic's docstring, magics.py)."""
    report = shell.user_ns.get("_poolmap")
    if not hasattr(report, "rerun"):  # unset, or a name the notebook reused (``_poolmap = ...``)
        report = get_pool().last_report
    if report is None:
        raise UsageError("no map has run yet: %pooldebug re-runs an item of the last map")
    if report.status == "running":  # an --async map: its failures are not all in yet
        raise UsageError(f"the last map, {report.func_name}(), is still running in the background: "
                         f"wait for it (handle.wait()), then %pooldebug")
    line = strip_comment(line)
    words = line.split()
    force = "--force" in words
    words = [w for w in words if w != "--force"]
    if any(w.startswith("-") and not w.lstrip("-").replace("_", "").isdigit() for w in words):
        raise UsageError(f"%pooldebug takes an item's index and --force, not {line.strip()!r}")
    arg = " ".join(words)
    try:
        index = int(arg.replace("_", "")) if arg else None
    except ValueError:
        raise UsageError(f"%pooldebug takes an item's index (a whole number), not {arg!r}") from None
    try:
        report.rerun(index, force=force)
    except BadInputError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PKG_DIR):
            tb = tb.tb_next  # start at the user's frames
        _end_at_user_frames(tb)  # a timeout is raised in poolmagic's alarm handler
        shell.showtraceback((type(exc), exc, tb))
        if tb is None:  # raised by code that is not Python (``int``, a C extension): no frame to stop in
            print(f"poolmagic: the error was raised outside Python code (in {report.func_name}()): "
                  f"there is no frame to debug")
            return None
        debugger = shell.debugger_cls()
        debugger.reset()  # as pdb.post_mortem does: quitting needs it
        debugger.interaction(None, tb)
        return None
    print(f"poolmagic: item {index if index is not None else min(report.errors)} ran without an error here")
    return None
