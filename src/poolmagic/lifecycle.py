"""Starting and stopping the process machinery around pools: light on purpose.

``%load_ext`` calls ``prestart`` before it imports the rest of poolmagic, so
the forkserver boots (~60 ms) while the API and the engine are imported;
this module therefore imports nothing heavy.
"""
from __future__ import annotations

from .engine.processes import prestart as _prestart
from .engine.processes import stop_helper_processes


def prestart() -> None:
    """Boot the local backend's helper process (forkserver) in the background, now."""
    _prestart()


def stop_helpers(tracker: bool = False) -> None:
    """Stop multiprocessing's helper processes (forkserver; with ``tracker``, its resource tracker)."""
    stop_helper_processes(tracker=tracker)
