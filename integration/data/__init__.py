"""Text-classification data: the built-in tasks, a user's own files, and seeded splits.

Everything lives in :mod:`.loaders`; this room's public names are re-exported here.
"""

from __future__ import annotations

from .loaders import (
    SPLIT_SEED,
    TASKS,
    DataError,
    Examples,
    default_data_dir,
    dirichlet_split,
    hold_out,
    load_examples,
    load_task,
    sample,
)

__all__ = [
    "SPLIT_SEED",
    "TASKS",
    "DataError",
    "Examples",
    "default_data_dir",
    "dirichlet_split",
    "hold_out",
    "load_examples",
    "load_task",
    "sample",
]
