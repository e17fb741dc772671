"""The built-in tasks from the Hugging Face Hub by name (``--data-dir hub``): downloads.

Used only when asked (``data_dir="hub"``); the tests never fetch. The Hub's datasets have
their own splits (GLUE's train / validation; the sentence tasks' train / test), so results
are not comparable with the local layout's fixed 90/10 cuts (:data:`~.loaders.TASK_FILES`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .loaders import DataError, Examples


@dataclass(frozen=True)
class HubTask:
    """Where a built-in task lives on the Hub and which columns hold text and label."""

    path: str
    name: str | None
    text: str
    label: str = "label"
    pair: str | None = None
    dev: str = "validation"


#: The built-in tasks on the Hub (RTE's labels there: 0 entailment, 1 not, as the local files).
HUB: dict[str, HubTask] = {
    "sst2": HubTask("nyu-mll/glue", "sst2", "sentence"),
    "cola": HubTask("nyu-mll/glue", "cola", "sentence"),
    "rte": HubTask("nyu-mll/glue", "rte", "sentence1", pair="sentence2"),
    "mr": HubTask("cornell-movie-review-data/rotten_tomatoes", None, "text"),
    "subj": HubTask("SetFit/subj", None, "text", dev="test"),
    "cr": HubTask("SetFit/CR", None, "text", dev="test"),
    "mpqa": HubTask("SetFit/mpqa", None, "text", dev="test"),
    "trec": HubTask("CogComp/trec", None, "text", label="coarse_label", dev="test"),
}


def load_hub_task(task: str, split: str) -> Examples:
    """One split (``train`` or ``dev``) of a built-in task from the Hub (``datasets``)."""
    key = {"sst-2": "sst2"}.get(task.lower(), task.lower())
    if key not in HUB:
        raise DataError(f"unknown task {task!r}; the built-in tasks are {', '.join(HUB)}")
    try:
        datasets: Any = importlib.import_module("datasets")
    except ImportError:
        raise DataError("--data-dir hub needs the `datasets` package: pip install "
                        "'glora-math[data]'") from None  # fmt: skip
    spec = HUB[key]
    which = "train" if split == "train" else spec.dev
    try:
        rows = datasets.load_dataset(spec.path, spec.name, split=which)
    except Exception as err:  # the Hub's own errors (network, missing dataset) as one line
        raise DataError(f"task {key!r} from the Hub ({spec.path}): "
                        f"{type(err).__name__}: {err}"[:300]) from None  # fmt: skip
    texts = [str(t) for t in rows[spec.text]]
    if spec.pair is not None:
        texts = [f"{a} [SEP] {b}" for a, b in zip(texts, rows[spec.pair], strict=True)]
    return Examples(texts, [int(y) for y in rows[spec.label]])


__all__ = ["HUB", "HubTask", "load_hub_task"]
