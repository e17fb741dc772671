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
import io
import json
import os
import warnings
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

#: Where each built-in task's files are inside a data folder: (train file, dev file). The
#: single-file sentence tasks are cut 90/10 by a fixed shuffle (SPLIT_SEED); TREC's dev split
#: is its test file.
TASK_FILES: dict[str, tuple[str, str]] = {
    "sst2": ("glue/SST-2/train.tsv", "glue/SST-2/dev.tsv"),
    "cola": ("glue/CoLA/train.tsv", "glue/CoLA/dev.tsv"),
    "rte": ("glue/RTE/train.tsv", "glue/RTE/dev.tsv"),
    "mr": ("sentence/rt-polarity.all", "sentence/rt-polarity.all"),
    "subj": ("sentence/subj.all", "sentence/subj.all"),
    "cr": ("sentence/custrev.all", "sentence/custrev.all"),
    "mpqa": ("sentence/mpqa.all", "sentence/mpqa.all"),
    "trec": ("sentence/TREC.train.all", "sentence/TREC.test.all"),
}


def task_file(task: str, split: str, root: Path) -> Path:
    """The file of one split of a built-in task in ``root``.

    Raises :class:`DataError` saying which file is expected where (``glora data`` shows the
    whole layout).
    """
    name = {"sst-2": "sst2"}.get(task.lower(), task.lower())
    if name not in TASK_FILES:
        raise DataError(f"unknown task {task!r}; the built-in tasks are {', '.join(TASK_FILES)}")
    path = root / TASK_FILES[name][0 if split == "train" else 1]
    if not path.is_file():
        raise DataError(f"task {name!r} ({split}): {path} is missing; the data folder must "
                        "follow the layout that `glora data` prints")  # fmt: skip
    return path


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
        "GLORA_DATA to the folder holding glue/ and sentence/ (`glora data` prints the "
        "layout), pass --data-dir hub to download the tasks from the Hugging Face Hub, or use "
        "your own files (--train-file, --eval-file)"
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
    ``mpqa``, ``trec``, from a data folder laid out as :data:`TASK_FILES` (``data_dir``, else
    :func:`default_data_dir`), or from the Hugging Face Hub with ``data_dir="hub"``
    (:func:`integration.data.hub.load_hub_task`: downloads, so only when asked).
    """
    if str(data_dir) == "hub":
        return load_hub_task(task, split)
    root = Path(data_dir) if data_dir else default_data_dir()
    task = task.lower()
    path = task_file(task, split, root)
    try:
        return _parse_task(task, split, path)
    except (ValueError, IndexError) as err:
        raise DataError(f"task {task!r}: {path} is not in the task's format "
                        f"({type(err).__name__}: {err})"[:300]) from None  # fmt: skip


def _parse_task(task: str, split: str, path: Path) -> Examples:
    texts: list[str] = []
    labels: list[int] = []
    if task in ("sst2", "sst-2"):
        lines = _read_lines(path)
        for line in lines[1:]:
            sent, _, lab = line.rpartition("\t")
            texts.append(sent)
            labels.append(int(lab))
    elif task == "cola":
        for line in _read_lines(path):
            parts = line.split("\t")
            labels.append(int(parts[1]))
            texts.append(parts[3])
    elif task == "rte":
        lines = _read_lines(path)
        for line in lines[1:]:
            _, s1, s2, lab = line.split("\t")
            texts.append(f"{s1} [SEP] {s2}")
            labels.append(0 if lab == "entailment" else 1)
    else:
        lines = _read_lines(path)
        for line in lines:
            lab, _, sent = line.partition(" ")
            labels.append(int(lab))
            texts.append(sent)
        if task != "trec":
            # Single-file tasks: a fixed 90/10 split of a fixed shuffle. The files are sorted
            # by label, so an unshuffled cut would leave one class in the dev split.
            order = np.random.default_rng(SPLIT_SEED).permutation(len(labels)).tolist()
            cut = int(0.9 * len(labels))
            keep = order[:cut] if split == "train" else order[cut:]
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return Examples(texts, labels)


# ----------------------------------------------------------------------------------------------
# The built-in tasks from the Hugging Face Hub by name (``--data-dir hub``): downloads, so only
# when asked; the tests never fetch. The Hub's datasets have their own splits (GLUE's train /
# validation; the sentence tasks' train / test), so results are not comparable with the local
# layout's fixed 90/10 cuts (TASK_FILES).


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


def _text(path: Path) -> str:
    """The file as text: UTF-8, a byte-order mark dropped (Excel writes one), or a DataError."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
        ) from None


def _rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(line number, row) of a TSV, CSV or JSONL file (a header row names TSV/CSV columns).

    UTF-8 with or without a byte-order mark. TSV is read as GLUE's own readers read it, with
    no quote character (a field may begin with an unbalanced ``"``); CSV with standard quoting.
    """
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".txt", ".jsonl", ".json", ".ndjson"):
        raise DataError(f"{path}: unknown format {suffix!r} (use .tsv, .csv or .jsonl)")
    text = _text(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        for no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{no}: not a JSON object per line ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{no}: expected a JSON object, got {type(row).__name__}")
            yield no, row
        return
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=",")
    else:
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE
        )
    try:
        for row in reader:
            if None in row:  # more fields than the header names
                raise DataError(
                    f"{path}:{reader.line_num}: {len(row[None]) + len(reader.fieldnames or [])} "
                    f"fields, the header names {len(reader.fieldnames or [])}"
                )
            yield reader.line_num, row
    except csv.Error as err:  # e.g. a field over the csv module's size limit
        raise DataError(f"{path}:{reader.line_num}: {err}") from None


def _dataset_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Rows of a local Hugging Face ``datasets`` folder (``Dataset.save_to_disk``)."""
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json",
                                                       "dataset_dict.json")):  # fmt: skip
        raise DataError(
            f"{path}: a folder that is not a saved datasets dataset (no dataset_info.json, "
            "state.json or dataset_dict.json); pass a .tsv/.csv/.jsonl file or a folder "
            "written by Dataset.save_to_disk"
        )
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


#: Integer labels above this are refused: a classification head of that many classes is not
#: what a sentence task means, and the label names would be built one per integer.
MAX_CLASSES = 10_000


def _label_names(src: Path, column: str, raw: Sequence[tuple[int, str]]) -> list[str]:
    """The label vocabulary of a file's labels (integers 0..C-1, or names in sorted order)."""
    values = {v for _, v in raw}
    ints = {v for v in values if v.lstrip("-").isdigit()}
    if ints and ints != values:  # a typo such as "pos" among 0/1
        odd = next((no, v) for no, v in raw if v not in ints)
        raise DataError(
            f"{src}:{odd[0]}: column {column!r}: label {odd[1]!r} among integer labels "
            f"{sorted(ints, key=int)[:5]}; fix the row or pass label_names"
        )
    if ints:
        numbers = sorted(int(v) for v in ints)
        if numbers[0] < 0:
            raise DataError(f"{src}: column {column!r}: negative label {numbers[0]}")
        if numbers[-1] >= MAX_CLASSES:
            no = next(no for no, v in raw if int(v) == numbers[-1])
            raise DataError(
                f"{src}:{no}: column {column!r}: label {numbers[-1]} is not a class index "
                f"(labels are the integers 0..C-1, C <= {MAX_CLASSES})"
            )
        return [str(i) for i in range(numbers[-1] + 1)]
    return sorted(values)


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
        names = _label_names(src, label_column, raw)
        if len({v for _, v in raw}) < 2:
            raise DataError(
                f"{src}: column {label_column!r}: every row has the label {raw[0][1]!r}; a "
                "classifier needs at least two classes"
            )
    index = {n: i for i, n in enumerate(names)}
    labels = []
    for no, v in raw:
        key = str(int(v)) if v.lstrip("-").isdigit() and len(v) < 20 and v not in index else v
        if key not in index:
            raise DataError(
                f"{src}:{no}: column {label_column!r}: label {v!r} is not one of {names[:10]}"
            )
        labels.append(index[key])
    _report_rare(src, label_column, raw, labels)
    return Examples(texts, labels), names


#: A class with at most this many rows among at least RARE_ROWS rows is reported (a typo?).
RARE_COUNT, RARE_ROWS = 1, 1000


class RareLabelWarning(UserWarning):
    """A class that appears (almost) only once in a large file: often a typo in a label."""


def _report_rare(src: Path, column: str, raw: Sequence[tuple[int, str]], labels: list[int]) -> None:
    if len(labels) < RARE_ROWS:
        return
    counts = np.bincount(np.asarray(labels))
    for y, n in enumerate(counts.tolist()):
        if 0 < n <= RARE_COUNT:
            no, v = next((no, v) for (no, v), lab in zip(raw, labels, strict=True) if lab == y)
            warnings.warn(
                RareLabelWarning(
                    f"{src}:{no}: column {column!r}: label {v!r} appears {n} time(s) in "
                    f"{len(labels)} rows; if it is a typo, fix the row, or fix the vocabulary "
                    "with --labels"
                ),
                stacklevel=3,
            )
