"""``%poolsize``: show or set the pool's size, backend, native threads and memory limit; ``--tune``.

The count and the options are checked before anything changes; a backend
switch (switch.py) and ``--tune`` (tune.py) load only when asked for. A change
that would pull the pool from under a map still running in the background is
refused, with what to do instead.
"""
from __future__ import annotations

from typing import Any, Iterable

from IPython.core.error import UsageError

from .api import get_pool, shutdown_pool
from .errors import BadInputError, PoolmapError
from .options import POOLSIZE_OPTIONS, parse, strip_comment
from .publish import show_bundle


def run_poolsize(shell: Any, async_jobs: Iterable, line: str) -> Any:
    """``%poolsize LINE`` (its help is the magic's docstring, magics.py); None, or ``--tune``'s result.

    ``async_jobs``: the ``--async`` maps the magics started; a change that
    would pull the pool from under one still running is refused.
    """
    parsed = parse(strip_comment(line), POOLSIZE_OPTIONS)
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
        _refuse_while_running(async_jobs, "--tune", "would time the function on the workers it runs on, "
                              "and resize the pool under it")
    if "backend" in o or "address" in o:
        from .switch import is_current

        if not is_current(get_pool(), o.get("backend"), o.get("address")):
            _refuse_while_running(async_jobs, "a backend switch", "would shut its pool down, and end it")
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
    pool = get_pool()  # the one the switch made, if any
    if o.get("tune"):
        from .tune import tune

        try:
            return tune(pool, budget=o.get("budget", 10.0))
        except BadInputError as exc:
            raise UsageError(str(exc)) from None
    if threads is not None:
        pool.threads = None if threads == "auto" else threads
    if "max_memory" in o:
        pool.max_memory = None if o["max_memory"] == "off" else o["max_memory"]
    if rest:
        if n is None:  # auto
            pool.resize(None)
        else:
            note = pool.size_note(n)
            if note:
                print(f"poolmagic: note: {note}")
            pool.resize(n, warn=False)
        pool.start()
    text = pool.status()
    if getattr(shell, "kernel", None) is not None and "http" in text:  # a dashboard: a link in a notebook
        from .display import status_html

        show_bundle({"text/plain": text, "text/html": status_html(text)}, shell)
    else:
        print(text)
    return None


def _refuse_while_running(async_jobs: Iterable, action: str, effect: str) -> None:
    """UsageError when a map still runs in the background (``--async``, ``map_async``).

    ``action`` would change the pool under it: say what, and how to go on.
    """
    jobs = [j for j in list(async_jobs) if not j.finished.is_set()]
    last = get_pool().last_job
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
