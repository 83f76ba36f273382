"""A map prepared: a call checked, its function pickled, its options made a Job.

Every check that can fail on bad input runs here, before any work starts, so
a mistake is reported as one sentence naming the culprit. ``Pool.prepare``,
and so every way of starting a map, comes through ``prepare_map``; nothing
here starts a worker or reads the ITERABLE beyond a stream's first look.
"""
from __future__ import annotations

import functools
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .checks import NoArgs, check_arity, check_not_text, check_plain_function, check_star
from .engine.base import Backend
from .engine.context import ContextCache
from .engine.core.runchunk import FilterCategory
from .engine.core.settings import read as read_settings
from .engine.core.items import SEQUENCES, ItemSource
from .engine.core.transport import NATIVE_THREAD_LIMIT, OWN_PROCESS
from .engine.core.job import Job
from .engine.mapoptions import MapOptions
from .errors import BadArgumentsError, BadInputError, SerializationError
from .loopnotes import loop_notes
from .report import FAILED_KEPT, RunReport
from .sentinel import NOT_DONE
from .captures import undefined_globals
from .serialize import _UNSET, Payload, _fingerprint, callable_name, describe, dump_function

if TYPE_CHECKING:
    from .api import Pool
    from .checkpointing import Checkpoint  # loaded when a map asks for --checkpoint


def prepare_map(pool: "Pool", func: Callable, iterable: Iterable | None, options: dict,
                resume: RunReport | None, worker_setup: Callable[[Callable], Callable] | None,
                contexts: ContextCache) -> Job:
    """Check everything and build the Job; raises BadInputError before any work.

    ``pool`` gives its settings: backend, size, native threads, memory limit,
    cores, measured item times. ``worker_setup`` wraps the function to run the
    pool's ``initializer`` (None: no setup); ``contexts`` caches the per-map
    context by thread count. ``resume``: an earlier run's report; only its
    unfinished items run, and their results are merged into its results.
    """
    o = _options(pool, options)
    name = _check_function(func, o)
    unwrapped = func
    copies = OWN_PROCESS not in pool.backend.lacks  # the workers get copies of what the function reads
    fp = _fingerprint(func)  # once: the notes and the payload's cache both key on it
    unlike_loop = loop_notes(func, name, o, copies, fp)
    func, iterable = _call(func, iterable, o, name)
    kw_keys, kw_kept, pickled, digests = None, {}, {}, {}
    if o.kwargs:  # what the workers get, to say later that a value changed since (resume, checkpoint, rerun)
        from .versions import kw_pickles, kw_record

        pickled = kw_pickles(o.kwargs)  # once: the payload holds these pickles as they are
        # keys that hold in this kernel, made at pickle speed, unless a checkpoint file keeps them
        kw_keys, kw_kept = kw_record(o.kwargs, stable=bool(o.checkpoint), digests=digests, pickled=pickled)
    prepickled = {id(o.kwargs[n]): (o.kwargs[n], *pickled[n]) for n in pickled}
    payload, notes = _payload(pool.backend, func, iterable, o.star, worker_setup, o.kwargs, prepickled, digests,
                              fp if func is unwrapped else _UNSET)
    workers = o.workers or pool.size
    threads = o.threads or pool.threads_per_worker(workers)
    context = contexts.get(threads)
    # on threads the native pools are the kernel's own, shared and never limited: the card
    # has no per-worker count to weigh (or to advise --threads, which threads refuse)
    shown = None if NATIVE_THREAD_LIMIT in pool.backend.lacks else threads
    report = RunReport(func_name=name, cores=pool.backend.cores() or pool.cores, pool_size=workers, backend=pool.backend.description,
                       threads=shown, serial_item_s=pool.serial_item_s.get(payload.key))
    report.notes.extend(notes)
    report.kw_keys, report.kw_kept = kw_keys, kw_kept
    report.notes.extend(unlike_loop)
    every = iterable  # a sequence: every item stays available to re-run, whichever ran now
    index, checkpoint, iterable = _earlier_run(report, resume, o, iterable, name, payload, unwrapped)
    job = Job(payload, ItemSource(iterable), report, o, context, func)
    job.index = index
    job.checkpoint = checkpoint
    if index is None and type(iterable) in SEQUENCES:
        report.replay = (func, o, iterable)
    elif index is not None:
        report.replay = (func, o, every if type(every) in SEQUENCES else None)
        report.failed_items.update(zip(index, iterable) if len(index) <= FAILED_KEPT else ())
    else:
        report.replay = (func, o, None)
    return job


def _options(pool: "Pool", options: dict) -> MapOptions:
    """The map's options, with the pool's memory limit where the map sets none; the
    backend refuses those it cannot honour (threads: --timeout, --max-memory; a
    remote cluster: --max-memory)."""
    o = _with_kernel_state(MapOptions.from_kwargs(options))
    from_pool = frozenset()
    if o.max_memory is None and pool.max_memory is not None:
        o = o.with_(max_memory=pool.max_memory)
        from_pool = frozenset({"max_memory"})
    pool.backend.check_options(o, from_pool)
    return o


def _with_kernel_state(o: MapOptions) -> MapOptions:
    """``o`` with what the kernel's loop would run under: numpy's error handling, the warning
    filters and library settings (decimal, numpy printing, pandas, the interpreter's limits, locale,
    umask: engine/core/settings.py). The same options and state give the same object (its pickle is reused, protocol.py)."""
    errstate = _numpy_errstate() if o.errstate is None else o.errstate
    filters = _warning_filters() if o.warning_filters is None else o.warning_filters
    kept_settings = read_settings() if o.settings is None else o.settings
    if errstate is o.errstate and filters is o.warning_filters and kept_settings is o.settings:
        return o
    key = (id(o), id(filters), errstate, kept_settings)  # (by identity: hashing the options costs more)
    kept = _WITH_STATE.get(key)
    if kept is not None and kept[0] is o and kept[1] is filters:
        return kept[2]
    made = o.with_(errstate=errstate, warning_filters=filters, settings=kept_settings)
    _WITH_STATE[key] = (o, filters, made)  # (holding o and filters: their ids name no other object)
    if len(_WITH_STATE) > 64:
        del _WITH_STATE[next(iter(_WITH_STATE))]
    return made


_WITH_STATE: dict = {}
_FILTERS: list = [None, None]  # [fingerprint of warnings.filters, the tuple made of it]


def _warning_filters() -> tuple | None:
    """The kernel's warning filters, as the workers can load them at once: entries on Python's own
    warning classes, and on those of the modules the workers start with (numpy, pandas: warm.py).
    Another category would be imported by the worker to read the options, before its first item
    (IPython's ProvisionalCompleterWarning, in every kernel's filters, made a warm pool's first
    map 15× slower); a notebook's own cannot be imported at all. Made again only when the list
    changed (simplefilter and filterwarnings put a new entry first, or last with append=True;
    catch_warnings puts a new list in place). A library's category goes by name (FilterCategory):
    a remote worker without that library could not unpickle the options."""
    filters = warnings.filters
    mark = (id(filters), len(filters), id(filters[0]) if filters else 0, id(filters[-1]) if filters else 0)
    if _FILTERS[0] != mark:
        from .engine.warm import warm_modules

        loaded = ("builtins", *warm_modules())
        kept = tuple(_by_name(f) for f in filters if len(f) == 5 and _loaded_with(f[2], loaded))
        _FILTERS[:] = [mark, kept]
    return _FILTERS[1]


def _by_name(f: tuple) -> tuple:
    """The filter ``f`` with its category by name, unless it is one of Python's own."""
    category = f[2]
    if category.__module__ == "builtins":
        return f
    return (f[0], f[1], FilterCategory(category.__module__, category.__qualname__), f[3], f[4])


def _loaded_with(category: Any, packages: tuple[str, ...]) -> bool:
    """``category`` is a class of one of ``packages`` that a worker finds by its name."""
    name = getattr(category, "__module__", "") or ""
    module = sys.modules.get(name)
    return (name.split(".")[0] in packages and module is not None
            and getattr(module, getattr(category, "__qualname__", ""), None) is category)


_NUMPY_DEFAULT = {"divide": "warn", "over": "warn", "under": "ignore", "invalid": "warn"}


def _numpy_errstate() -> tuple | None:
    """The kernel's np.seterr state as (name, action) pairs, when numpy is loaded and it is not the default."""
    np = sys.modules.get("numpy")
    if np is None:
        return None
    try:
        state = np.geterr()
    except Exception:  # a numpy-like module in its place
        return None
    if state == _NUMPY_DEFAULT:
        return None
    pairs = tuple(sorted(state.items()))
    if "call" in state.values() or "log" in state.values():  # np.seterrcall's function goes along
        call = np.geterrcall()
        if _ERRCALL[0] is not call:
            from .engine.core.settings import pack_value

            _ERRCALL[:] = [call, pack_value(call, "np.seterrcall(...)")]
        pairs += (("call", _ERRCALL[1]),)
    return pairs


_ERRCALL: list = [None, None]  # [np.geterrcall() last sent, its packed value]


def settings_words(o: MapOptions) -> str | None:
    """The library settings a map's items run under, as a checkpoint records them (None: the defaults)."""
    if o.settings is None and o.errstate is None:
        return None
    return repr((o.settings, o.errstate))


def _item_classes_changed(was: dict | None, items: Any) -> list[str]:
    """The items' notebook classes whose methods or attributes differ from the run to resume's."""
    if not was:
        return []
    from .versions import item_class_keys, item_types

    now = item_class_keys(item_types(items)) or {}
    return sorted(name for name, key in now.items() if name in was and was[name] != key)


def _check_function(func: Callable, o: MapOptions) -> str:
    """The function's name, once it is known to be a callable the workers can run."""
    if not callable(func):
        # a TypeError too, as the loop's call (and multiprocessing's, concurrent.futures') raises
        raise BadArgumentsError(f"the function to map is {describe(func)}, which is not callable")
    name = callable_name(func)
    check_plain_function(func, name)
    if not o.star:
        check_arity(func, name, repeat=o.repeat is not None, kwargs=o.kwargs)
    return name


def _call(func: Callable, iterable: Iterable | None, o: MapOptions, name: str) -> tuple[Callable, Iterable]:
    """What each item calls (``kwargs`` bound, ``repeat`` without arguments) and the items, checked."""
    if o.repeat is not None:
        if iterable is not None:
            raise BadInputError("give either an ITERABLE or repeat=N, not both")
        iterable = range(o.repeat)
    missing = undefined_globals(func)
    if missing:
        fn, var = missing[0]
        raise BadInputError(f"{fn}() uses the name {var!r}, which is not defined")
    unwrapped = func
    if o.kwargs:
        func = functools.partial(func, **o.kwargs)
    if o.repeat is not None:
        func = NoArgs(func)
    try:
        iter(iterable)  # type: ignore[arg-type]
    except TypeError:
        raise BadArgumentsError(f"ITERABLE is {describe(iterable)}, which is not iterable") from None
    check_not_text(iterable)
    if o.star:
        iterable = check_star(iterable, unwrapped, name, o.kwargs)
    return func, iterable  # type: ignore[return-value]


def _payload(backend: Backend, func: Callable, iterable: Iterable, star: bool,
             worker_setup: Callable[[Callable], Callable] | None,
             kwargs: dict | None = None, prepickled: dict | None = None,
             digests: dict | None = None, fp: Any = _UNSET) -> tuple[Payload, list[str]]:
    """The function as the workers receive it, pickled, and the backend's notes on it.
    ``prepickled``: the --kw values' pickles, used as they are unless the backend changed the
    function (a remote cluster's local modules go by value: its pickling differs)."""
    shipped, notes = backend.prepare_function(func, iterable, star)  # a remote cluster's checks
    if OWN_PROCESS in backend.lacks:  # threads: the items call the function itself, nothing is pickled
        return Payload(f"t{id(shipped):x}", b"", []), notes  # (the key: this object, for its item times)
    if shipped is not func:
        prepickled = None
    if worker_setup is not None:
        shipped = worker_setup(shipped)
    try:
        payload = dump_function(shipped, prepickled, digests, fp if shipped is func else _UNSET)
    except SerializationError:
        _check_kwargs(func, kwargs)  # a --kw value: named as the user wrote it, not as "the partial's"
        if shipped is not func:
            dump_function(func)  # the function itself cannot be pickled: that error names the culprit
        raise
    return payload, notes


def _check_kwargs(func: Callable, kwargs: dict | None) -> None:
    """Raise SerializationError naming the first ``--kw`` value (``kwargs=``) that cannot be pickled."""
    import cloudpickle

    for key, value in (kwargs or {}).items():
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            name = callable_name(func.func if isinstance(func, functools.partial) else func)
            raise SerializationError(
                f"{name}() cannot be sent to the workers with --kw {key}=... (kwargs={{{key!r}: ...}}): "
                f"its value is {describe(value)}, which cannot be pickled ({exc})."
            ) from None


def kw_changed_note(was: dict | None, now: dict | None, since: str, kept: int) -> list[str]:
    """The note of a map that keeps ``kept`` results computed with other ``--kw`` values (none: same values)."""
    from .versions import changed_kw, kw_words

    names = changed_kw(was, now)
    if not names:
        return []
    one = len(names) == 1
    return [f"{kw_words(names)} changed since {since}; {kept:,} results computed with "
            f"{'its' if one else 'their'} earlier value{'' if one else 's'} were kept"]


def _earlier_run(report: RunReport, resume: RunReport | None, o: MapOptions, iterable: Iterable, name: str,
                 payload: Payload, func: Callable) -> tuple[Any, Checkpoint | None, Iterable]:
    """What an earlier run (``resume``) or a checkpoint file already did: ``(index, checkpoint,
    iterable)``, the index and ITERABLE of the items still to run (index None: all of them).
    The earlier results are copied into ``report``."""
    index, checkpoint = None, None
    if resume is not None and o.checkpoint:  # either would decide which items run; both: no file was written
        raise BadInputError(
            "--resume and --checkpoint (resume= and checkpoint=) cannot be used together: --checkpoint "
            "PATH resumes by itself from what PATH recorded; run the map again with only --checkpoint "
            "to continue it, or only --resume to re-run an earlier map's missing items")
    if resume is not None:
        from .resume import resume_report  # (the items' keys and their comparison: only for --resume)

        earlier, index, iterable = resume_report(resume, iterable, o.seed)
        was = getattr(resume.identity, "code", None)
        from .versions import code_key

        classes = _item_classes_changed(getattr(resume.identity, "item_classes", None), iterable)
        if was is not None and code_key(func, stable=False, digests=payload.digests) not in (was, None):
            report.notes.append(f"the function changed (its code, or a global or helper it reads) since the "
                                f"run to resume; {earlier.done:,} results of its earlier version were kept")
            report.older = [i for i, v in enumerate(earlier.results) if v is not NOT_DONE]
        elif classes:
            report.notes.append(f"the items' class {', '.join(classes)} changed (a method or a class attribute) "
                                f"since the run to resume; {earlier.done:,} results computed with its earlier "
                                f"version were kept")
            report.older = [i for i, v in enumerate(earlier.results) if v is not NOT_DONE]
        else:  # the same version as the run to resume: what an earlier one computed is still its
            report.older = [i for i in resume.older if earlier.results[i] is not NOT_DONE]
            if report.older:
                from .itemkeys import items_words

                report.notes.append(f"{len(report.older):,} results kept by the run to resume were computed by an "
                                    f"earlier version of the function ({items_words(report.older)})")
        was_o = resume.replay[1] if resume.replay is not None else None
        if was_o is not None and (was_o.settings, was_o.errstate) != (o.settings, o.errstate):
            report.notes.append(f"the kernel's library settings (decimal context, numpy's print options or "
                                f"error handling, pandas options, the recursion or int digits limit, locale, "
                                f"umask) changed since the run to resume; "
                                f"{earlier.done:,} results computed under the earlier ones were kept")
        now = report.kw_keys
        if resume.kw_keys and o.kwargs:
            from .versions import kw_keys

            now = kw_keys(o.kwargs, like=resume.kw_keys)  # (made as that run's were: it may have had a checkpoint)
        kw_note = kw_changed_note(resume.kw_keys, now, "the run to resume", earlier.done)
        report.notes.extend(kw_note)
        if kw_note:
            report.kw_older = [i for i, v in enumerate(earlier.results) if v is not NOT_DONE]
        else:  # the same values as the run to resume: what earlier ones computed is still theirs
            report.kw_older = [i for i in resume.kw_older if earlier.results[i] is not NOT_DONE]
            if report.kw_older:
                from .itemkeys import items_words

                report.notes.append(f"{len(report.kw_older):,} results kept by the run to resume were computed with "
                                    f"earlier --kw values ({items_words(report.kw_older)})")
    elif o.checkpoint:
        from .checkpointing import Checkpoint  # (its file format and threads: only for --checkpoint)

        checkpoint = Checkpoint(o.checkpoint)
        from .versions import code_key

        earlier, index, iterable = checkpoint.load(iterable, name, payload.key, o.seed, code_key(func), report.kw_keys,
                                                   settings_words(o))
    if index is not None:
        for f in ("items", "results", "errors", "done", "resumed", "identity"):
            setattr(report, f, getattr(earlier, f))
        if checkpoint is not None and checkpoint.function_changed:
            from .itemkeys import items_words

            report.notes.append(f"the function changed (its code, or a global or helper it reads) since "
                                f"{o.checkpoint} was written; {len(checkpoint.older):,} results of its earlier "
                                f"version were kept ({items_words(checkpoint.older)})")
            report.older = checkpoint.older
        if checkpoint is not None and checkpoint.kw_changed:
            report.notes.extend(kw_changed_note(*checkpoint.kw_changed, f"{o.checkpoint} was written",
                                                checkpoint.kw_older))
    if checkpoint is not None:
        report.notes.extend(checkpoint.notes)
    return index, checkpoint, iterable
