"""The magics: ``%%poolmap``, ``%poolsize`` and ``%pooldebug``, and the state they keep.

No pool logic lives here; everything below ``Pool`` works without IPython.
``%%poolmap`` is four steps, each a function of its own: the line and cell
name a function and an ITERABLE (cellfunc.py), the cell runs and they become a
``MapRequest`` (maprequest.py), the API runs it, and the report is shown
(publish.py). ``%poolsize`` and ``%pooldebug`` are in modules of their own
(poolsize.py, pooldebug.py), loaded when first used; their help is here.
"""
from __future__ import annotations

import weakref
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand

from .api import get_pool
from .maphandle import MapHandle
from .errors import BadInputError
from .maprequest import MapRequest, build_request
from .options import POOLMAP_OPTIONS, POOLSIZE_OPTIONS, help_text
from .publish import LiveSummary, announce_async, live_display, show_summary

_POOLMAP_DOC = f"""Map a function over an iterable on a warm pool of worker processes.

Cell form -- the cell runs as a normal cell, then the top-level function it
defines (``def`` or ``name = lambda``) that none of its other functions calls
is mapped over ITERABLE (a ``work`` calling ``helper`` maps ``work``; when
several or none qualify, ``-f NAME`` says which)::

    %%poolmap [options] ITERABLE
    def work(x):
        return x * x

Line form -- map any callable expression::

    results = %poolmap [options] FUNC ITERABLE
    results = %poolmap -f partial(func, y=2) range(10)

ITERABLE is any Python expression, evaluated in the notebook
(``range(1, 10)``, ``zip(a, b)``, ``df.itertuples()``). Results come back as a
list in input order; the last run's report is ``_poolmap`` (``.results``,
``.errors``, ``.wall_s``, ``.speedup`` ...).

Options:
{help_text(POOLMAP_OPTIONS)}
"""

_POOLSIZE_DOC = f"""Show or set the pool's size: ``%poolsize``, ``%poolsize 4``, ``%poolsize auto``.

``auto`` means the cores this process may use (CPU affinity and cgroup quota).
A new size takes effect on the next map; the kernel is not restarted.

Options:
{help_text(POOLSIZE_OPTIONS)}
"""


_HIDE = "poolmagic: hide the cell's magic call in this traceback"


@magics_class
class PoolMagics(Magics):
    """``%%poolmap``, ``%poolsize`` and ``%pooldebug``; holds the extension's state."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self._runs: dict[tuple[str, str], Any] = {}  # (function, ITERABLE) -> its last report, for --resume
        self._async_jobs: weakref.WeakSet = weakref.WeakSet()  # --async maps (the backend holds those running)

    @property
    def pool(self):
        return get_pool()

    def _remember_run(self, key: tuple[str, str], report: Any) -> None:
        """The cell's last run, for --resume (a few cells: reports hold results)."""
        self._runs.pop(key, None)
        self._runs[key] = report
        while len(self._runs) > 8:
            del self._runs[next(iter(self._runs))]

    def _hide_cell_frame(self) -> None:
        """Start the traceback of a map's error at the user's own frames.

        Its first frame would be the cell's ``get_ipython().run_cell_magic(...)``
        line, the whole cell as a string. IPython hides frames whose locals hold
        ``__tracebackhide__``; the cell's locals are the namespace, so the flag
        is set there until this cell's traceback has been shown, then removed.
        A magic called outside a cell (a widget's callback) has no end of cell:
        the next cell's start removes it, or that cell's own frames would hide.
        """
        ns = self.shell.user_ns
        if "__tracebackhide__" in ns:
            return
        ns["__tracebackhide__"] = _HIDE

        def clear(*_: Any) -> None:
            if ns.get("__tracebackhide__") is _HIDE:
                del ns["__tracebackhide__"]
            for event in ("pre_run_cell", "post_run_cell"):
                try:
                    self.shell.events.unregister(event, clear)
                except ValueError:
                    pass

        self.shell.events.register("pre_run_cell", clear)
        self.shell.events.register("post_run_cell", clear)

    def _in_kernel(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None

    # ------------------------------------------------------------ %%poolmap
    def poolmap(self, line: str, cell: str | None = None) -> Any:
        __tracebackhide__ = True
        # A trailing ';' silences a cell's value, as after any Python line: a %%poolmap
        # cell's list is not shown. (In the line form it ends the statement: ``r = %poolmap
        # f xs;`` binds r, and IPython shows a line magic's value whatever ends its line.)
        silenced = line.rstrip().endswith(";")
        if silenced:
            line = line.rstrip()[:-1]
        request = build_request(self.shell, self._runs, line, cell)
        if request.background:
            handle = self._start_async(request)
            return None if silenced and cell is not None else handle
        results = self._run(request).results
        if request.out:
            self.shell.user_ns[request.out] = results
            return None
        return None if silenced and cell is not None else results

    poolmap.__doc__ = _POOLMAP_DOC
    # The line is Python code (ITERABLE, -f, --kw) and paths (--checkpoint): IPython
    # must not expand {x} or $x in it first, as for %time and %timeit.
    poolmap = line_cell_magic(no_var_expand(poolmap))

    def _run(self, req: MapRequest) -> Any:
        """Run the map through the API, bind ``_poolmap``, show its one card; the report."""
        __tracebackhide__ = True
        pool = self.pool
        before = pool.last_report
        watch = live_display(self.shell, req.quiet, req.progress)
        report = None
        try:
            report = pool.run(req.func, req.iterable, watch=watch, **req.options)
        except BadInputError as exc:
            raise UsageError(str(exc)) from None
        except BaseException:  # an interrupt's traceback too
            self._hide_cell_frame()
            raise
        finally:
            last = pool.last_report
            if last is not None and last is not before:  # this cell's map started
                self.shell.user_ns["_poolmap"] = last
                self._remember_run(req.key, last)
                if report is None and last.status != "running" and not req.quiet:
                    show_summary(self.shell, last, watch)  # a failed or interrupted map's card
        if not req.quiet:
            show_summary(self.shell, report, watch)
        return report

    def _start_async(self, req: MapRequest) -> MapHandle | None:
        """``--async``: start the map, bind its handle, show a card that follows it."""
        __tracebackhide__ = True
        live = LiveSummary() if not req.quiet and self._in_kernel() else None
        try:
            handle = self.pool.map_async(req.func, req.iterable, watch=live, **req.options)
        except BadInputError as exc:
            raise UsageError(str(exc)) from None
        except Exception:
            self._hide_cell_frame()
            raise
        self._async_jobs.add(handle._job)
        self.shell.user_ns["_poolmap"] = handle.report
        self._remember_run(req.key, handle.report)
        if req.out:
            self.shell.user_ns[req.out] = handle
        if live is not None:
            live.follow(handle, live.show(handle))
            handle.followed = "card"  # displayed while it runs, the handle points at this card
        elif req.quiet:
            handle.followed = "quiet"  # -q: the cell's value is no card either
        else:
            announce_async(handle, handle.report.func_name)
        return None if req.out else handle

    # ------------------------------------------------------------ %pooldebug
    @line_magic
    def pooldebug(self, line: str) -> None:
        """Re-run the last map's first failed item (or item N) here, and debug it.

        ``%pooldebug`` or ``%pooldebug 9123``: the item runs in this kernel with
        the same function version, item, keyword constants and seed as in the
        map, and IPython's debugger opens where it raised (post-mortem).

        An item that crashed its worker, was stopped for its memory or timed
        out is not run here: it could end or stall the kernel the same way.
        ``%pooldebug --force N`` runs it anyway (a timed-out one under the
        map's timeout).
        """
        from .pooldebug import run_pooldebug

        return run_pooldebug(self.shell, line)

    # ------------------------------------------------------------ %poolsize
    def poolsize(self, line: str) -> Any:
        from .poolsize import run_poolsize

        return run_poolsize(self.shell, self._async_jobs, line)

    poolsize.__doc__ = _POOLSIZE_DOC
    poolsize = line_magic(poolsize)
