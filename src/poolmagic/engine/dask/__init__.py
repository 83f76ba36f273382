"""The dask backend: the same maps on a dask.distributed cluster (see backend.py for the picture).

backend.py (DaskBackend: the public face and the manager thread's loop), and
the parts it holds: state.py (what they share), link.py (the cluster, its
client and workers; its words in connecterror.py and statusline.py, its
workers' marks in marks.py), scheduling.py (chunks to workers), outcomes.py
(results, deaths, deadlines, cancels), memory.py (the memory guard), scale.py
(growing and shrinking our LocalCluster). What runs in a worker: task.py (one
chunk, through runchunk.run_chunk), draws.py, preload.py; plumbing.py,
forkserver.py, address.py and env.py talk to dask and the operating system.

Imports nothing itself: a dask worker imports ``dask.task`` alone.
"""
