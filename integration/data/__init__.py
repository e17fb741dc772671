"""Text-classification data: the built-in tasks, a user's own files, and seeded splits.

Everything lives in :mod:`.loaders`; this room's public names are re-exported here.
"""

from __future__ import annotations

from .loaders import (
    HUB,
    SPLIT_SEED,
    TASK_FILES,
    TASKS,
    DataError,
    Examples,
    RareLabelWarning,
    default_data_dir,
    dirichlet_split,
    hold_out,
    load_examples,
    load_hub_task,
    load_task,
    sample,
)

__all__ = [
    "HUB",
    "SPLIT_SEED",
    "TASKS",
    "TASK_FILES",
    "DataError",
    "Examples",
    "RareLabelWarning",
    "default_data_dir",
    "dirichlet_split",
    "hold_out",
    "load_examples",
    "load_hub_task",
    "load_task",
    "sample",
]
