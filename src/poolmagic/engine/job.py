"""Old path of ``core/job.py``, kept for the dask modules and tests that import it from here."""
from .core.job import ItemTimes, Job, write_outputs  # noqa: F401  (re-exported)
from .core.schedule import MAX_CHUNK, MIN_CHUNK_S, STREAM_MAX_CHUNK, TARGET_CHUNK_S  # noqa: F401  (re-exported)
