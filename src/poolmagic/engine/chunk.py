"""Old path of ``core/chunk.py``, kept for dasktask.py, which imports it from here."""
from .core.chunk import PKG_DIR, pack_results, run_chunk  # noqa: F401  (re-exported)
