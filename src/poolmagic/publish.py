"""Showing poolmagic's displays in IPython: with iopub.py, the only modules that talk to ipykernel.

Rendering (display.py) makes the text and HTML; this publishes it, and knows
the kernel's internals that make that cheap (iopub.py builds the summary's
message itself).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any


def _streams_idle() -> bool:
    """True when ipykernel's stdout/stderr hold no text waiting to be sent."""
    for stream in (sys.stdout, sys.stderr):
        buffers = getattr(stream, "_buffers", None)
        if buffers is None:
            return False
        if any(buf.tell() for buf in list(buffers.values())):
            return False
    return True


def show(obj: Any, shell: Any) -> None:
    """Display a report: straight to the display publisher, flushing streams only if needed.

    ``display()`` runs every formatter and ipykernel flushes stdout and stderr
    before publishing, each flush a synchronous round trip to its I/O thread:
    together ~0.8 ms of a 4-item cell. The report's bundle is known, and the
    flushes only keep printed text ahead of the display, so they are skipped
    when no text is waiting. A terminal gets the text alone.
    """
    pub = getattr(shell, "display_pub", None)
    bundle = getattr(obj, "_repr_mimebundle_", None)
    if pub is None or bundle is None:
        from IPython.display import display

        display(obj)
        return
    if getattr(shell, "kernel", None) is None and hasattr(obj, "summary"):
        data = {"text/plain": obj.summary()}  # a terminal shows the text only: no HTML made for it
    else:
        data = bundle()
    if not hasattr(pub, "_flush_streams") or not _streams_idle():
        pub.publish(data=data, metadata={})
        return
    from .iopub import send_display

    if send_display(pub, data, _card_ends_cell(shell)):  # publish()'s message, built with less work (iopub.py)
        return
    pub._flush_streams = _no_flush
    try:
        pub.publish(data=data, metadata={})
    finally:
        del pub._flush_streams


def live_display(shell: Any, quiet: bool, progress: bool) -> "LiveProgress | None":
    """The display a blocking map gets while it runs: none with ``-q`` or ``--no-progress``."""
    return None if quiet or not progress else LiveProgress(shell)


def show_summary(shell: Any, report: Any, watch: "LiveProgress | None") -> None:
    """A map's summary, once: in place of its live card when it had one, else as a new output."""
    if watch is not None:
        watch.final(report)
    else:
        show(report, shell)


def show_bundle(data: dict, shell: Any) -> None:
    """Publish a ready MIME bundle (text and HTML) as one display."""
    from IPython.display import display

    display(data, raw=True)


def _no_flush() -> None:
    pass


def _card_ends_cell(shell: Any) -> bool:
    """Nothing of the running cell follows this card: the kernel's main thread runs a cell that is one
    ``%%poolmap`` (its body ran before the map), so ipykernel's end-of-cell flush can send the card."""
    if threading.current_thread() is not threading.main_thread():
        return False
    get_parent = getattr(shell, "get_parent", None)
    try:
        request = get_parent() if get_parent is not None else None
        if not request or request["header"]["msg_type"] != "execute_request":
            return False
        first = request["content"]["code"].split(None, 1)
        return bool(first) and first[0] == "%%poolmap"
    except (KeyError, TypeError, AttributeError):
        return False


class LiveProgress:
    """A map's one card: a live bar in its cell that becomes the summary in place.

    Fed by the map's events (a ``live.Progress`` observer) and drawn on the
    caller's thread at each tick of its wait: nothing shows for maps shorter
    than DELAY_S, so short cells cost nothing. In a notebook it is HTML (and
    text) published with a display id and updated through it: no widget model,
    so it works in JupyterLab, Notebook 7, VS Code, Colab and nbconvert alike,
    and a notebook executed headlessly keeps no widget state. When the map
    ends the same display becomes the summary (``final``): one card per map.
    In a terminal it is tqdm's text bar on stderr, erased when the map ends,
    where the summary line follows.
    """

    DELAY_S = 0.5
    EVERY_S = 0.2

    def __init__(self, shell: Any):
        self.shell = shell
        self.kernel = getattr(shell, "kernel", None) is not None
        self.progress: Any = None
        self.report: Any = None
        self._handle: Any = None
        self._bar: Any = None
        self._next = 0.0
        self._drawn: dict | None = None  # the bundle the live card shows now

    def attach(self, job: Any) -> None:
        from .live import Progress

        self.report = job.report
        self.progress = Progress(job.report.items, job.report.pool_size)
        job.observers.append(self.progress)

    def tick(self) -> None:
        p = self.progress
        if p is None or p.elapsed < self.DELAY_S:
            return
        now = p.elapsed
        if now < self._next:
            return
        self._next = now + self.EVERY_S
        if self._handle is None and self._bar is None:
            self._open()
        else:
            self._update()

    def _open(self) -> None:
        p = self.progress
        if self.kernel:
            from IPython.display import display

            self._handle = display(self._bundle(), raw=True, display_id=True)
        else:
            from tqdm import tqdm

            name = getattr(self.report, "func_name", None)
            from .style import call_name

            desc = f"poolmagic {call_name(name)}" if name else "poolmagic"
            self._bar = tqdm(total=p.total, desc=desc, unit=" items", leave=False, file=sys.stderr)
            self._started_with_the_map()
            self._update()

    def _bundle(self) -> dict:
        from .display import progress_html, progress_text, summary_bundle

        if self.report is not None and hasattr(self.report, "analysis"):
            return summary_bundle(self.report, self.progress)
        return {"text/plain": progress_text(self.progress), "text/html": progress_html(self.progress)}

    def _started_with_the_map(self) -> None:
        """tqdm times from its creation, 0.5 s in: make its clock start with the map."""
        bar = self._bar
        try:
            bar.start_t = bar._time() - self.progress.elapsed
            bar.last_print_t = bar.start_t
        except AttributeError:
            pass

    def _update(self) -> None:
        p = self.progress
        if self._bar is not None:
            self._bar.n = p.finished
            if p.total is None:
                self._bar.total = None
            post = [f"{p.failed:,} failed"] if p.failed else []
            post += [p.waiting] if p.waiting else []
            self._bar.set_postfix_str(" · ".join(post), refresh=False)
            self._bar.refresh()
        elif self._handle is not None:
            self._draw(self._bundle())

    def _draw(self, bundle: dict) -> None:
        """Update the live card, unless it already shows exactly this (one publish per state)."""
        if bundle != self._drawn:
            self._handle.update(bundle, raw=True)
            self._drawn = bundle

    def close(self) -> None:
        """The map ended: erase a terminal bar; turn a notebook bar into the summary."""
        if self._bar is not None:
            self._bar.n = self.progress.finished
            self._bar.close()
            self._bar = None
        if self._handle is not None:
            self._draw(self._bundle())

    def final(self, report: Any) -> None:
        """Show the map's summary: in place of the live bar when there was one, else as a new output."""
        if self._handle is not None:
            from .display import summary_bundle

            self._draw(summary_bundle(report))  # close() drew the same card, unless a note came since
        else:
            show(report, self.shell)


class LiveSummary:
    """An async map's card: live while it runs, final when it ends, in the cell that started it.

    A thread waits on the map's ``Progress.changed`` (set by events, never by
    polling the engine), redraws at most every EVERY_S, and draws the final
    card when the map ends. The final card is drawn again by the first
    ``.get()``/``.wait()`` that sees the end (``MapHandle._on_done``): a
    notebook executed headlessly is saved when its last cell ends, and the
    thread's last update may come after that.
    """

    EVERY_S = 0.25

    def __init__(self) -> None:
        self.progress: Any = None

    def attach(self, job: Any) -> None:
        from .live import Progress

        self.progress = Progress(job.report.items, job.report.pool_size, notify=True)
        job.observers.append(self.progress)

    def bundle(self, handle: Any) -> dict:
        from .display import summary_bundle

        return summary_bundle(handle.report, self.progress if not handle.ready() else None)

    def show(self, handle: Any) -> Any:
        """Display the card with a display id; returns the display handle."""
        from IPython.display import display

        dh = display(self.bundle(handle), raw=True, display_id=True)
        handle._on_done.append(lambda: dh.update(self.bundle(handle), raw=True))
        return dh

    def follow(self, handle: Any, display_handle: Any) -> threading.Thread:
        def run() -> None:
            p = self.progress
            changed = p.changed  # made by attach (notify=True)
            while p.status == "running":
                changed.wait()
                changed.clear()
                if p.status != "running":
                    break
                display_handle.update(self.bundle(handle), raw=True)
                time.sleep(self.EVERY_S)
            handle._job.wait(None, feed=False)
            display_handle.update(self.bundle(handle), raw=True)

        t = threading.Thread(target=run, daemon=True, name="poolmagic-live")
        t.start()
        return t


def announce_async(handle: Any, name: str) -> threading.Thread:
    """In a terminal: a line when an async map starts, and one (its summary) when it ends."""
    r = handle.report
    total = f"{r.items:,} items" if r.items is not None else "a stream of items"
    from .style import call_name

    print(f"poolmagic: {call_name(name)} started in the background · {total} on {r.pool_size} "
          f"worker{'s' if r.pool_size != 1 else ''} · .get() waits for the results", flush=True)

    def run() -> None:
        handle._job.wait(None, feed=False)
        print(f"\n{handle.report.summary().splitlines()[0]} (background map finished)", flush=True)

    t = threading.Thread(target=run, daemon=True, name="poolmagic-announce")
    t.start()
    return t
