"""The backend-neutral engine: what every backend does the same way (see transport.py for the picture).

job.py (one map's state), results.py (what its answers write in its record),
rerun.py (what of it runs again: requeued chunks, isolating, --retries),
items.py (where its items come from),
schedule.py (chunk sizes, the window, which map a worker serves next),
failures.py (what a failed chunk, a lost worker or a cancel does), events.py
(what a map tells its observers), output.py (worker output in item order),
caller.py (the caller's wait), chunk.py (running a chunk in a worker: the
worker side), exits.py (stopping started backends at exit).

Imports nothing itself: a worker process imports ``core.chunk`` alone.
"""
