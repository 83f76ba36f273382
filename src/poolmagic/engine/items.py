"""Old path of ``core/items.py``, kept for the tests that import it from here."""
from .core.items import MAX_READ_AHEAD, SEQUENCES, ItemSource  # noqa: F401  (re-exported)
