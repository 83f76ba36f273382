"""Long maps lose nothing: ``--resume`` (resume.py) and ``--checkpoint`` (checkpointing.py).

The names api.py imports from here. Each lives in the module of its job:
resume.py (a report's kept results and its items' keys), checkpointing.py (a
checkpoint file loaded and written as chunks finish), itemkeys.py (the items'
keys as stored and compared), checkpointfile.py and checkpointformat.py (the file).
"""
from __future__ import annotations

from .checkpointing import Checkpoint
from .resume import SeenItems, resume_report

__all__ = ["Checkpoint", "SeenItems", "resume_report"]
