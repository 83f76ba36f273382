"""The cell-to-function step of ``%%poolmap``: which function a cell maps, over what.

Everything here runs before the cell does and only reads the line and the
cell's text (parsed once and cached: re-running a cell is the common case), so
a wrong line is refused before any of the user's code runs. ``read_line``
gathers it into a ``Target``; the magic then runs the cell and evaluates it.
"""
from __future__ import annotations

import ast
import functools
import re
from typing import Any, NamedTuple

from IPython.core.error import UsageError

from .options import POOLMAP_OPTIONS, _scan

_IPYTHON_SYNTAX = re.compile(r"[%!?]|^(>>>|\.\.\.|In \[)", re.M)


def transform(shell: Any, cell: str) -> str:
    """IPython's transform_cell, skipped for a cell that has no IPython syntax.

    The transformer tokenizes the whole cell (~0.15 ms); a cell without magics,
    shell escapes, help marks, prompts or leading indentation comes out the same.
    """
    if cell and not cell[0].isspace() and not _IPYTHON_SYNTAX.search(cell):
        return cell if cell.endswith("\n") else cell + "\n"
    return shell.transform_cell(cell)


@functools.lru_cache(maxsize=128)
def cell_functions(transformed: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(functions the cell defines, those none of the others uses); None when it does not parse.

    Cached: re-running a cell is the common case, and parsing is ~20 µs of it.
    """
    try:
        tree = ast.parse(transformed)
    except SyntaxError:
        return None  # running the cell will report it as usual
    return uncalled_functions(tree)


@functools.lru_cache(maxsize=128)
def compile_iterable(expr: str) -> Any:
    return compile(expr, "<ITERABLE>", "eval")


def _top_level_functions(tree: ast.Module) -> dict[str, ast.AST]:
    """name -> node of each function a cell defines at top level (``def f``, ``f = lambda``), in order."""
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defs.pop(node.name, None)  # a redefinition counts where it is
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Lambda):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    defs.pop(t.id, None)
                    defs[t.id] = node.value
    return defs


def uncalled_functions(tree: ast.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The functions a cell defines at top level, and those no other of its functions uses.

    The second are what a cell may mean to map: ``main`` calling ``helper``
    leaves ``main``. A use is any mention of the name inside another function
    (body, decorators, defaults) or inside a class (methods, class body);
    statements at top level (``work(1)``, a quick check) do not count, nor
    does a function calling itself.
    """
    defs = _top_level_functions(tree)
    users: list[tuple[str | None, ast.AST]] = list(defs.items())
    users += [(None, n) for n in tree.body if isinstance(n, ast.ClassDef)]
    used: set[str] = set()
    for owner, node in users:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id != owner:
                used.add(n.id)
    return tuple(defs), tuple(name for name in defs if name not in used)


def mapped_function_name(found: tuple[tuple[str, ...], tuple[str, ...]] | None, line: str) -> str | None:
    """The function a cell maps, by the rule of ``uncalled_functions``; UsageError when it is not one.

    None when the cell does not parse (running it reports that).
    """
    if found is None:
        return None
    defined, candidates = found
    if not defined:
        raise UsageError(
            "the cell defines no function to map: define one at top level "
            "(def work(x): ... or work = lambda x: ...), or name one with -f NAME"
        )
    if len(candidates) == 1:
        return candidates[0]
    example = f"%%poolmap -f {(candidates or defined)[-1]} {line.strip()}".rstrip()
    if candidates:
        raise UsageError(
            f"the cell defines {len(candidates)} functions that none of its other functions calls "
            f"({', '.join(candidates)}), so which one to map is not clear: name it with -f NAME, e.g. {example}"
        )
    raise UsageError(
        f"every function the cell defines is called by another of them ({', '.join(defined)}), "
        f"so which one to map is not clear: name it with -f NAME, e.g. {example}"
    )


_OPTION_WORD = re.compile(r"\s(-{1,2}[A-Za-z][\w-]*)")


def options_after(line: str, rest: str, magic: str) -> str:
    """A hint when ``rest`` (what follows the options) has words that look like options; else "".

    Options come first on the line, so ``range(3) --timeout 3`` is all read as
    the ITERABLE, and its error (a syntax error, or ``range(3) -q`` raising
    TypeError) does not say why. Only asked once the expression has failed.
    """
    before = line.strip()[: len(line.strip()) - len(rest.strip())]  # the options
    for i, ch in enumerate(rest):
        if ch == "#" and _scan(rest[:i])[1] is None:  # a comment: ``range(N)  # -q later`` names no option
            rest = rest[:i]
            break
    for m in _OPTION_WORD.finditer(rest):
        head, tail = rest[: m.start()].strip(), rest[m.start():].strip()
        depth, quote = _scan(head)
        if depth > 0 or quote:
            continue  # inside brackets or a string: ``f(x, -y)`` is Python
        name = m.group(1)
        if name not in {n for o in POOLMAP_OPTIONS for n in o.names}:
            return f"({name} is no option of this magic, and options come before the ITERABLE)"
        return f"(options come before the ITERABLE: {name} follows it here; write {magic} {before}{tail} {head})"
    return ""


def split_func_and_iterable(rest: str) -> tuple[str, str]:
    """``"partial(f, y=2) range(1, 10)"`` -> ``("partial(f, y=2)", "range(1, 10)")``."""
    for i, ch in enumerate(rest):
        if ch.isspace():
            left, right = rest[:i].strip(), rest[i:].strip()
            if not left or not right:
                continue
            try:
                compile(left, "<FUNC>", "eval")
                compile(right, "<ITERABLE>", "eval")
            except SyntaxError:
                continue
            return left, right
    raise UsageError(
        "the line form needs a function and an ITERABLE: %poolmap FUNC ITERABLE "
        f"(or %poolmap -f FUNC ITERABLE); got {rest!r} {options_after(rest, rest, '%poolmap')}".rstrip()
    )


@functools.lru_cache(maxsize=128)
def check_func_expr(func_expr: str, after_f: bool) -> None:
    """A FUNC that is no Python expression is refused before the cell runs.

    ``-f lambda x: x + 1 range(3)`` gives -f only ``lambda``: say so.
    """
    try:
        compile(func_expr, "<FUNC>", "eval")
    except SyntaxError as exc:
        if after_f and re.match(r"lambda\b", func_expr):
            raise UsageError(
                "-f takes one expression without spaces, or in brackets: write a lambda in parentheses, "
                "e.g. -f (lambda x: x + 1) range(3), or define the function in the cell"
            ) from None
        raise UsageError(f"FUNC `{func_expr}` is not a Python expression: {exc.msg}") from None


class Target(NamedTuple):
    """What a ``%%poolmap`` line and cell name, checked before the cell runs.

    (A NamedTuple: made at import, a frozen dataclass costs ~0.6 ms of ``%load_ext``.)
    """

    func_expr: str | None  #: ``-f FUNC`` or the line form's FUNC; None: the cell's function
    fname: str | None  #: the cell's function (by the rule of ``uncalled_functions``), when no FUNC
    expr: str  #: the ITERABLE's source ("" with --repeat)
    iter_code: Any  #: the ITERABLE compiled, or None
    transformed: str  #: the cell as Python (IPython syntax transformed), "" for the line form

    @property
    def key(self) -> tuple[str, str]:
        """(function, ITERABLE): which earlier run ``--resume`` continues."""
        return (self.fname or self.func_expr or "", self.expr)


def read_line(shell: Any, opts: dict, rest: str, line: str, cell: str | None) -> Target:
    """The function and ITERABLE a line (its options ``opts``, the text after them ``rest``) names.

    Raises UsageError, before the cell runs, when they are missing or not Python.
    """
    func_expr, expr, fname = opts.get("func"), rest, None
    transformed = transform(shell, cell) if cell is not None else ""
    if cell is None:
        if func_expr is None:
            if opts.get("repeat") is not None:
                func_expr, expr = expr, ""
            else:
                func_expr, expr = split_func_and_iterable(expr)
    elif func_expr is None:
        fname = mapped_function_name(cell_functions(transformed), line)
    if func_expr is not None:
        check_func_expr(func_expr, opts.get("func") is not None)
    if opts.get("repeat") is not None and expr:
        raise UsageError("--repeat N calls a zero-argument function N times: give no ITERABLE")
    if opts.get("repeat") is None and not expr:
        raise UsageError("give an ITERABLE after the options, e.g. %%poolmap range(10)")
    iter_code = None
    if expr:
        try:
            iter_code = compile_iterable(expr)
        except SyntaxError as exc:
            raise UsageError(f"ITERABLE `{expr}` is not a Python expression: {exc.msg} "
                             f"{options_after(line, rest, '%poolmap' if cell is None else '%%poolmap')}".rstrip()
                             ) from None
    return Target(func_expr, fname, expr, iter_code, transformed)
