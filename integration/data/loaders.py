"""Text-classification data: the built-in tasks of ../shared/data, a user's own files, splits.

Built-in loaders survive the files' real-world quirks (Latin-1 bytes, NEL characters, CoLA
without a header). A user's own data (:func:`load_examples`) is a TSV, CSV or JSONL file with
named text / text-pair / label columns, or a local Hugging Face ``datasets`` folder
(``save_to_disk``; needs ``datasets``); a bad row raises :class:`DataError` naming the file,
line and column. Splits are seeded: Dirichlet(alpha) label skew over clients.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glora_math.errors import GloraError


class DataError(GloraError):
    """A data file or folder that cannot be read as examples (names file, line and column)."""


#: The built-in tasks (GLUE and the sentence tasks of ../shared/data).
# The seed of the fixed train/dev split of the single-file sentence tasks (MR, SUBJ, CR, MPQA):
# one split for every experiment, independent of the experiment seed.
SPLIT_SEED = 0

TASKS = ("sst2", "sst-2", "cola", "rte", "mr", "subj", "cr", "mpqa", "trec")


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
    """The built-in tasks' folder: ``$GLORA_DATA``, else a ``shared/data`` folder.

    Looked for beside the repository, then in the working directory and its parent.

    Raises
    ------
    DataError
        If none exists (pass ``--data-dir`` or set ``GLORA_DATA``).
    """
    env = os.environ.get("GLORA_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]  # the folder holding integration/
    cwd = Path.cwd()
    for cand in (here / "shared" / "data", here.parent / "shared" / "data",
                 cwd / "shared" / "data", cwd.parent / "shared" / "data"):  # fmt: skip
        if cand.is_dir():
            return cand
    raise DataError(
        "no data folder for the built-in tasks: pass --data-dir (data_dir=...) or set "
        "GLORA_DATA to the folder holding glue/ and sentence/, or use your own files "
        "(--train-file, --eval-file)"
    )


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
    root = Path(data_dir) if data_dir else default_data_dir()
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
        if task in files:
            # Single-file tasks: a fixed 90/10 split of a fixed shuffle. The files are sorted
            # by label, so an unshuffled cut would leave one class in the dev split.
            order = np.random.default_rng(SPLIT_SEED).permutation(len(labels)).tolist()
            cut = int(0.9 * len(labels))
            keep = order[:cut] if split == "train" else order[cut:]
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return Examples(texts, labels)


def hold_out(ex: Examples, n: int) -> tuple[Examples, Examples]:
    """``(rest, test)``: ``n`` examples set aside as a test set that nothing trains on.

    The held-out rows are fixed by :data:`SPLIT_SEED` alone, so every experiment seed, every
    operator and every run of a study sees the same test set, and no seed's training sample
    can contain a test row. ``n`` must leave at least one example to train on.
    """
    if not 0 < n < len(ex):
        raise DataError(f"a held-out test set of {n} examples needs 0 < n < {len(ex)}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(ex)).tolist()
    test = sorted(order[:n])
    rest = sorted(order[n:])
    return ex.subset(rest), ex.subset(test)


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


def _rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(line number, row) of a TSV, CSV or JSONL file (a header row names TSV/CSV columns)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as fh:
            for no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{no}: not a JSON object per line ({err.msg})"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}:{no}: expected a JSON object, got {type(row).__name__}"
                    )
                yield no, row
        return
    if suffix not in (".tsv", ".csv", ".txt"):
        raise DataError(f"{path}: unknown format {suffix!r} (use .tsv, .csv or .jsonl)")
    with path.open(encoding="utf-8", newline="") as fh:
        delim = "," if suffix == ".csv" else "\t"
        reader = csv.DictReader(fh, delimiter=delim)
        for row in reader:
            if None in row:  # more fields than the header names
                raise DataError(
                    f"{path}:{reader.line_num}: {len(row[None]) + len(reader.fieldnames or [])} "
                    f"fields, the header names {len(reader.fieldnames or [])}"
                )
            yield reader.line_num, row


def _dataset_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Rows of a local Hugging Face ``datasets`` folder (``Dataset.save_to_disk``)."""
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"{path}: a datasets folder needs the datasets library (pip install datasets)"
        )
    import datasets  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: PLC0415

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{path}: a DatasetDict with splits {sorted(ds)}; pass the split's folder "
            f"({path}/<split>)"
        )
    yield from enumerate(ds, start=1)


def load_examples(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[Examples, list[str]]:
    """A user's examples from a TSV/CSV/JSONL file or a local ``datasets`` folder.

    ``text_column`` (and ``text_pair_column`` for pairs, joined as ``"a [SEP] b"`` like the
    built-in RTE) and ``label_column`` name the columns. Labels are integers ``0..C-1`` or
    names; names are numbered in sorted order, or by ``label_names`` (pass the training
    file's to an evaluation file, so both use one numbering). Returns the examples and the
    label names (``label_names[i]`` is the name of label ``i``).

    Raises
    ------
    DataError
        Naming the file, the line and the column of the first bad row (missing column, empty
        text, unknown label), or a file that does not exist.
    """
    src = Path(path)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    rows = _dataset_rows(src) if src.is_dir() else _rows(src)
    texts: list[str] = []
    raw: list[tuple[int, str]] = []
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + [label_column]
    for no, row in rows:
        for col in columns:
            if col not in row or row[col] is None or str(row[col]).strip() == "":
                have = sorted(str(k) for k in row)
                raise DataError(f"{src}:{no}: column {col!r} is missing or empty (columns: {have})")
        text = str(row[text_column])
        if text_pair_column:
            text = f"{text} [SEP] {row[text_pair_column]}"
        texts.append(text)
        raw.append((no, str(row[label_column]).strip()))
    if not texts:
        raise DataError(f"{src}: no examples")
    names = list(label_names) if label_names is not None else None
    if names is None:
        values = {v for _, v in raw}
        if all(v.lstrip("-").isdigit() for v in values):
            ints = sorted(int(v) for v in values)
            if ints[0] < 0:
                raise DataError(f"{src}: column {label_column!r}: negative label {ints[0]}")
            names = [str(i) for i in range(ints[-1] + 1)]
        else:
            names = sorted(values)
    index = {n: i for i, n in enumerate(names)}
    labels = []
    for no, v in raw:
        key = str(int(v)) if v.lstrip("-").isdigit() and v not in index else v
        if key not in index:
            raise DataError(
                f"{src}:{no}: column {label_column!r}: label {v!r} is not one of {names[:10]}"
            )
        labels.append(index[key])
    return Examples(texts, labels), names
