"""``%%poolmap``'s line and cell made a ``MapRequest``: what to call the API with.

The line is parsed and checked (options.py, cellfunc.py), the cell runs as an
ordinary cell, then what the line names is evaluated in the notebook: the
function, the ITERABLE, ``--kw`` values, ``--retry-on`` classes and the
earlier run ``--resume`` continues. Every mistake in the line is a UsageError
before the cell runs.
"""
from __future__ import annotations

import linecache
from typing import Any, NamedTuple

from IPython.core.error import UsageError

from .cellfunc import Target, options_after, read_line
from .checks import check_not_text
from .errors import BadInputError
from .options import MAP_OPTIONS, POOLMAP_OPTIONS, parse


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


def build_request(shell: Any, runs: dict, line: str, cell: str | None) -> MapRequest:
    """Check the line, run the cell, evaluate what the line names: the map to run.

    ``runs``: each cell's last report, by (function, ITERABLE), for ``--resume``.
    """
    __tracebackhide__ = True
    parsed = parse(line, POOLMAP_OPTIONS)
    o = parsed.opts
    target = read_line(shell, o, parsed.rest, line, cell)
    if cell is not None:
        _run_cell(shell, cell, target.transformed)
    func = _function(shell, target)
    try:
        iterable = evaluate(shell, target.expr, "ITERABLE", target.iter_code) if target.expr else None
    except UsageError as exc:
        hint = options_after(line, parsed.rest, "%poolmap" if cell is None else "%%poolmap")
        raise UsageError(f"{exc} {hint}".rstrip()) from None
    try:
        check_not_text(iterable, target.expr)
    except BadInputError as exc:
        raise UsageError(str(exc)) from None
    options = {opt.dest: o[opt.dest] for opt in MAP_OPTIONS if opt.dest in o}
    if "kwargs" in options:
        options["kwargs"] = {k: evaluate(shell, v, f"--kw {k}") for k, v in options["kwargs"].items()}
    if "retry_on" in options:
        options["retry_on"] = _exception_types(shell, options["retry_on"])
    if o.get("resume"):
        options["resume"] = _earlier_run(runs, target)
    return MapRequest(func, iterable, options, target.key, o.get("out"), bool(o.get("quiet")),
                      not o.get("no_progress"), bool(o.get("async_")))


def evaluate(shell: Any, expr: str, what: str, code: Any = None) -> Any:
    """``expr`` (or its compiled ``code``) evaluated in the notebook; a UsageError naming ``what`` if it fails."""
    __tracebackhide__ = True
    try:
        return eval(code or expr, shell.user_global_ns, shell.user_ns)
    except NameError as exc:
        raise UsageError(f"{what} `{expr}` cannot be evaluated: {exc}") from None
    except Exception as exc:
        raise UsageError(f"{what} `{expr}` raised {type(exc).__name__}: {exc}") from None


def _exception_types(shell: Any, names: str) -> tuple:
    """``ConnectionError,TimeoutError`` -> the classes, looked up in the notebook."""
    out = []
    for name in (n.strip() for n in names.split(",")):
        cls = evaluate(shell, name, "--retry-on") if name else None
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise UsageError(f"--retry-on takes exception classes, e.g. ConnectionError; {name!r} is not one")
        out.append(cls)
    return tuple(out)


def _run_cell(shell: Any, cell: str, transformed: str) -> None:
    """Run the cell as an ordinary cell: same namespace, tracebacks with its lines."""
    __tracebackhide__ = True
    # the number of the cell now running (IPython has already counted it)
    running = getattr(shell.displayhook, "exec_result", None)
    number = running.execution_count if running is not None else shell.execution_count
    exec(_compiled(shell.compile, cell, transformed, number), shell.user_global_ns, shell.user_ns)


_last_compiled: tuple = ()  # (compiler, key, filename, code): the cell compiled last


def _compiled(compiler: Any, cell: str, transformed: str, number: int) -> Any:
    """The cell's code object, registered with IPython for its tracebacks.

    A cell that runs the magic again (a loop, ``%timeit``) gets the code it got
    last time: IPython's name for it (ipykernel hashes the source in Python)
    and ``compile`` were most of a small map's magic overhead. Reused only for
    the same source, cell number and ``__future__`` flags, while IPython's
    line cache still holds the source, so tracebacks are the same.
    """
    global _last_compiled
    key = (cell, transformed, number, compiler.flags)
    if _last_compiled and _last_compiled[0] is compiler and _last_compiled[1] == key \
            and _last_compiled[2] in linecache.cache:
        return _last_compiled[3]
    filename = compiler.cache(transformed, number, raw_code=cell)
    code = compiler(transformed, filename, "exec")
    _last_compiled = (compiler, key, filename, code)
    return code


def _function(shell: Any, target: Target) -> Any:
    """The callable to map: ``-f FUNC`` evaluated, or the function the cell defined."""
    if target.func_expr is None:
        if target.fname not in shell.user_ns:  # the cell ran `del work`: the loop's NameError
            raise UsageError(f"the cell defines {target.fname}(), but once it ran the name "
                             f"'{target.fname}' is not defined")
        return shell.user_ns[target.fname]
    func = evaluate(shell, target.func_expr, "-f")
    if not callable(func):
        raise UsageError(f"-f {target.func_expr} is not callable (it is a {type(func).__name__})")
    return func


def _earlier_run(runs: dict, target: Target) -> Any:
    """The report ``--resume`` continues: this cell's last run in this kernel."""
    earlier = runs.get(target.key)
    if earlier is None:
        raise UsageError(
            f"nothing to resume: this cell (function {target.key[0] or '?'}, ITERABLE {target.expr or '-'}) "
            f"has not run in this kernel; run it without --resume first"
        )
    return earlier
