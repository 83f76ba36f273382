"""MapHandle: a map running in the background, as ``map_async`` and ``%%poolmap --async`` return it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .engine.core.job import Job
from .errors import add_note
from .maprun import finish_checkpoint
from .mpcompat import AsyncResult
from .report import RunReport

if TYPE_CHECKING:
    from .api import Pool


class MapHandle(AsyncResult):
    """A map running in the background (``map_async``, ``%%poolmap --async``).

    Also multiprocessing's AsyncResult: ``get(timeout)``, ``wait``, ``ready``,
    ``successful``, and the ``callback``/``error_callback`` given to ``map_async``.
    """

    def __init__(self, pool: "Pool", job: Job | None = None, **result_options: Any):
        super().__init__(callbacks=pool._callbacks, **result_options)
        self._pool = pool
        self._on_done: list[Callable[[], None]] = []  # called once, by the first wait()/get() that sees the end
        if job is not None:
            self.attach(job)

    @property
    def report(self) -> RunReport:
        return self._job.report

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True when the map has finished.

        Ctrl-C stops the wait, not the map: the KeyboardInterrupt says so, and
        how to stop it, instead of showing the frames of threading's lock.
        """
        __tracebackhide__ = True
        try:
            done = super().wait(timeout)
        except KeyboardInterrupt:
            if self.ready():
                raise
            r = self.report
            stop = KeyboardInterrupt()
            add_note(stop, f"poolmagic: interrupted the wait, not the map: {r.func_name}() goes on in the "
                           f"background ({r.done:,} of {f'{r.items:,}' if r.items is not None else '?'} "
                           f"items done); .cancel() stops it")
            raise stop from None
        while done and self._on_done:  # e.g. the notebook card redrawn in its final state, from this cell
            self._on_done.pop(0)()
        return done

    def _deliver(self) -> None:
        if not getattr(self, "_printed", False):
            super()._deliver()
            finish_checkpoint(self._job)

    def cancel(self) -> None:
        """Stop the map now; results that finished stay in ``.report.results``."""
        if not self.ready():
            self._pool.backend.cancel(self._job)

    def __repr__(self) -> str:
        return f"<MapHandle {self.report.summary()}>"

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        line = self._followed_now()
        if line is not None:
            import html

            return {"text/plain": line, "text/html": f"<code>{html.escape(line)}</code>"}
        return self.report._repr_mimebundle_()

    def _followed_now(self) -> str | None:
        """While a live card follows this map (``%%poolmap --async`` in a notebook): a line
        pointing at it, not a second card frozen at this moment (``0/4 items · workers
        starting`` left under the card that ends at ``4 items``); with ``-q``, no card at all."""
        shown = getattr(self, "followed", "")  # set by the magic: "card", "quiet" or ""
        if not shown or self.ready():
            return None
        from .style import call_name

        card = "its card follows it, " if shown == "card" else ""
        return (f"<MapHandle: {call_name(self.report.func_name)} runs in the background; {card}"
                f".get() waits for the results>")
