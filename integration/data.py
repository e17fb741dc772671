"""Text-classification data from ../shared/data and federated splits.

Loaders survive the files' real-world quirks (Latin-1 bytes, NEL characters, CoLA without a
header). Splits are seeded: Dirichlet(alpha) label skew over clients, or one task per client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Examples:
    """Sentences (or sentence pairs joined by the tokenizer) and integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int]) -> Examples:
        """The examples at positions ``idx``."""
        return Examples([self.texts[i] for i in idx], [self.labels[i] for i in idx])


def default_data_dir() -> Path:
    """``$GLORA_DATA`` or the ``shared/data`` folder beside the repository."""
    env = os.environ.get("GLORA_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    for cand in (here / "shared" / "data", here.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("no shared/data folder found; set GLORA_DATA")


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    # NEL (U+0085) is a line break for str.splitlines(): split on '\n' only.
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def load_task(task: str, split: str, data_dir: Path | None = None) -> Examples:
    """Load one split (``train`` or ``dev``) of a task.

    Tasks: ``sst2``, ``cola``, ``rte`` (GLUE) and the sentence tasks ``mr``, ``subj``, ``cr``,
    ``mpqa``, ``trec``.
    """
    root = data_dir or default_data_dir()
    task = task.lower()
    texts: list[str] = []
    labels: list[int] = []
    if task in ("sst2", "sst-2"):
        lines = _read_lines(
            root / "glue" / "SST-2" / f"{'train' if split == 'train' else 'dev'}.tsv"
        )
        for line in lines[1:]:
            sent, _, lab = line.rpartition("\t")
            texts.append(sent)
            labels.append(int(lab))
    elif task == "cola":
        for line in _read_lines(
            root / "glue" / "CoLA" / f"{'train' if split == 'train' else 'dev'}.tsv"
        ):
            parts = line.split("\t")
            labels.append(int(parts[1]))
            texts.append(parts[3])
    elif task == "rte":
        lines = _read_lines(root / "glue" / "RTE" / f"{'train' if split == 'train' else 'dev'}.tsv")
        for line in lines[1:]:
            _, s1, s2, lab = line.split("\t")
            texts.append(f"{s1} [SEP] {s2}")
            labels.append(0 if lab == "entailment" else 1)
    else:
        files = {
            "mr": "rt-polarity.all",
            "subj": "subj.all",
            "cr": "custrev.all",
            "mpqa": "mpqa.all",
        }
        if task == "trec":
            name = "TREC.train.all" if split == "train" else "TREC.test.all"
        elif task in files:
            name = files[task]
        else:
            raise ValueError(f"unknown task {task!r}")
        lines = _read_lines(root / "sentence" / name)
        for line in lines:
            lab, _, sent = line.partition(" ")
            labels.append(int(lab))
            texts.append(sent)
        if task in files:  # single-file tasks: a fixed 90/10 split
            cut = int(0.9 * len(labels))
            sl = slice(0, cut) if split == "train" else slice(cut, None)
            texts, labels = texts[sl], labels[sl]
    return Examples(texts, labels)


def sample(ex: Examples, n: int, seed: int) -> Examples:
    """A seeded subsample of at most ``n`` examples."""
    if n >= len(ex):
        return ex
    g = torch.Generator().manual_seed(seed)
    return ex.subset(torch.randperm(len(ex), generator=g)[:n].tolist())


def dirichlet_split(labels: list[int], n_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Label-skew split: each class is divided over clients by Dirichlet(alpha) proportions.

    Every client gets at least one example (re-drawn until it does, at most 100 times).
    """
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = [i for i, y in enumerate(labels) if y == c]
            idx = [idx[j] for j in rng.permutation(len(idx))]
            props = rng.dirichlet([alpha] * n_clients)
            cuts = np.round(np.cumsum(props) * len(idx)).astype(int).tolist()
            start = 0
            for k in range(n_clients):
                parts[k].extend(idx[start : cuts[k]])
                start = cuts[k]
        if all(parts):
            return [sorted(p) for p in parts]
    raise ValueError(f"could not give every one of {n_clients} clients an example")
