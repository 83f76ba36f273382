"""RunReport: what one map produced and where its time went.

Bound to ``_poolmap`` after every ``%%poolmap`` and carried by every error a map
raises, so that nothing a map computed is ever lost. It records a line per
chunk (worker id, first item, count, start/end on the system-wide monotonic
clock, per-item times when items are slow enough to time cheaply): enough for
a per-worker timeline, progress and efficiency diagnosis, from any backend.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .diagnose import Analysis
    from .timeline import Timeline


from .engine.core.events import ChunkRecord  # noqa: F401  (re-exported)
from .engine.core.record import FAILED_KEPT, MapRecord  # noqa: F401  (FAILED_KEPT: re-exported)
from .sentinel import NOT_DONE  # noqa: F401  (re-exported: results hold it)


@dataclass
class RunReport(MapRecord):
    """Results in input order, errors by index, and timing of one map.

    The engine's record (MapRecord: results, errors, chunks, output, status)
    with what the user reads: the function and pool, figures, a timeline,
    ``rerun()``, and the words that say where a notebook keeps things.
    """

    func_name: str = "?"
    cores: int = 1
    pool_size: int = 1
    backend: str = "local"
    threads: int | None = None  # native threads per worker
    resumed: tuple[int, int] | None = None  # (kept, run) when this run resumed an earlier one
    replay: Any = field(default=None, repr=False)  # (function, options, items or None) for rerun()
    serial_item_s: float | None = None  # one worker's measured time per item (--tune), if known
    identity: Any = field(default=None, repr=False)  # the items' keys, for --resume (seenitems.SeenItems)
    older: list = field(default_factory=list, repr=False)  # items whose kept results an earlier version computed
    kw_older: list = field(default_factory=list, repr=False)  # items whose kept results other --kw values computed
    kw_keys: dict | None = field(default=None, repr=False)  # each --kw value's key when mapped (versions.py)
    kw_kept: dict = field(default_factory=dict, repr=False)  # the small --kw values' pickles, for rerun()

    # ---------------------------------------------------------------- words
    def where_attempts(self, index: int | str) -> str:
        return f"_poolmap.attempts[{index}]"

    def where_results(self) -> str:
        return "_poolmap.results (or .report.results)"

    def how_to_star(self) -> str:
        return "--star (star=True)"

    # ---------------------------------------------------------------- figures
    @property
    def wall_s(self) -> float:
        end = self.t_end if self.t_end is not None else time.perf_counter()
        return max(end - self.t_start, 1e-9)

    @property
    def busy_s(self) -> float:
        """Seconds spent inside the function, summed over workers."""
        return sum(c.t1 - c.t0 for c in self.chunks)

    @property
    def speedup(self) -> float:
        """Estimated gain over a plain loop: the serial time of the items ÷ the wall time.

        The one figure the summary and ``--tune`` show (diagnose.py says how it is
        estimated): per-chunk time in the function less time waiting for a CPU;
        the low end when native threads make it a range; ``nan`` when the
        estimate failed (it would exceed the cores for CPU-bound work).
        """
        return self.analysis().speedup

    def analysis(self, all_findings: bool = False) -> "Analysis":
        """Where the time went and, when parallelism did not pay, why (diagnose.py).

        Computed once for a finished map (its summary shows it as text and HTML).
        Maps under 0.1 s get no findings unless ``all_findings``.
        """
        cached = self.__dict__.get("_analysis")
        if cached is not None and not all_findings:
            return cached
        from .diagnose import analyse

        a = analyse(self, self.serial_item_s, self.threads, all_findings=all_findings)
        if self.status != "running" and not all_findings:
            self.__dict__["_analysis"] = a
        return a

    @property
    def timeline(self) -> "Timeline":
        """The chunks per worker: ``.rows``, ``.to_frame()``; text bars or SVG when shown."""
        from .timeline import Timeline

        return Timeline(self)

    @property
    def workers(self) -> int:
        """Distinct workers that ran at least one chunk (a chunk their death or a kill ended too)."""
        return len({c.worker for c in self.chunks} | self.lost_on)

    @property
    def failed(self) -> int:
        return len(self.errors)

    def item_times(self) -> list[float | None]:
        """Seconds per item: measured when timed, else the chunk's average."""
        n = len(self.results)
        out: list[float | None] = [None] * n
        for c in self.chunks:
            if c.item_times is not None:
                out[c.start : c.start + len(c.item_times)] = c.item_times
            elif c.count:
                out[c.start : c.start + c.count] = [(c.t1 - c.t0) / c.count] * c.count
        return out

    def rerun(self, index: int | None = None, *, force: bool = False) -> Any:
        """Run one item again here, in this process: the first failed one, or ``index``.

        Same function version, item, keyword constants and seed as in the map;
        an exception is raised here, where a debugger can inspect it
        (``%pooldebug`` does exactly that). An item that crashed its worker, was
        stopped for its memory or timed out is not run here (it could end or
        stall this process the same way) unless ``force``; a timed-out item then
        runs under the map's timeout.
        """
        __tracebackhide__ = True
        from .errors import BadInputError, ItemTimeoutError

        if self.replay is None:
            raise BadInputError("this report has nothing to re-run (it was not made by a map)")
        func, options, items = self.replay
        if index is None:
            if not self.errors:
                raise BadInputError("the last map had no failure: give an item's index to re-run it")
            index = min(self.errors)
        n = self.items if self.items is not None else len(self.results)
        if not isinstance(index, int) or not 0 <= index < n:
            raise BadInputError(f"there is no item {index!r}: the map had {n:,} items (0–{n - 1:,})")
        if index in self.failed_items:
            value = self.failed_items[index]
        elif items is not None:
            value = items[index]
        else:
            raise BadInputError(
                f"item {index} is no longer available: the ITERABLE was a stream, consumed by the map. "
                f"The values of the first {FAILED_KEPT} failed items are kept; re-run the map over a list to get any item."
            )
        unsafe = self.unsafe_failure(index)
        if unsafe is not None and not force:
            raise BadInputError(self._not_rerun(index, unsafe))
        limit = options.timeout if isinstance(unsafe, ItemTimeoutError) else None
        if not force:
            self._same_version(func, options.kwargs, index)
        if options.kwargs:
            func = self._as_mapped(func, options.kwargs, index, force)
        if options.seed is not None:
            from .engine import seeds

            saved = seeds.save_streams()  # the kernel's own, put back after
            seeds.seed_item(options.seed, index)  # the numbers item ``index`` drew in its worker
        try:
            with time_limit(limit, index):
                return func(*value) if options.star else func(value)
        finally:
            if options.seed is not None:
                seeds.clear()
                seeds.restore_streams(saved)

    def _same_version(self, func: Any, kwargs: dict | None, index: int) -> None:
        """Refuse to re-run ``func`` when a global or helper it reads changed since the map (in place,
        or bound anew): it would run another version than the workers did, and a debugger would show
        an item they never ran (one that no longer fails, or fails otherwise). Known for maps that
        ended with items missing (their function's key is taken then)."""
        was = getattr(self.identity, "code", None)
        if was is None:
            return
        from .seenitems import mapped_code_key

        if mapped_code_key(func, kwargs) in (was, None):
            return
        from .errors import BadInputError

        raise BadInputError(
            f"item {index} was not re-run: a global or helper the function reads changed since the map, so "
            f"here it would run another version than the workers did. Map it again to debug it, or "
            f"%pooldebug --force {index} (report.rerun({index}, force=True)) runs it as it is now")

    def _as_mapped(self, func: Any, kwargs: dict, index: int, force: bool) -> Any:
        """``func`` with the --kw values the workers got: a value changed in place since the map
        is re-run as it was (its pickle is kept up to 1 MB); a bigger one is refused unless ``force``."""
        import functools

        from .checks import NoArgs
        from .versions import changed_kw, kw_keys, kw_values, kw_words

        changed = changed_kw(self.kw_keys, kw_keys(kwargs, like=self.kw_keys))
        if not changed:
            return func
        lost = [n for n in changed if n not in self.kw_kept]
        if lost and not force:
            from .errors import BadInputError

            raise BadInputError(
                f"item {index} was not re-run: {kw_words(lost)} changed since the map (changed in place), and "
                f"its value as the workers got it was too big to keep; here it would run with the new value. "
                f"Map it again to debug it, or %pooldebug --force {index} (report.rerun({index}, force=True)) "
                f"runs it with the value as it is now")
        values = {**kwargs, **kw_values(self.kw_kept, [n for n in changed if n in self.kw_kept])}
        wrapped = isinstance(func, NoArgs)
        inner = func.func if wrapped else func
        inner = functools.partial(inner.func, *inner.args, **values)
        return NoArgs(inner) if wrapped else inner

    def unsafe_failure(self, index: int) -> BaseException | None:
        """The error that makes item ``index`` unsafe to run in this process, if any.

        A crash of its worker, a stop for memory or a timeout, in any attempt.
        """
        from .errors import ItemTimeoutError, WorkerCrashedError, WorkerMemoryError

        kinds = (WorkerCrashedError, WorkerMemoryError, ItemTimeoutError)
        errors = [*self.attempts.get(index, ()), self.errors.get(index)]
        return next((e for e in reversed(errors) if isinstance(e, kinds)), None)

    def _not_rerun(self, index: int, exc: BaseException) -> str:
        from .errors import ItemTimeoutError, WorkerMemoryError, exit_description

        if isinstance(exc, ItemTimeoutError):
            what = (f"ran longer than the {exc.timeout:g} s timeout in the map, and its worker was stopped: "
                    f"here it would hold this kernel as long")
            forced = "runs it here under the same timeout"
        elif isinstance(exc, WorkerMemoryError):
            limit = f" (limit {exc.limit / 2**20:,.0f} MB)" if exc.limit else ""
            what = (f"was stopped for its memory in the map, at {exc.rss / 2**20:,.0f} MB{limit}: "
                    f"here it would take that memory from this kernel")
            forced = "runs it here anyway, with no memory limit"
        else:
            code = getattr(exc, "exitcode", None)
            what = (f"crashed its worker in the map ({exit_description(code)}): here it could end "
                    f"this kernel the same way")
            forced = "runs it here anyway"
        others = [i for i in sorted(self.errors) if self.unsafe_failure(i) is None]
        hint = f"; item {others[0]} raised an exception you can debug: %pooldebug {others[0]}" if others else ""
        return (f"item {index} was not re-run: it {what}. %pooldebug --force {index} "
                f"(report.rerun({index}, force=True)) {forced}{hint}")

    # ---------------------------------------------------------------- display
    def summary(self) -> str:
        from .display import summary_text

        return summary_text(self)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.summary())

    def _repr_html_(self) -> str:
        from .display import summary_html

        return summary_html(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from .display import summary_bundle

        return summary_bundle(self)


@contextmanager
def time_limit(seconds: float | None, index: int) -> Iterator[None]:
    """Raise ItemTimeoutError in the code run inside if it runs longer than ``seconds``.

    SIGALRM on the main thread: it interrupts Python code and blocking calls
    (sleep, reads) alike, and nothing is left running afterwards (a watchdog
    thread's asynchronous exception would wait for the next bytecode, never
    interrupting a blocking call). Elsewhere, refused rather than unbounded.
    """
    if seconds is None:
        yield
        return
    from .errors import BadInputError, ItemTimeoutError

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        raise BadInputError(
            f"item {index} timed out in the map; re-running it under its timeout needs the main thread "
            f"of a Unix process (SIGALRM)"
        )
    armed = True

    def on_alarm(signum: int, frame: Any) -> None:
        if armed:
            raise ItemTimeoutError(f"item {index} ran longer than the {seconds:g} s timeout here too "
                                   f"(as in the map)", index, seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
        armed = False
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
