"""Which modules a mapped function needs, and which of them live only on this machine.

A remote cluster's workers do not share the kernel's disk: ``import mylib``
where ``mylib.py`` sits next to the notebook (or in a project's ``src/``, or
an editable install) fails there with ``ModuleNotFoundError``. Such *local*
modules are sent by value with the function (cloudpickle's
``register_pickle_by_value``), so the workers run exactly the code the kernel
has loaded, as the plain loop would; the payload's content hash changes with
that code, so an edited and reloaded module reaches the workers on the next
map. *Installed* modules (site-packages, the standard library) are imported
on the workers by name: their distributions' versions are compared with the
kernel's before work (engine/dask/env.py).

The walk follows what cloudpickle follows: the function's globals, closure,
defaults, the modules, classes and functions found there, instances' classes,
and the namespaces of local modules, transitively, up to a bound.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import site
import sys
import sysconfig
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import cloudpickle

from .errors import BadInputError
from .captures import closure_values, global_names, walk

#: the source a map may send by value, all local modules together
MAX_SOURCE_BYTES = 16 * 2**20
_WALK_LIMIT = 2000  # objects visited per function: a bound, not a budget anyone meets


@dataclass
class ModuleUse:
    """What a function needs: modules to send by value, distributions to find on the workers."""

    local: dict[str, types.ModuleType] = field(default_factory=dict)  #: top-level name -> module
    installed: set[str] = field(default_factory=set)  #: top-level import names of installed modules
    #: local modules the code uses as modules (``mylib.f``, ``import mylib`` in its body): name -> module
    imported: dict[str, types.ModuleType] = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    """Folders whose modules are installed, not local: the standard library and site-packages."""
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # an old virtualenv's site module
        pass
    user = getattr(site, "getusersitepackages", lambda: None)()
    roots.add(user)
    return tuple(sorted({os.path.realpath(r) + os.sep for r in roots if r}))


def _top(name: str) -> str:
    return name.partition(".")[0]


def is_local(module: types.ModuleType) -> bool:
    """A module whose file is outside the standard library and site-packages (not poolmagic)."""
    name = getattr(module, "__name__", "")
    if not name or name == "__main__" or _top(name) == "poolmagic" or name in sys.builtin_module_names:
        return False
    top = sys.modules.get(_top(name), module)
    where = getattr(top, "__file__", None)
    if where is None:
        paths = list(getattr(top, "__path__", []) or [])  # a namespace package
        if not paths:
            return False
        where = paths[0]
    real = os.path.realpath(where)
    return not real.startswith(_installed_roots())


def modules_used(func: Callable, extra: Iterable[Any] = ()) -> ModuleUse:
    """The modules ``func`` (and the sample objects in ``extra``, e.g. the first item) need."""
    use = ModuleUse()

    def children(obj: Any) -> "list[Any] | None":
        if isinstance(obj, types.ModuleType):
            todo: list[Any] = []
            _note_module(obj, use, todo)
            if obj.__name__ in use.local or _top(obj.__name__) in use.local:
                use.imported[obj.__name__] = obj
            return todo
        if isinstance(obj, functools.partial):
            return [obj.func, *obj.args, *obj.keywords.values()]
        if isinstance(obj, (staticmethod, classmethod)):
            return [obj.__func__]
        if isinstance(obj, types.MethodType):
            return [obj.__func__, obj.__self__]
        if isinstance(obj, types.FunctionType):
            todo = []
            _note_owner(obj, use, todo)
            g = obj.__globals__
            return [*todo, *_imported_by(obj.__code__), *(g[n] for n in global_names(obj) if n in g),
                    *closure_values(obj), *(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
        if isinstance(obj, type):
            todo = []
            _note_owner(obj, use, todo)
            if obj.__module__ == "__main__":  # a notebook class travels by value: what its methods use
                todo += [v for v in vars(obj).values() if isinstance(v, (types.FunctionType, staticmethod, classmethod))]
            return todo
        if isinstance(obj, (list, tuple, set, frozenset)) and len(obj) <= 64:
            return list(obj)
        if isinstance(obj, dict) and len(obj) <= 64:
            return list(obj.values())
        if not isinstance(obj, (str, bytes, int, float, complex, bool, type(None))):
            return [type(obj)]  # an instance: its class must be found on the worker
        return None

    for _ in walk([func, *extra], children, _WALK_LIMIT):
        pass
    return use


@functools.lru_cache(maxsize=512)
def _imports_in(code: types.CodeType) -> tuple[str, ...]:
    """Module names that ``import`` statements inside the code name (nested code too)."""
    import dis

    names: dict[str, None] = {}
    stack = [code]
    while stack:
        co = stack.pop()
        stack += [c for c in co.co_consts if isinstance(c, types.CodeType)]
        for ins in dis.get_instructions(co):
            if ins.opname == "IMPORT_NAME" and isinstance(ins.argval, str):
                names.setdefault(ins.argval, None)
    return tuple(names)


def _imported_by(code: types.CodeType) -> list[types.ModuleType]:
    """The modules a function imports when it runs: loaded ones, or local ones it would load."""
    out = []
    for name in _imports_in(code):
        mod = sys.modules.get(name)
        if mod is None and _would_be_local(name):
            try:  # the plain loop would import it too, here
                mod = importlib.import_module(name)
            except Exception:
                mod = None
        if mod is not None:
            out.append(mod)
    return out


def _would_be_local(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(_top(name))
    except (ImportError, ValueError):
        return False
    origin = spec.origin if spec is not None else None
    if not origin or origin in ("built-in", "frozen"):
        return False
    return not os.path.realpath(origin).startswith(_installed_roots())


def _note_owner(obj: Any, use: ModuleUse, todo: list) -> None:
    mod = sys.modules.get(getattr(obj, "__module__", None) or "")
    if mod is not None:
        _note_module(mod, use, todo)


def _note_module(mod: types.ModuleType, use: ModuleUse, todo: list) -> None:
    name = mod.__name__
    if name in ("__main__", "builtins") or _top(name) == "poolmagic":
        return
    top = _top(name)
    if is_local(mod):
        if top not in use.local:
            use.local[top] = sys.modules.get(top, mod)
            todo += _namespace_of(sys.modules.get(top, mod))
        if mod is not use.local[top]:
            todo += _namespace_of(mod)
    else:
        use.installed.add(top)


def _namespace_of(mod: types.ModuleType) -> list:
    """What a local module's code may reach: its globals, and its loaded submodules."""
    out = [v for k, v in vars(mod).items() if not k.startswith("__")]
    prefix = mod.__name__ + "."
    out += [m for n, m in list(sys.modules.items()) if n.startswith(prefix) and m is not None]
    return out


def source_bytes(mod: types.ModuleType) -> int:
    """Bytes of Python source a local module (or package) is made of."""
    path = getattr(mod, "__file__", None)
    if path and os.path.basename(path) != "__init__.py":
        try:
            return os.path.getsize(path)
        except OSError:
            return 0
    total = 0
    for folder in list(getattr(mod, "__path__", []) or []):
        for here, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            total += sum(os.path.getsize(os.path.join(here, f)) for f in files if f.endswith(".py"))
    return total


def check_size(local: dict[str, types.ModuleType], limit: int = MAX_SOURCE_BYTES) -> None:
    """Refuse, naming the module, when the local modules are too big to send with a function."""
    sizes = {name: source_bytes(m) for name, m in local.items()}
    if sum(sizes.values()) > limit:
        name, size = max(sizes.items(), key=lambda kv: kv[1])
        where = getattr(local[name], "__file__", None) or list(getattr(local[name], "__path__", []))[:1]
        raise BadInputError(
            f"the function uses the local module {name!r} ({where}, {size / 2**20:.1f} MB of source), too big to "
            f"send to the remote workers with every new version of the function (the limit is "
            f"{limit / 2**20:.0f} MB): install it in the workers' environment (pip install it there) and "
            f"poolmagic imports it there instead"
        )


def register_by_value(modules: Iterable[types.ModuleType], registered: dict[str, types.ModuleType]) -> None:
    """Have cloudpickle send these modules by value from now on.

    ``registered`` keeps those this call registered, for ``unregister``; a
    module the user registered already is left to the user.
    """
    already = getattr(getattr(cloudpickle, "cloudpickle", None), "_is_registered_pickle_by_value", None)
    for mod in modules:
        if mod.__name__ in registered or (already is not None and already(mod)):
            continue
        try:
            cloudpickle.register_pickle_by_value(mod)
        except ValueError:  # not in sys.modules any more: it is pickled by value anyway
            continue
        registered[mod.__name__] = mod


def unregister(registered: dict[str, types.ModuleType]) -> None:
    """Undo register_by_value (when the remote backend is closed)."""
    for name, mod in list(registered.items()):
        try:
            cloudpickle.unregister_pickle_by_value(mod)
        except ValueError:
            pass
        del registered[name]


def with_modules(func: Callable, modules: dict[str, types.ModuleType]) -> Any:
    """``func`` packed with the local modules its code uses as modules, for a remote worker.

    Unpickled there, it puts those modules (whole, by value: with the parent
    packages of a submodule) in ``sys.modules`` before it hands back ``func``
    itself, so that ``mylib.f(x)`` and an ``import mylib`` running inside the
    function find the kernel's code. Functions and classes the code reaches
    otherwise travel by value on their own (``register_by_value``).
    """
    packed: dict[str, types.ModuleType] = {}
    for name in modules:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            parent = ".".join(parts[:i])
            if sys.modules.get(parent) is not None:
                packed[parent] = sys.modules[parent]
    return _WithModules(func, packed) if packed else func


class _WithModules:
    __slots__ = ("func", "modules")

    def __init__(self, func: Callable, modules: dict[str, types.ModuleType]):
        self.func, self.modules = func, modules

    def __reduce__(self) -> tuple:
        return (_install, (self.modules, self.func))


def _install(modules: dict[str, types.ModuleType], func: Callable) -> Callable:
    """On a worker: make the shipped modules importable, return the function."""
    sys.modules.update(modules)
    return func


class ByValue:
    """The local modules a backend's workers get by value from this kernel, registered until ``close``."""

    def __init__(self) -> None:
        self.registered: dict[str, types.ModuleType] = {}
        self._trials: dict[tuple, str | None] = {}  # a module -> why it cannot be pickled whole

    def pack(self, func: Callable, local: dict[str, types.ModuleType], imported: dict[str, types.ModuleType],
             otherwise: str) -> tuple[Any, list[str]]:
        """``func`` with ``local`` sent by value, and the modules its body imports packed whole.

        ``otherwise``: what ``import mylib`` in the body does when the module cannot travel whole.
        """
        register_by_value(local.values(), self.registered)
        whole, notes = {}, []
        for name, mod in imported.items():
            why = self._unpicklable(mod)
            if why is None:
                whole[name] = mod
            else:
                notes.append(f"the local module {name} cannot travel whole ({why}): what the function takes "
                             f"from it travels by value, but `import {name}` in its body {otherwise}")
        return with_modules(func, whole), notes

    def _unpicklable(self, mod: types.ModuleType) -> str | None:
        """Why a local module cannot be pickled by value (checked once per module object)."""
        key = (mod.__name__, id(mod), len(vars(mod)))
        if key not in self._trials:
            try:
                cloudpickle.dumps(mod)
                self._trials[key] = None
            except Exception as exc:
                self._trials[key] = f"{type(exc).__name__}: {exc}"
        return self._trials[key]

    def close(self) -> None:
        unregister(self.registered)


class FollowReloads:
    """Local modules for workers that share this machine's files but keep what they imported.

    A dask worker imports ``mylib`` once and keeps that copy: reloaded in the
    kernel (``importlib.reload``, ``%autoreload``), the kernel runs the new
    code while the workers run the old. From the first map after such a
    reload on, the module goes by value, so the workers run the kernel's copy
    as a loop would; a module edited and not reloaded is refused
    (moduleedits.py), since a replaced worker would import the file.
    """

    def __init__(self) -> None:
        self.by_value = ByValue()
        self._stamps: dict[str, tuple] = {}  # module -> its file's (mtime, size) when the workers may have imported it

    def prepare(self, func: Callable, items: Any) -> tuple[Any, list[str]]:
        from .moduleedits import module_file, refuse_behind, refuse_set_in_notebook

        sample = items[:1] if isinstance(items, (list, tuple)) else ()
        use = modules_used(func, sample)
        if not use.local:
            return func, []
        names = [n for n, m in list(sys.modules.items())
                 if m is not None and _top(n) in use.local and module_file(m) is not None]
        refuse_behind(names)
        refuse_set_in_notebook(func, self.by_value.registered)  # (one sent by value takes them along)
        notes = []
        for name in names:
            try:
                st = os.stat(module_file(sys.modules[name]))
            except OSError:
                continue
            stamp = self._stamps.setdefault(name, (st.st_mtime_ns, st.st_size))
            top = _top(name)
            if stamp != (st.st_mtime_ns, st.st_size) and top not in self.by_value.registered:
                register_by_value([use.local[top]], self.by_value.registered)
                notes.append(f"the module {top} was reloaded since the workers imported it: it goes to them "
                             f"by value from now on, so they run this kernel's copy")
        sent = {t: m for t, m in use.local.items() if t in self.by_value.registered}
        if not sent:
            return func, notes
        imported = {n: m for n, m in use.imported.items() if _top(n) in sent}
        func, more = self.by_value.pack(func, sent, imported, "imports the workers' older copy")
        return func, notes + more
