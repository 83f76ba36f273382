"""Old path of ``core/events.py``, kept for the dask modules and tests that import it from here."""
from .core.events import ChunkFinished, ChunkRecord, ChunkStarted, ItemsFailed  # noqa: F401  (re-exported)
from .core.events import ItemsProgress, MapFinished, Waiting, WorkerReplaced  # noqa: F401  (re-exported)
