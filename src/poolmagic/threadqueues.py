"""Threads of poolmagic's own that run tasks in order: one per name, started once.

Checkpoints write on the "writer" thread and fsync on the "syncer" one;
``--resume`` hashes items on the "identity" one. Starting a thread per map cost
~0.2 ms; one per name is started on first use and lives with the process. A
task's errors are its own: one file never stops the others.
"""
from __future__ import annotations

import os
import queue
import threading

_QUEUES: dict[str, queue.SimpleQueue] = {}
_QUEUE_LOCK = threading.Lock()


def thread_queue(name: str) -> queue.SimpleQueue:
    """The queue of thread ``name`` ("writer", "syncer", "identity"), started on first use."""
    q = _QUEUES.get(name)
    if q is None:
        with _QUEUE_LOCK:
            q = _QUEUES.get(name)
            if q is None:
                q = queue.SimpleQueue()
                threading.Thread(target=_serve, args=(q,), name=f"poolmagic-checkpoint-{name}", daemon=True).start()
                _QUEUES[name] = q
    return q


def _serve(q: queue.SimpleQueue) -> None:
    while True:
        fn, args = q.get()
        try:
            fn(*args)
        except BaseException:  # each task keeps its own error; one file never stops the others
            pass


def _forget_in_child() -> None:
    """A forked child has none of these threads."""
    _QUEUES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
