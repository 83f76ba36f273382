"""Whether the kernel still runs what its local modules' files say.

A worker imports a local module (``mylib.py`` next to the notebook) from its
file; the kernel runs the copy it imported, perhaps hours ago. Edit the file
without reloading it and the two differ: a loop runs the kernel's copy, a new
worker (a replacement, a bigger pool, a worker recycled because the file
changed) runs the file. Reload it (``importlib.reload``, ``%autoreload``) and
the kernel runs the file while a warm worker may still hold the old copy.

Either way the map would silently disagree with the loop. This module tells
which: ``behind(mod)`` says how the kernel's copy differs from the file now,
comparing what compiling the file defines (its functions' and methods' code,
its literal constants) with what the kernel's module holds. A module an
import hook loaded (pytest's assertion rewriting, beartype's or jaxtyping's
hooks) runs code that compiling its file does not give: it is not compared. A file not
modified since the kernel started cannot differ; any other answer is computed
once per (file version, loaded copy). The backends then refuse a map that
would use a changed module the kernel has not reloaded (``refuse_behind``),
and the dask backend sends a reloaded one by value.
"""
from __future__ import annotations

import os
import sys
import types
from importlib.machinery import SourceFileLoader
from typing import Any, Iterable

from .engine.userfiles import is_user_file
from .errors import BadInputError

_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset)
_MARGIN_S = 2.0  # /proc's boot time is in whole seconds
_FUNCTION_FLAGS = 0x0001 | 0x0002  # CO_OPTIMIZED | CO_NEWLOCALS: a function's code, not a class body's

_answers: dict[tuple, str | None] = {}


def _kernel_started() -> float:
    """When this process started (seconds since the epoch), or 0 when that cannot be read."""
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return 0.0


STARTED = _kernel_started()


def _signature(code: types.CodeType) -> tuple:
    """What a code object does, without where it sits in its file (line numbers, file name)."""
    consts = tuple(_signature(c) if isinstance(c, types.CodeType) else (type(c).__name__, repr(c))
                   for c in code.co_consts)
    return (code.co_name, code.co_code, consts, code.co_names, code.co_varnames, code.co_freevars,
            code.co_cellvars, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)


def _file_defines(code: types.CodeType) -> tuple[dict[str, set], dict[str, Any], set[str]]:
    """From a module's compiled file: qualified name -> signatures of the functions defined there
    (top level and in classes), literal constants assigned at the top level, and top-level names."""
    defs: dict[str, set] = {}
    stack = [(code, "")]
    while stack:
        co, prefix = stack.pop()
        for c in co.co_consts:
            if not isinstance(c, types.CodeType) or c.co_name.startswith("<"):
                continue
            qual = prefix + c.co_name
            if c.co_flags & _FUNCTION_FLAGS == _FUNCTION_FLAGS:
                defs.setdefault(qual, set()).add(_signature(c))  # nested functions are in its signature
            else:  # a class body: its methods are named after it
                stack.append((c, qual + "."))
    import dis

    constants: dict[str, Any] = {}
    stores: dict[str, int] = {}  # how often the module's own code assigns each name
    names: set[str] = set()
    last = None
    for ins in dis.get_instructions(code):
        if ins.opname in ("DELETE_NAME", "DELETE_GLOBAL"):
            names.discard(ins.argval)
            constants.pop(ins.argval, None)
            for qual in [q for q in defs if q.partition(".")[0] == ins.argval]:
                del defs[qual]
        elif ins.opname in ("STORE_NAME", "STORE_GLOBAL"):
            stores[ins.argval] = stores.get(ins.argval, 0) + 1
            names.add(ins.argval)
            if last is not None and last.opname == "LOAD_CONST" and isinstance(last.argval, _CONSTANT_TYPES):
                constants[ins.argval] = last.argval
            else:
                constants.pop(ins.argval, None)
        last = ins
    # a constant counts only when the file sets it once and no function of it sets it again: with
    # ``try: import torch; HAS_TORCH = True / except ImportError: HAS_TORCH = False`` (or a
    # ``global`` in a function), the kernel's value is not the file's last literal
    changed = _globals_stored(code)
    constants = {k: v for k, v in constants.items() if stores.get(k) == 1 and k not in changed}
    return defs, constants, names


def _globals_stored(code: types.CodeType) -> set[str]:
    """Names the functions (and classes) defined in a module assign with ``global``."""
    import dis

    out: set[str] = set()
    stack = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    while stack:
        co = stack.pop()
        stack += [c for c in co.co_consts if isinstance(c, types.CodeType)]
        out.update(ins.argval for ins in dis.get_instructions(co) if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"))
    return out


def _unwrap(obj: Any) -> Any:
    for _ in range(20):
        inner = getattr(obj, "__wrapped__", None) if not isinstance(obj, type) else None
        if inner is None:
            return obj
        obj = inner
    return obj


def _kernel_defines(mod: types.ModuleType) -> dict[str, tuple]:
    """Qualified name -> signature of the functions the kernel's copy of ``mod`` defines itself."""
    out: dict[str, tuple] = {}
    name = mod.__name__

    def note(fn: Any) -> None:
        fn = _unwrap(fn)
        if isinstance(fn, (staticmethod, classmethod)):
            fn = _unwrap(fn.__func__)
        if isinstance(fn, property):
            for part in (fn.fget, fn.fset, fn.fdel):
                if part is not None:
                    note(part)
            return
        if isinstance(fn, types.FunctionType) and fn.__module__ == name and "<" not in fn.__qualname__:
            out[fn.__qualname__] = _signature(fn.__code__)

    for value in list(vars(mod).values()):
        if isinstance(value, type) and value.__module__ == name:
            for attr in list(vars(value).values()):
                note(attr)
        else:
            note(value)
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and (a == b or (a != a and b != b))
    except Exception:
        return True  # a value that cannot say: not the kind of constant this compares


def _parsed(path: str, st: os.stat_result) -> tuple | str:
    """What compiling the file defines (``_file_defines``), once per file version; or why it cannot."""
    key = (path, st.st_mtime_ns, st.st_size)
    got = _PARSED.get(key)
    if got is None:
        import tokenize

        try:
            with tokenize.open(path) as f:
                source = f.read()
            got = _file_defines(compile(source, path, "exec", dont_inherit=True))
        except (OSError, SyntaxError, ValueError) as exc:
            got = f"its file cannot be compiled now ({type(exc).__name__}: {exc})"
        if len(_PARSED) > 256:
            _PARSED.clear()
        _PARSED[key] = got
    return got


_PARSED: dict[tuple, Any] = {}


def _compare(mod: types.ModuleType, path: str) -> str | None:
    try:
        parsed = _parsed(path, os.stat(path))
    except OSError as exc:
        return f"its file cannot be read now ({exc})"
    if isinstance(parsed, str):
        return parsed
    defs, constants, _ = parsed  # a def gone from the file stays after a reload: not compared
    here = _kernel_defines(mod)
    for qual, sig in here.items():
        if qual in defs and sig not in defs[qual]:
            return f"{qual}() in the file differs from the one this kernel runs"
    for qual in defs:
        top = qual.partition(".")[0]
        if top not in vars(mod):
            return f"the file defines {top}, which this kernel's copy does not have"
    for key, value in constants.items():
        if key in vars(mod) and not _same(vars(mod)[key], value):
            return f"{key} is {value!r} in the file, {vars(mod)[key]!r} in this kernel"
    return None


def module_file(mod: Any) -> str | None:
    path = getattr(mod, "__file__", None)
    return path if isinstance(path, str) and path.endswith(".py") else None


def behind(mod: types.ModuleType, path: str | None = None) -> str | None:
    """How the kernel's copy of ``mod`` differs from its file now, or None when it does not.

    Cheap when the file was not modified since the kernel started (a stat);
    otherwise one compile per file version and loaded copy.
    """
    path = path or module_file(mod)
    if path is None or type(getattr(getattr(mod, "__spec__", None), "loader", None)) is not SourceFileLoader:
        return None  # an import hook's module (pytest's assertion rewriting, beartype's): not the file's code
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone: a worker cannot import it either
    if st.st_mtime < STARTED - _MARGIN_S:
        return None
    key = (path, st.st_mtime_ns, st.st_size, id(getattr(mod, "__spec__", None)), id(mod))
    if key not in _answers:
        if len(_answers) > 256:
            _answers.clear()
        _answers[key] = _compare(mod, path)
    return _answers[key]


def first_behind(names: Iterable[str]) -> tuple[str, str] | None:
    """The first of these loaded modules the kernel runs an older (or other) copy of, and how."""
    for name in names:
        mod = sys.modules.get(name)
        if mod is None or module_file(mod) is None:
            continue
        why = behind(mod)
        if why is not None:
            return name, why
    return None


def stale_message(name: str, why: str) -> str:
    path = module_file(sys.modules.get(name))
    return (f"the workers would import the module {name} from {path}, which differs from this kernel's copy: "
            f"{why}. A loop here runs the kernel's copy. If the file was edited, reload the module "
            f"(importlib.reload({name}), or %load_ext autoreload then %autoreload 2) or restart the kernel; if "
            f"the notebook set an attribute of {name}, pass that value to the function instead (the workers do "
            f"not see it). Then map again")


def refuse_behind(names: Iterable[str]) -> None:
    """Raise BadInputError, before any work, when a map would use a module the kernel has not reloaded."""
    found = first_behind(names)
    if found is not None:
        raise BadInputError(stale_message(*found))


def refuse_behind_if_used(names: Iterable[str], func: Any, items: Any) -> None:
    """``refuse_behind`` for the modules among ``names`` that ``func`` uses (looked for only when one is behind)."""
    names = list(names)
    if first_behind(names) is None:
        return
    from .localmodules import modules_used

    sample = items[:1] if isinstance(items, (list, tuple)) else ()
    use = modules_used(func, sample)
    tops = set(use.local)
    refuse_behind(n for n in names if n.partition(".")[0] in tops)


# ------------------------------------------------------------------ a module attribute set in the notebook
_MAX_READ = 1 << 20  # a file bigger than this is not compiled to compare its constants
_LOCAL: dict[str, tuple[int, bool]] = {}  # module name -> (id of the module, is it local)


def _local(mod: types.ModuleType) -> bool:
    """A module from the user's files, by the rule the workers report theirs by (engine/userfiles.py)."""
    kept = _LOCAL.get(mod.__name__)
    if kept is None or kept[0] != id(mod):
        path = module_file(mod)
        kept = _LOCAL[mod.__name__] = (id(mod), path is not None and is_user_file(path))
    return kept[1]


def modules_read(func: Any) -> list[types.ModuleType]:
    """The local modules whose attributes ``func`` reads in a worker from the worker's import:
    the modules among its globals and closure, and those of the functions and classes among them."""
    from .captures import called_function, global_names

    f = called_function(func)
    found: list[Any] = []
    if isinstance(f, types.FunctionType):
        if f.__module__ != "__main__":
            found.append(sys.modules.get(f.__module__ or ""))
        g = f.__globals__
        cells = []
        for cell in f.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        for value in [*(g.get(name) for name in global_names(f)), *cells]:
            if isinstance(value, types.ModuleType):
                found.append(value)
            elif isinstance(value, (types.FunctionType, type)):
                found.append(sys.modules.get(getattr(value, "__module__", None) or ""))
    else:
        found.append(sys.modules.get(getattr(f, "__module__", None) or ""))
    return [m for m in dict.fromkeys(found) if isinstance(m, types.ModuleType) and m.__name__ != "__main__"
            and _local(m)]


def set_in_notebook(mod: types.ModuleType) -> tuple[str, Any, Any] | None:
    """A literal constant of the module's file that the kernel's module holds another value of
    (``mylib.SCALE = 3`` in a cell): (name, the kernel's value, the file's). A worker imports the file's."""
    path = module_file(mod)
    if path is None or type(getattr(getattr(mod, "__spec__", None), "loader", None)) is not SourceFileLoader:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size > _MAX_READ:
        return None
    parsed = _parsed(path, st)
    if isinstance(parsed, str):
        return None
    here = vars(mod)
    for key, value in parsed[1].items():
        if key in here and not _same(here[key], value):
            return key, here[key], value
    return None


def refuse_set_in_notebook(func: Any, by_value: Any = ()) -> None:
    """Raise BadInputError, before any work, when ``func`` reads a local module whose kernel copy holds
    another value of one of the file's constants than the file does (a worker reads the file's).
    ``by_value``: names of modules the workers get by value (they take the kernel's values along)."""
    for mod in modules_read(func):
        if mod.__name__.partition(".")[0] in by_value:
            continue
        found = set_in_notebook(mod)
        if found is None:
            continue
        key, here, there = found
        raise BadInputError(
            f"{mod.__name__}.{key} is {here!r} in this kernel and {there!r} in {module_file(mod)}: a loop here "
            f"reads {here!r}, while the workers import the module from its file and read {there!r}. If the "
            f"notebook set it, pass the value to the function instead (an argument, or --kw / kwargs=); if the "
            f"file was edited, reload the module. Then map again")

