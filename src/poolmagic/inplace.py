"""Whether a mapped function changes its argument, or a notebook global, in place.

Such a function (``def normalise(a): a -= a.mean()``, ``out.append(x)``) works in a
plain loop through its side effect on the notebook's objects. Mapped, it changes
each worker's copy: the notebook's items and globals stay as they were (and a
function that returns nothing gives all None). The map says so in a note
(mapprep.py); this module reads the function's bytecode for it, once per code object.

The reading is a small simulation of the value stack over the function's own code
(not nested functions), tagging values that are a parameter or a global, an attribute of
one (``df.loc``) or an element of one (``rows[0]``): a store into such a value
(``a[...] = v``, ``a.x = v``, ``del a[k]``), an augmented assignment on it
(``a += 1``), a method that changes its object (``lst.append``) or a call with
``inplace=True`` on it is a change. An instruction it does not model empties the
stack, so it may miss a change, never invent one.
"""
from __future__ import annotations

import dis
import functools
import types
from typing import Any

_MUTATORS = frozenset({
    "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update", "setdefault",
    "popitem", "add", "discard", "difference_update", "intersection_update", "symmetric_difference_update",
    "fill", "resize", "itemset", "put", "partition", "setflags", "appendleft", "extendleft", "popleft",
    "rotate", "move_to_end",
})
_PUSH_ONLY = ("LOAD_CONST", "LOAD_GLOBAL", "LOAD_DEREF", "LOAD_NAME", "LOAD_CLOSURE", "PUSH_NULL",
              "LOAD_SMALL_INT", "LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_FAST_BORROW")
_TWO_IN = ("BINARY_OP", "COMPARE_OP", "BINARY_SUBSCR", "CONTAINS_OP", "IS_OP")
_NO_STACK = ("NOP", "RESUME", "CACHE", "EXTENDED_ARG", "PRECALL", "KW_NAMES")
# tags: the item's parameter, a global (or part of one); another parameter, a closure variable;
# a method of one bound for a call
_ARG, _GLOBAL, _METHOD = "arg", "global", "method"
_OTHER, _FREE = "other", "free"
_NO_STATE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset, range)


def changed_parameter(func: Any, star: bool = False) -> str | None:
    """The parameter ``func`` changes in place when it returns nothing, else None.

    Only the item's parameter counts: the first positional one, or with ``star`` every
    positional one. A partial, a bound method or poolmagic's wrappers are looked through.
    """
    code = _code(func)
    return None if code is None else _changes(code, star)[0]


def changed_globals(func: Any) -> tuple[str, ...]:
    """Notebook globals ``func`` changes in place (``out.append(x)``, ``memo[x] = v``, ``cfg.n = 1``),
    in order; modules and functions it reaches through are not counted (``sys.path.append``).
    Only a function of the notebook (``__main__``): a library's module globals are not the notebook's."""
    from .captures import called_function

    func = called_function(func)
    code = _code(func)
    g = getattr(func, "__globals__", {})
    if code is None or g.get("__name__") != "__main__":
        return ()
    return tuple(n for n in _changes(code, False)[1] if n in g and _copied(g[n]))


def kept_state(func: Any) -> list[str]:
    """Where ``func`` keeps state from one call to the next, which a worker keeps to itself: a closure
    variable it assigns (``nonlocal n; n += 1``) or changes in place, a default argument it changes in
    place (``def f(x, acc=[])``), an attribute of a notebook function or class (``f.calls += 1``,
    ``Counter.n += 1``), the object a mapped method is bound to (``acc.add`` doing ``self.n += x``). Each worker then counts or collects only the items it ran."""
    from .captures import called_function

    bound = func
    while isinstance(bound, functools.partial):
        bound = bound.func
    func = called_function(func)
    code = _code(func)
    if code is None:
        return []
    _, globals_changed, free, others = _changes_all(code)
    out = []
    if isinstance(bound, types.MethodType) and code.co_argcount and code.co_varnames[0] in others \
            and not isinstance(bound.__self__, type):  # obj.add where add does self.n += x
        out.append(f"the {type(bound.__self__).__name__} object the method {bound.__name__}() is bound to")
    cells = dict(zip(code.co_freevars, func.__closure__ or ()))
    for name, assigned in free:
        try:
            value = cells[name].cell_contents
        except (KeyError, ValueError):
            continue
        if assigned or (_copied(value) and not isinstance(value, _NO_STATE)):
            out.append(f"the closure variable {name!r}")
    defaults = _defaults(func, code)
    for name in others:
        if name in defaults and _copied(defaults[name]) and not isinstance(defaults[name], _NO_STATE):
            out.append(f"its default argument {name!r}")
    g = getattr(func, "__globals__", {})
    if g.get("__name__") == "__main__":
        for name in globals_changed:
            value = g.get(name)
            if isinstance(value, (types.FunctionType, type)) and getattr(value, "__module__", None) == "__main__":
                kind = "class" if isinstance(value, type) else "function"
                out.append(f"an attribute of the notebook's {kind} {name!r}")
    return out


def changed_receiver(func: Any) -> str | None:
    """The type of the object ``func`` changes when it is a C method that changes its object
    (``out.append``, ``seen.add``, ``d.update``): mapped, it changes each worker's copy."""
    while isinstance(func, functools.partial):
        func = func.func
    if not isinstance(func, (types.BuiltinMethodType, types.MethodWrapperType)):
        return None
    owner = getattr(func, "__self__", None)
    if owner is None or isinstance(owner, (types.ModuleType, type)) or not _copied(owner):
        return None
    return type(owner).__name__ if getattr(func, "__name__", "") in _MUTATORS else None


def _defaults(func: Any, code: types.CodeType) -> dict[str, Any]:
    """Parameter name -> its default value."""
    out = dict(getattr(func, "__kwdefaults__", None) or {})
    values = getattr(func, "__defaults__", None) or ()
    if values:
        out.update(zip(code.co_varnames[code.co_argcount - len(values):code.co_argcount], values))
    return out


def _copied(value: Any) -> bool:
    """A global whose change in a worker stays there: not a module, function or class (reached
    through), nor a multiprocessing proxy or queue (``Manager().dict()``: shared on purpose)."""
    if isinstance(value, (types.ModuleType, types.FunctionType, type)):
        return False
    return not (type(value).__module__ or "").startswith("multiprocessing")


def _code(func: Any) -> types.CodeType | None:
    from .captures import called_function

    code = getattr(called_function(func), "__code__", None)
    return code if isinstance(code, types.CodeType) else None


def _changes(code: types.CodeType, star: bool) -> tuple[str | None, tuple[str, ...]]:
    try:
        return _read(code, star)[:2]
    except Exception:  # bytecode this Python version lays out otherwise: say nothing
        return None, ()


def _changes_all(code: types.CodeType) -> tuple:
    try:
        return _read(code, False)
    except Exception:
        return None, (), (), ()


@functools.lru_cache(maxsize=512)
def _read(code: types.CodeType, star: bool) -> tuple:
    """(the item's parameter changed in place, if the code returns nothing; the globals it changes in
    place; the closure variables it changes, as (name, assigned); the other parameters it changes in place)."""
    n = code.co_argcount - (1 if code.co_varnames[:1] in (("self",), ("cls",)) else 0)
    first = code.co_argcount - n
    params = set(code.co_varnames[first:code.co_argcount if star else first + 1])
    others = set(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]) - params
    free = set(code.co_freevars)
    param: str | None = None
    changed: dict[str, None] = {}
    free_changed: dict[str, bool] = {}
    others_changed: dict[str, None] = {}

    def change(tag: Any) -> None:
        nonlocal param
        if tag[0] == _ARG:
            param = param or tag[1]
        elif tag[0] == _FREE:
            free_changed.setdefault(tag[1], False)
        elif tag[0] == _OTHER:
            others_changed.setdefault(tag[1], None)
        else:
            changed.setdefault(tag[1], None)

    stack: list[Any] = []
    kwnames: tuple = ()
    for ins in dis.get_instructions(code):
        op, tag = ins.opname, None
        if ins.is_jump_target:
            stack.clear()
        if op.startswith("LOAD_FAST"):
            names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
            stack.extend((_ARG, n) if n in params else (_OTHER, n) if n in others else None for n in names)
            continue
        if op == "LOAD_DEREF" and ins.argval in free:
            stack.append((_FREE, ins.argval))
            continue
        if op == "STORE_DEREF" and ins.argval in free:  # nonlocal n; n = ...
            free_changed[ins.argval] = True
            if stack:
                stack.pop()
            continue
        if op in ("COPY", "DUP_TOP") and stack:
            depth = ins.arg if op == "COPY" else 1
            if len(stack) < depth:
                stack.clear()
                continue
            stack.append(stack[-depth])
            continue
        if op in ("SWAP", "ROT_TWO"):
            depth = ins.arg if op == "SWAP" else 2
            if len(stack) < depth:
                stack.clear()
                continue
            stack[-1], stack[-depth] = stack[-depth], stack[-1]
            continue
        if op == "LOAD_GLOBAL" and dis.stack_effect(ins.opcode, ins.arg) == 1:  # not one loaded to be called
            stack.append((_GLOBAL, ins.argval))
            continue
        if op in ("STORE_SUBSCR", "DELETE_SUBSCR", "STORE_SLICE", "STORE_ATTR", "DELETE_ATTR"):
            depth = {"STORE_SUBSCR": 2, "DELETE_SUBSCR": 2, "STORE_SLICE": 3}.get(op, 1)
            if len(stack) >= depth and _changeable(stack[-depth]):
                change(stack[-depth])
            stack.clear()
            continue
        if op in ("LOAD_METHOD", "LOAD_ATTR") and stack:
            owner = stack.pop()
            method = op == "LOAD_METHOD" or dis.stack_effect(ins.opcode, ins.arg) == 1
            if method and _changeable(owner) and ins.argval in _MUTATORS:
                change(owner)
            if method:
                stack.extend([(_METHOD, owner) if _changeable(owner) else None] * 2)
            else:
                stack.append(owner if _changeable(owner) else None)
            continue
        if op == "KW_NAMES":
            kwnames = code.co_consts[ins.arg] if isinstance(ins.arg, int) else ()
            continue
        if op == "LOAD_CONST" and isinstance(ins.argval, tuple):
            kwnames = ins.argval  # CALL_KW (3.13) and CALL_FUNCTION_KW (3.10) take them from the stack
        if op in ("CALL", "CALL_KW", "CALL_METHOD", "CALL_FUNCTION", "CALL_FUNCTION_KW"):
            pops = ins.arg + (3 if op == "CALL_KW" else 2 if op in ("CALL", "CALL_METHOD") else 1)
            pops += 1 if op == "CALL_FUNCTION_KW" else 0
            called = stack[-pops:][:2] if len(stack) >= pops else []  # what is called (and its self)
            owner = next((t[1] for t in called if isinstance(t, tuple) and t[0] == _METHOD), None)
            if owner is None and op == "CALL_FUNCTION_KW" and called and _changeable(called[0]):
                owner = called[0]  # 3.10: df.drop loaded as an attribute
            if "inplace" in kwnames and owner is not None:
                change(owner)
            kwnames = ()
            del stack[-pops:]
            stack.append(None)
            continue
        if op in _NO_STACK:
            continue
        if op in _TWO_IN:
            if len(stack) < 2:
                stack.clear()
                continue
            left = stack[-2]
            if op == "BINARY_OP" and ins.argrepr.endswith("=") and _is_param(left):
                change(left)  # a += b on a parameter: an array or a list changes in place
            tag = left if op == "BINARY_SUBSCR" and _changeable(left) else None  # rows[0]: part of the item
            del stack[-2:]
            stack.append(tag)
            continue
        if op.startswith("INPLACE_") and len(stack) >= 2:  # 3.10
            if _is_param(stack[-2]):
                change(stack[-2])
            del stack[-2:]
            stack.append(None)
            continue
        if op in _PUSH_ONLY:
            stack.extend([None] * dis.stack_effect(ins.opcode, ins.arg))
            continue
        if op in ("BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_SLICE") and len(stack) >= ins.arg:
            del stack[len(stack) - ins.arg:]
            stack.append(None)
            continue
        if op in ("POP_TOP", "STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF") and stack:
            stack.pop()
            continue
        stack.clear()  # not modelled: forget what the stack held
    return ((param if params and _returns_nothing(code) else None), tuple(changed), tuple(free_changed.items()),
            tuple(others_changed))


def _is_param(tag: Any) -> bool:
    return isinstance(tag, tuple) and tag[0] in (_ARG, _OTHER)


def _changeable(tag: Any) -> bool:
    """A parameter, a global, a closure variable, or part of one (not a method bound for a call)."""
    return isinstance(tag, tuple) and tag[0] in (_ARG, _GLOBAL, _OTHER, _FREE)


def _returns_nothing(code: types.CodeType) -> bool:
    """Every ``return`` of the code gives None (a bare ``return``, or none at all)."""
    before = None
    for ins in dis.get_instructions(code):
        if ins.opname == "RETURN_CONST" and ins.argval is not None:
            return False
        if ins.opname == "RETURN_VALUE" and not (before is not None and before.opname == "LOAD_CONST"
                                                  and before.argval is None):
            return False
        if ins.opname in ("YIELD_VALUE", "RETURN_GENERATOR"):
            return False
        before = ins
    return True
