"""Parse a magic line: options first, then a Python expression kept whole.

IPython's ``parse_argstring`` splits on spaces, which breaks ``range(1, 10)``
or ``zip(a, b)``. Here options are read from the left; the first token that is
not an option starts the expression, which is returned untouched. Option
values that open a bracket run until it closes (``--kw y=[1, 2]``).

The map options themselves (``--timeout``, ``--seed`` ...) are not listed
here: they are MapOptions's fields (engine/mapoptions.py), each declaring its
spelling and help. The table built below is also what ``%%poolmap?`` and the
README show, so help, parser and options cannot drift apart.
"""
from __future__ import annotations

import functools
import keyword
import re
from typing import Any, NamedTuple

from IPython.core.error import UsageError

from .engine.mapoptions import cli_fields
from .engine.memory import parse_size


class Opt(NamedTuple):
    """One option of a magic: its spellings, where its value goes, its kind and help."""

    names: tuple[str, ...]
    dest: str
    kind: str  # "flag", "int", "float", "name", "expr", "kw", "text" (a path or address: quotes optional)
    help: str
    metavar: str = ""


# Options of the magic itself: where results go, which function, how to show it.
MAGIC_OPTIONS: tuple[Opt, ...] = (
    Opt(("-o", "--out"), "out", "name", "bind the result list to NAME (else it is the cell's value)", "NAME"),
    Opt(("-f", "--func"), "func", "expr", "map this callable, not the function of the cell that its other functions do not call", "FUNC"),
    Opt(("-q", "--quiet"), "quiet", "flag", "show neither progress nor summary"),
    Opt(("--no-progress",), "no_progress", "flag", "no live progress bar (shown for maps longer than 0.5 s)"),
    Opt(("--async",), "async_", "flag", "return a handle at once (.ready() .wait() .get() .cancel()); use with -o"),
    Opt(("--resume",), "resume", "flag", "run only the items this cell's last run left unfinished, keep the rest"),
)


def _kind(annotation: str, declared: str) -> str:
    if declared:
        return declared
    for word in ("bool", "float", "int"):
        if word in annotation:
            return {"bool": "flag", "float": "float", "int": "int"}[word]
    return "expr"


MAP_OPTIONS: tuple[Opt, ...] = tuple(
    Opt(f.metadata["names"], f.name, _kind(str(f.type), f.metadata["kind"]), f.metadata["help"], f.metadata["metavar"])
    for f in cli_fields()
)
POOLMAP_OPTIONS: tuple[Opt, ...] = MAGIC_OPTIONS + MAP_OPTIONS

POOLSIZE_OPTIONS: tuple[Opt, ...] = (
    Opt(("--tune",), "tune", "flag", "time the last mapped function at 1, 2, 4, ... workers and keep the best"),
    Opt(("--budget",), "budget", "float", "time budget of --tune in seconds (default 10)", "SECONDS"),
    Opt(("--shutdown",), "shutdown", "flag", "stop the pool's workers now (it restarts on next use)"),
    Opt(("--threads",), "threads", "int", "native threads (BLAS, OpenMP) per worker for every map; 'auto': cores ÷ workers", "N"),
    Opt(("--max-memory",), "max_memory", "size", "stop a worker whose memory passes SIZE, for every map; 'off' to clear", "SIZE"),
    Opt(("--backend",), "backend", "name", "where maps run: 'local' processes, 'threads' of this process (maps that wait), or 'dask' (a LocalCluster of the pool's size, or --address)", "NAME"),
    Opt(("--address",), "address", "text", "with --backend dask: the scheduler of a running cluster, e.g. tcp://host:8786", "ADDR"),
    Opt(("--dashboard",), "dashboard", "flag", "with --backend dask: the LocalCluster serves dask's dashboard (127.0.0.1, no password)"),
)


class Parsed(NamedTuple):
    """A parsed line: the options by ``dest``, and the expression after them."""

    opts: dict[str, Any]
    rest: str


_BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _scan(s: str) -> tuple[int, str | None]:
    """(brackets left open, the quote left open or None) at the end of ``s``."""
    depth = 0
    quote = None
    escaped = False
    for ch in s:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in _BRACKETS:
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth, quote


def _take_value(line: str, pos: int, opt: str) -> tuple[str, int]:
    """Next whitespace-separated token from ``pos``, extended until brackets balance and quotes close
    (``--kw sep=', '``, ``--checkpoint "run 1.ck"``)."""
    m = re.compile(r"\s*(\S+)").match(line, pos)
    if not m:
        raise UsageError(f"option {opt} needs a value")
    value, end = m.group(1), m.end()
    depth, quote = _scan(value)
    while depth > 0 or quote:
        m2 = re.compile(r"(\s*)(\S+)").match(line, end)
        if not m2:
            what = "an unclosed quote" if quote else "an unclosed bracket"
            raise UsageError(f"the value of {opt} has {what}: {value!r}")
        value += m2.group(1) + m2.group(2)
        end = m2.end()
        depth, quote = _scan(value)
    return value, end


_COMMENT = re.compile(r"(^|\s)#.*$", re.S)


def strip_comment(line: str) -> str:
    """``%poolsize 8  # the downloads wait`` -> ``8``: a comment, as Python reads one.

    For the lines that hold no Python (``%poolsize``, ``%pooldebug``); a
    ``%%poolmap`` line's ITERABLE is Python, which reads its own comments.
    """
    return _COMMENT.sub("", line).strip()


def parse(line: str, table: tuple[Opt, ...]) -> Parsed:
    """Split ``line`` into options (by ``table``) and the remaining expression.

    A re-run cell parses the same line again: the result is cached, and each
    caller gets its own copy of the options.
    """
    parsed = _parse(line, table)
    return Parsed(dict(parsed.opts), parsed.rest)


_TOKEN = re.compile(r"\s*(-{1,2}[A-Za-z][\w-]*)(=?)")


@functools.lru_cache(maxsize=256)
def _parse(line: str, table: tuple[Opt, ...]) -> Parsed:
    by_name = {n: o for o in table for n in o.names}
    opts: dict[str, Any] = {}
    pos = 0
    while True:
        m = _TOKEN.match(line, pos)
        if not m:
            break
        name = m.group(1)
        opt = by_name.get(name)
        if opt is None:
            names = [n for o in table for n in o.names]
            import difflib

            close = difflib.get_close_matches(name, [n for n in names if n.startswith("--")], n=2, cutoff=0.75)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UsageError(f"unknown option {name}{hint}; the options are: {', '.join(names)}")
        pos = m.end()
        if opt.kind == "flag":
            opts[opt.dest] = True
            continue
        raw, pos = _take_value(line, pos, name)
        opts[opt.dest] = _convert(opt, name, raw, opts.get(opt.dest))
    return Parsed(opts, line[pos:].strip())


def _convert(opt: Opt, name: str, raw: str, previous: Any) -> Any:
    """Syntax only: whether a value is allowed is MapOptions's to say (one place)."""
    if opt.kind == "int":
        if raw == "auto" and opt.dest == "threads":
            return "auto"
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise UsageError(f"{name} takes a whole number, not {raw!r}") from None
    if opt.kind == "size":
        if raw == "off":
            return "off"
        try:
            return parse_size(raw)
        except ValueError:
            raise UsageError(f"{name} takes a size such as 500MB or 4GB, not {raw!r}") from None
    if opt.kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise UsageError(f"{name} takes a number of seconds, not {raw!r}") from None
    if opt.kind == "name":
        if not raw.isidentifier() or keyword.iskeyword(raw):  # -o class: a name no cell could read
            raise UsageError(f"{name} takes a variable name, not {raw!r}")
        return raw
    if opt.kind == "text":  # literal, never expanded; quotes only delimit ("run 1.ck")
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return raw[1:-1]
        return raw
    if opt.kind == "kw":
        key, eq, expr = raw.partition("=")
        if not eq or not key.isidentifier() or not expr:
            raise UsageError(f"{name} takes NAME=EXPR, e.g. --kw y=2; got {raw!r}")
        kws = dict(previous or {})
        kws[key] = expr
        return kws
    return raw


def markdown_table(table: tuple[Opt, ...]) -> str:
    """The options as the README's Markdown table (a test keeps the README in step)."""
    rows = ["| option | what it does |", "|---|---|"]
    for o in table:
        left = ", ".join(o.names) + (f" {o.metavar}" if o.metavar else "")
        rows.append(f"| `{left}` | {o.help} |")
    return "\n".join(rows)


def help_text(table: tuple[Opt, ...]) -> str:
    """The options as an aligned table for the magic's docstring."""
    rows = []
    for o in table:
        left = ", ".join(o.names) + (f" {o.metavar}" if o.metavar else "")
        rows.append(f"  {left:<26} {o.help}")
    return "\n".join(rows)
