"""The dask backend's line in ``%poolsize``: scheduler, workers, threads, TLS, dashboard.

Asks the connected client for its workers; whether a remote scheduler's
HTTP server serves a dashboard is asked once per link (plumbing.py's probe).
"""
from __future__ import annotations

import importlib.util
from typing import Any

from .plumbing import dashboard_link, serves_dashboard


class StatusLine:
    """Describes a connected cluster in a line; remembers which remote links serve a dashboard."""

    def __init__(self) -> None:
        self.dashboards: dict[str, bool] = {}  # a remote scheduler's link -> it serves a dashboard (asked once)

    def describe(self, client: Any, owned: bool, remote_env: Any = None) -> str:
        """The cluster behind ``client`` (``owned``: a LocalCluster we started; ``remote_env``:
        a remote cluster's RemoteEnvironment, described on a second line)."""
        try:
            workers = client.scheduler_info()["workers"]
        except Exception as exc:
            return f"dask: scheduler {client.scheduler.address} not answering ({type(exc).__name__})"
        threads = sorted({int(w.get("nthreads", 0)) for w in workers.values()})
        owner = "LocalCluster started by poolmagic" if owned else "cluster (not started by poolmagic)"
        link = dashboard_link(client)
        if link is None:
            board = "dashboard off (%poolsize --backend dask --dashboard)" if owned else "no dashboard"
        elif owned:  # without bokeh the page only says so; its other routes (logs, metrics) serve
            bokeh = "needs bokeh: pip install bokeh; " if importlib.util.find_spec("bokeh") is None else ""
            board = f"dashboard {link} ({bokeh}no password: anyone on this machine can open it)"
        elif self._serves(link):
            board = f"dashboard {link}"
        else:  # its HTTP server serves no dashboard (--no-dashboard, no bokeh there), or not to us
            board = "no dashboard"
        tls = " · TLS with a certificate of its own" if owned else ""
        text = (
            f"dask {owner}: scheduler {client.scheduler.address} · {_plural(len(workers), 'worker')}"
            + (f" × {_plural(threads[0], 'thread') if len(threads) == 1 else '/'.join(map(str, threads)) + ' threads'}"
               + (" (task slots; the cores are counted above)" if owned else " (task slots)") if threads else "")
            + f"{tls} · {board}"
        )
        return text if remote_env is None else f"{text}\n{remote_env.describe()}"

    def _serves(self, link: str) -> bool:
        """Whether a remote scheduler's ``link`` serves a dashboard (asked once per link)."""
        if link not in self.dashboards:
            self.dashboards[link] = serves_dashboard(link) is not False
        return self.dashboards[link]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
