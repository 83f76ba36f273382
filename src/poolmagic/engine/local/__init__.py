"""The local backend: supervised worker processes on a safe start method (a transport on engine/core).

How data flows::

    caller thread (kernel)        manager thread (one per pool)            worker process (N)
    ──────────────────────        ─────────────────────────────            ──────────────────
    Pool.run(f, items)
      submit(Job) ──► commands ──► wait(wake pipe, every worker's
                                        pipe and process sentinel)
                                   (one epoll set, kept up to date)
                                   schedule: job.next_items(size)
                                   LoadFunction (once per worker and   ──► reader thread ──► inbox
                                     function version, out-of-band        (envelopes only: no
                                     buffers as raw frames)                user code, no imports)
                                   SetContext (cwd, env, sys.path,            │
                                     threads; once per map context)           ▼
                                   RunChunk (≤ 2 in flight/worker)     ──► main thread decodes items,
                                                                            applies the context, runs
                                   ChunkDone: results (buffers out     ◄──  items, captures print(),
                                     of band), errors, output, times        times them, packs errors
                                   job.chunk_done ─► report.results[i:j]
      job.wait() ◄── notify ──────┘
      reads a stream's items (never the manager: user code
      must not stall the pool), prints output in item order
    KeyboardInterrupt
      cancel(job) ──► commands ──► kill the workers running its items,
                                   start replacements (a fork of the
                                   warm forkserver: milliseconds)
                                   sentinel fires (crash) / deadline
                                   passes (timeout) ─► the running
                                   items fail, queued ones are re-queued,
                                   the worker's process group is killed
                                   and the worker replaced

Into an idle warm pool the caller's thread does the manager's scheduling
itself, under the manager's lock (Manager.add_direct: no wake-up and turn
before the first chunk leaves), then wakes the manager for its turn.

Every wait is on pipes and process sentinels together, so a death is seen the
moment it happens, never after a poll interval. Nothing listens on TCP.

Why not multiprocessing.Pool or ProcessPoolExecutor: neither can kill and
replace one worker, Pool hangs on a dead worker, and neither caches a function
per worker. Processes, pipes and start methods still come from the stdlib
(see docs/design.md).

The parts, each an object LocalBackend holds (composition, no mixins):
backend.py (the Backend interface), manager.py (the loop, the running maps,
scheduling through core/schedule.py), workers.py (the transport: processes,
pipes, sentinels), outcomes.py (replies, deaths, deadlines, the memory
guard, applying core/failures.py).
"""
from __future__ import annotations

from ..core.schedule import TIMED_ABOVE_S, WINDOW  # noqa: F401  (old import path)
from .backend import LocalBackend, _check_start_method  # noqa: F401

__all__ = ["LocalBackend", "TIMED_ABOVE_S", "WINDOW"]
