"""The magics: parse the line, run the cell, call the API, display the report.

No pool logic lives here; everything below ``Pool`` works without IPython.
``%%poolmap`` is four steps, each a function of its own: the line and cell
name a function and an ITERABLE (cellfunc.py), the cell runs and they become a
``MapRequest``, the API runs it, and the report is shown (publish.py).
"""
from __future__ import annotations

import os
import weakref
from typing import Any, NamedTuple

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand

from .api import MapHandle, get_pool, shutdown_pool
from .cellfunc import Target, read_line
from .checks import check_not_text
from .errors import BadInputError, PoolmapError
from .options import MAP_OPTIONS, POOLMAP_OPTIONS, POOLSIZE_OPTIONS, help_text, parse
from .publish import LiveSummary, announce_async, live_display, show_bundle, show_summary

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


_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_HIDE = "poolmagic: hide the cell's magic call in this traceback"


def _end_at_user_frames(tb: Any) -> None:
    """Cut poolmagic's own frames off the end of a traceback, so the debugger opens in the user's."""
    last_user = None
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_PKG_DIR):
            last_user = tb
        tb = tb.tb_next
    if last_user is not None:
        last_user.tb_next = None


@magics_class
class PoolMagics(Magics):
    """``%%poolmap`` and ``%poolsize``; holds the extension's state."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self._runs: dict[tuple[str, str], Any] = {}  # (function, ITERABLE) -> its last report, for --resume
        self._async_jobs: weakref.WeakSet = weakref.WeakSet()  # --async maps (the backend holds those running)

    @property
    def pool(self):
        return get_pool()

    # ------------------------------------------------------------ helpers
    def _eval(self, expr: str, what: str, code: Any = None) -> Any:
        __tracebackhide__ = True
        try:
            return eval(code or expr, self.shell.user_global_ns, self.shell.user_ns)
        except NameError as exc:
            raise UsageError(f"{what} `{expr}` cannot be evaluated: {exc}") from None
        except Exception as exc:
            raise UsageError(f"{what} `{expr}` raised {type(exc).__name__}: {exc}") from None

    def _exception_types(self, names: str) -> tuple:
        """``ConnectionError,TimeoutError`` -> the classes, looked up in the notebook."""
        out = []
        for name in (n.strip() for n in names.split(",")):
            cls = self._eval(name, "--retry-on") if name else None
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise UsageError(f"--retry-on takes exception classes, e.g. ConnectionError; {name!r} is not one")
            out.append(cls)
        return tuple(out)

    def _run_cell(self, cell: str, transformed: str) -> None:
        """Run the cell as an ordinary cell: same namespace, tracebacks with its lines."""
        __tracebackhide__ = True
        shell = self.shell
        # the number of the cell now running (IPython has already counted it)
        running = getattr(shell.displayhook, "exec_result", None)
        number = running.execution_count if running is not None else shell.execution_count
        filename = shell.compile.cache(transformed, number, raw_code=cell)
        code = shell.compile(transformed, filename, "exec")
        exec(code, shell.user_global_ns, shell.user_ns)

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
        """
        ns = self.shell.user_ns
        if "__tracebackhide__" in ns:
            return
        ns["__tracebackhide__"] = _HIDE

        def clear(*_: Any) -> None:
            if ns.get("__tracebackhide__") is _HIDE:
                del ns["__tracebackhide__"]
            try:
                self.shell.events.unregister("post_run_cell", clear)
            except ValueError:
                pass

        self.shell.events.register("post_run_cell", clear)

    def _refuse_while_running(self, action: str, effect: str) -> None:
        """UsageError when a map still runs in the background (``--async``, ``map_async``).

        ``action`` would change the pool under it: say what, and how to go on.
        """
        jobs = [j for j in list(self._async_jobs) if not j.finished.is_set()]
        last = self.pool.last_job
        if last is not None and not last.finished.is_set() and last not in jobs:
            jobs.append(last)
        if not jobs:
            return
        r = jobs[0].report
        what = f"{r.func_name}(), {r.done:,} of {f'{r.items:,}' if r.items is not None else '?'} items done"
        raise UsageError(
            f"{'a map is' if len(jobs) == 1 else f'{len(jobs)} maps are'} still running in the background "
            f"({what}): {action} {effect}. Wait for it (handle.wait() or handle.get()) or stop it "
            f"(handle.cancel()), then run this again"
        )

    def _in_kernel(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None

    # ------------------------------------------------------------ %%poolmap
    def poolmap(self, line: str, cell: str | None = None) -> Any:
        __tracebackhide__ = True
        request = self._request(line, cell)
        if request.background:
            return self._start_async(request)
        results = self._run(request).results
        if request.out:
            self.shell.user_ns[request.out] = results
            return None
        return results

    poolmap.__doc__ = _POOLMAP_DOC
    # The line is Python code (ITERABLE, -f, --kw) and paths (--checkpoint): IPython
    # must not expand {x} or $x in it first, as for %time and %timeit.
    poolmap = line_cell_magic(no_var_expand(poolmap))

    def _request(self, line: str, cell: str | None) -> "MapRequest":
        """Check the line, run the cell, evaluate what the line names: the map to run.

        Every mistake in the line is a UsageError before the cell runs.
        """
        __tracebackhide__ = True
        parsed = parse(line, POOLMAP_OPTIONS)
        o = parsed.opts
        target = read_line(self.shell, o, parsed.rest, line, cell)
        if cell is not None:
            self._run_cell(cell, target.transformed)
        func = self._function(target)
        iterable = self._eval(target.expr, "ITERABLE", target.iter_code) if target.expr else None
        try:
            check_not_text(iterable, target.expr)
        except BadInputError as exc:
            raise UsageError(str(exc)) from None
        options = {opt.dest: o[opt.dest] for opt in MAP_OPTIONS if opt.dest in o}
        if "kwargs" in options:
            options["kwargs"] = {k: self._eval(v, f"--kw {k}") for k, v in options["kwargs"].items()}
        if "retry_on" in options:
            options["retry_on"] = self._exception_types(options["retry_on"])
        if o.get("resume"):
            options["resume"] = self._earlier_run(target)
        return MapRequest(func, iterable, options, target.key, o.get("out"), bool(o.get("quiet")),
                          not o.get("no_progress"), bool(o.get("async_")))

    def _function(self, target: Target) -> Any:
        """The callable to map: ``-f FUNC`` evaluated, or the function the cell defined."""
        if target.func_expr is None:
            return self.shell.user_ns.get(target.fname)
        func = self._eval(target.func_expr, "-f")
        if not callable(func):
            raise UsageError(f"-f {target.func_expr} is not callable (it is a {type(func).__name__})")
        return func

    def _earlier_run(self, target: Target) -> Any:
        """The report ``--resume`` continues: this cell's last run in this kernel."""
        earlier = self._runs.get(target.key)
        if earlier is None:
            raise UsageError(
                f"nothing to resume: this cell (function {target.key[0] or '?'}, ITERABLE {target.expr or '-'}) "
                f"has not run in this kernel; run it without --resume first"
            )
        return earlier

    def _run(self, req: "MapRequest") -> Any:
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
        except Exception:
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

    def _start_async(self, req: "MapRequest") -> MapHandle | None:
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
        elif not req.quiet:
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
        report = self.shell.user_ns.get("_poolmap") or self.pool.last_report
        if report is None:
            raise UsageError("no map has run yet: %pooldebug re-runs an item of the last map")
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
            self.shell.showtraceback((type(exc), exc, tb))
            debugger = self.shell.debugger_cls()
            debugger.reset()  # as pdb.post_mortem does: quitting needs it
            debugger.interaction(None, tb)
            return None
        print(f"poolmagic: item {index if index is not None else min(report.errors)} ran without an error here")
        return None

    # ------------------------------------------------------------ %poolsize
    def poolsize(self, line: str) -> None:
        parsed = parse(line, POOLSIZE_OPTIONS)
        o, rest = parsed.opts, parsed.rest
        count, _, after = rest.partition(" ")
        if after.strip().startswith("-"):  # %poolsize 4 --backend dask: options after the count too
            more = parse(after, POOLSIZE_OPTIONS)
            o = {**o, **more.opts}
            rest = f"{count} {more.rest}".strip()  # anything else left is named by the error below
        n = None  # the count, checked (with --threads) before anything changes
        if rest and rest != "auto":
            try:
                n = int(rest)
            except ValueError:
                raise UsageError(
                    f"%poolsize takes a number of workers (a whole number ≥ 1) or 'auto', not {rest!r}"
                ) from None
            if n < 1:
                raise UsageError(f"%poolsize needs at least 1 worker, not {n}")
        threads = o.get("threads")
        if threads is not None and threads != "auto" and threads < 1:
            raise UsageError(f"--threads needs at least 1 thread per worker, not {threads}")
        if o.get("tune"):
            self._refuse_while_running("--tune", "would time the function on the workers it runs on, and "
                                       "resize the pool under it")
        if "backend" in o or "address" in o:
            from .switch import is_current

            if not is_current(self.pool, o.get("backend"), o.get("address")):
                self._refuse_while_running("a backend switch", "would shut its pool down, and end it")
        if o.get("shutdown"):
            shutdown_pool()
            print("poolmagic: pool shut down; a fresh one starts on the next map")
            return None
        if "backend" in o or "address" in o or o.get("dashboard"):
            from .switch import switch_backend

            try:
                switch_backend(o.get("backend") or ("dask" if o.get("dashboard") else None), o.get("address"),
                               size=n, dashboard=bool(o.get("dashboard")))
            except PoolmapError as exc:
                raise UsageError(str(exc)) from None
        if o.get("tune"):
            from .tune import tune

            try:
                return tune(self.pool, budget=o.get("budget", 10.0))
            except BadInputError as exc:
                raise UsageError(str(exc)) from None
        if threads is not None:
            self.pool.threads = None if threads == "auto" else threads
        if "max_memory" in o:
            self.pool.max_memory = None if o["max_memory"] == "off" else o["max_memory"]
        if rest:
            if n is None:  # auto
                self.pool.resize(None)
            else:
                note = self.pool.size_note(n)
                if note:
                    print(f"poolmagic: note: {note}")
                self.pool.resize(n, warn=False)
            self.pool.start()
        text = self.pool.status()
        if self._in_kernel() and "http" in text:  # a dashboard: a link in a notebook
            from .display import status_html

            show_bundle({"text/plain": text, "text/html": status_html(text)}, self.shell)
        else:
            print(text)
        return None

    poolsize.__doc__ = _POOLSIZE_DOC
    poolsize = line_magic(poolsize)


class MapRequest(NamedTuple):
    """One ``%%poolmap``, evaluated: what to call the API with, and what to do with its report."""

    func: Any
    iterable: Any
    options: dict  #: the API's keyword arguments (MapOptions's fields, ``resume``)
    key: tuple[str, str]  #: (function, ITERABLE), for a later ``--resume``
    out: str | None  #: ``-o NAME``
    quiet: bool  #: ``-q``: no card at all
    progress: bool  #: a live bar for a long map (not ``--no-progress``)
    background: bool  #: ``--async``
