"""The configuration of a simulated federated run: fields, checks, command line.

:class:`SimConfig` is everything that defines a run (saved with every checkpoint); its
:meth:`~SimConfig.problems` are reported before any model or data is loaded; ``parse_args``
turns ``glora simulate`` flags into one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from glora_math.errors import GloraError
from glora_math.operators import get_operator, list_operators, parse_options

from ..data import TASKS


@dataclass
class SimConfig:
    """Everything that defines a run (saved with every checkpoint)."""

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
    operator: str = "glora_auto"
    participation: float = 1.0
    seed: int = 0
    device: str = "cpu"
    max_train: int = 2000
    max_eval: int = 400
    # > 0: this many training examples are set aside (fixed by data.SPLIT_SEED, the same for
    # every seed) as a held-out test set that no client trains on and no choice looks at; the
    # global model is evaluated on it every round (test_accuracy, test_loss) beside the
    # validation set (the task's dev split, max_eval). 0: no test set.
    test_holdout: int = 0
    # False: the test rows are still held out (the same training pool) but not evaluated, as
    # in a sweep that must choose on validation alone (and need not pay for test evaluations).
    evaluate_test: bool = True
    max_len: int = 64
    target_modules: list[str] | None = None  # None: query,value (BERT-style), q_proj,v_proj (LM)
    objective: str = "classification"  # or "causal_lm": instruction tuning (SmolLM2)
    out: str = "out/simulate"
    # Every client starts from the rank-r_i part of ONE server-drawn LoRA init (B = 0, A the
    # first r_i rows of one draw at the largest client rank), as every federated LoRA system
    # broadcasts one initial adapter. True: each client draws its own A (an ablation).
    per_client_init: bool = False
    # GLoRA family: a ResidualWarning (recorded in the round's row) per module whose certified
    # relative residual exceeds this; <= 0 disables the warning.
    max_residual: float = 0.2
    # GLoRA family: the randomized consensus (glora_math.Sketch defaults) instead of the exact.
    sketch: bool = False
    # Operators with a "tol" option (glora_auto_rank): the certified-residual tolerance; None
    # keeps the operator's default.
    tol: float | None = None
    # Any operator option by name (e.g. {"lam": 0.02, "steps": 10} for LoRA-FAIR), passed to the
    # operator as is; it wins over max_residual, tol and sketch above.
    options: dict[str, float] | None = None
    # Counterfactual rounds: these (stateless) operators also aggregate every round's very
    # uploads; each resulting global model is evaluated (on the test set if there is one, else
    # on the validation set) and recorded in the round's row, and the run itself goes on with
    # `operator` unchanged.
    counterfactual: list[str] | None = None
    # Also write the global adapter after every round (out/rounds/<k>/); the final one is
    # always written to out/global_adapter.
    save_every_round: bool = False
    # > 0: each client uploads its factors in a random gauge (B G, G^-1 A), G random invertible
    # with this condition number, seeded by (seed, round, client). Products are unchanged.
    scramble_gauge: float = 0.0
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

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty if nothing); checked before any loading."""
        positive = ("clients", "rounds", "local_steps", "batch_size", "rank", "max_train",
                    "max_eval", "max_len")  # fmt: skip
        out = [f"--{n.replace('_', '-')} must be >= 1, got {getattr(self, n)}"
               for n in positive if getattr(self, n) < 1]  # fmt: skip
        ranks = self.client_ranks
        rules: list[tuple[bool, str]] = [
            (not self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (not self.dirichlet > 0, f"--dirichlet must be > 0, got {self.dirichlet}"),
            (not 0 < self.participation <= 1,
             f"--participation must be in (0, 1], got {self.participation}"),
            (ranks is not None and len(ranks) != self.clients,
             f"--client-ranks gives {len(ranks or [])} ranks for {self.clients} clients"),
            (ranks is not None and any(r < 1 for r in ranks),
             f"--client-ranks must all be >= 1, got {ranks}"),
            (self.server_rank is not None and self.server_rank < 1,
             f"--server-rank must be >= 1, got {self.server_rank}"),
            (self.tol is not None and not 0 < self.tol < 1,
             f"--tol must be in (0, 1), got {self.tol}"),
            (self.scramble_gauge < 0 or 0 < self.scramble_gauge < 1,
             f"--scramble-gauge must be 0 or a condition number >= 1, got {self.scramble_gauge}"),
            (self.threads < 0, f"--threads must be >= 0, got {self.threads}"),
            (self.test_holdout < 0, f"--test-holdout must be >= 0, got {self.test_holdout}"),
            (self.test_holdout > 0 and self.objective != "classification",
             "--test-holdout: a held-out test set is built for classification only"),
            (self.objective not in ("classification", "causal_lm"),
             f"--objective must be classification or causal_lm, got {self.objective!r}"),
            (self.operator not in list_operators(),
             f"--operator {self.operator!r} is not one of {list_operators()}"),
            (any(o not in list_operators() or get_operator(o).stateful
                 for o in self.counterfactual or []),
             f"--counterfactual {self.counterfactual}: each must be a registered operator that "
             "keeps no state between rounds"),
            (bool(self.counterfactual) and self.objective != "classification",
             "--counterfactual: classification only"),
            (bool(self._unknown_options()),
             f"--options {self._unknown_options()}: operator {self.operator!r} takes "
             f"{self._known_options()}"),
            ((self.train_file is None) != (self.eval_file is None),
             "--train-file and --eval-file go together"),
            (self.train_file is not None and self.objective == "causal_lm",
             "--train-file: instruction tuning needs a built-in task's template"),
            (self.train_file is None and self.task.lower() not in TASKS,
             f"--task {self.task!r} is not one of {sorted(TASKS)} (or use --train-file and "
             "--eval-file)"),
        ]  # fmt: skip
        return out + [msg for bad, msg in rules if bad]

    def _known_options(self) -> list[str]:
        if self.operator not in list_operators():
            return []
        return sorted(get_operator(self.operator).options)

    def _unknown_options(self) -> list[str]:
        if self.operator not in list_operators():
            return []
        return sorted(set(self.options or {}) - set(self._known_options()))

    def check(self) -> None:
        """Raise a :class:`ConfigError` listing every problem of these settings."""
        found = self.problems()
        if found:
            raise ConfigError("; ".join(found))

    def modules(self) -> list[str]:
        """The LoRA target modules (the objective's default when not set)."""
        if self.target_modules:
            return list(self.target_modules)
        return ["q_proj", "v_proj"] if self.objective == "causal_lm" else ["query", "value"]

    def ranks(self) -> list[int]:
        """Each client's LoRA rank."""
        return list(self.client_ranks) if self.client_ranks else [self.rank] * self.clients


class ConfigError(GloraError):
    """Settings of a run that cannot work (reported before any model or data is loaded)."""


#: Fields that do not change a run's results (where it writes, how fast it runs).
NOT_RESULTS = ("out", "device", "threads", "data_dir", "save_every_round")


def results_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The result-defining fields of a saved config; a field it lacks counts as its default."""
    full = asdict(SimConfig()) | dict(cfg)
    return {k: v for k, v in full.items() if k not in NOT_RESULTS}


_HELP = {
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
    "client_ranks": "comma-separated per-client LoRA ranks, e.g. 2,4,8",
    "server_rank": "server rank R (default: the largest client rank)",
    "operator": "aggregation operator (glora_math.operators)",
    "participation": "fraction of clients sampled each round",
    "seed": "run seed (data split, shared init, batches, sampling)",
    "device": "torch device, e.g. cpu or cuda",
    "max_train": "training examples drawn from the task",
    "max_eval": "validation examples drawn from the task's dev split (or --eval-file)",
    "test_holdout": "training examples set aside as a held-out test set, the same for every "
    "seed, never trained on, evaluated every round (0: none)",
    "evaluate_test": "evaluate the held-out test set every round (--no-evaluate-test: hold "
    "it out but never evaluate it, as a sweep that chooses on validation does)",
    "max_len": "token length cap",
    "target_modules": "comma-separated LoRA target modules (default: query,value; "
    "q_proj,v_proj for causal LMs)",
    "objective": "classification or causal_lm (instruction tuning)",
    "out": "output folder (checkpoints, results.json, plots)",
    "per_client_init": "each client draws its own initial LoRA A (an ablation; default: one "
    "shared initial adapter, as every federated LoRA system broadcasts)",
    "max_residual": "GLoRA family: warn (ResidualWarning, in the round's row) when a module's "
    "certified relative residual exceeds this; <= 0 turns it off",
    "sketch": "GLoRA family: the randomized consensus (subspace iteration, arXiv 0909.4061) "
    "instead of the exact one",
    "tol": "glora_auto_rank: certified relative residual tolerance (default: the operator's, 0.05)",
    "save_every_round": "also write the global adapter of every round to OUT/rounds/<k>/ (the "
    "final one always goes to OUT/global_adapter)",
    "counterfactual": "comma-separated stateless operators that also aggregate every round's "
    "same uploads; each global model is evaluated and recorded, the run goes on unchanged",
    "options": "operator options as name=value pairs, e.g. lam=0.02,steps=10 (LoRA-FAIR); any "
    "option the operator declares",
    "scramble_gauge": "> 0: every client uploads its factors in a random gauge (B G, G^-1 A) "
    "with this condition number",
    "threads": "torch intra-op threads (0: torch's default; 1 is fastest on a busy machine)",
    "data_dir": "folder of the built-in tasks (holding glue/ and sentence/; default: "
    "$GLORA_DATA, else a shared/data folder beside the repository or the working directory)",
    "train_file": "your own training data instead of --task: a .tsv/.csv (header row) or "
    ".jsonl file, or a local `datasets` folder (save_to_disk)",
    "eval_file": "your own evaluation data (same format and columns as --train-file)",
    "text_column": "column of the text in --train-file/--eval-file",
    "text_pair_column": "column of the second text of a pair (joined as 'a [SEP] b')",
    "label_column": "column of the label (integers 0..C-1 or names)",
}
_CHOICES: dict[str, list[str]] = {"objective": ["classification", "causal_lm"]}


def parse_args(argv: Sequence[str] | None = None) -> tuple[SimConfig, bool]:
    """Command-line flags -> (config, resume)."""
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="glora simulate",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        text = _HELP.get(name, "")
        if isinstance(value, bool):
            action = argparse.BooleanOptionalAction if value else "store_true"
            p.add_argument(flag, action=action, default=value, help=text)
        elif isinstance(value, list) or value is None:
            p.add_argument(flag, type=str, default=None, help=text)
        elif name == "operator":
            p.add_argument(flag, default=value, choices=list_operators(), help=text)
        else:
            p.add_argument(
                flag, type=type(value), default=value, choices=_CHOICES.get(name), help=text
            )
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoint.json")
    p.add_argument("--version", action="version", version=f"glora-math {_version()}")
    ns = p.parse_args(argv)
    kw = vars(ns)
    resume = kw.pop("resume")
    try:
        if kw["client_ranks"]:
            kw["client_ranks"] = [int(x) for x in kw["client_ranks"].split(",") if x.strip()]
        kw["server_rank"] = int(kw["server_rank"]) if kw["server_rank"] else None
        kw["tol"] = float(kw["tol"]) if kw["tol"] else None
    except ValueError as err:
        p.error(f"--client-ranks, --server-rank and --tol take numbers: {err}")
    try:
        kw["options"] = parse_options(kw["options"]) if kw["options"] else None
    except GloraError as err:
        p.error(f"--options: {err}")
    kw["target_modules"] = kw["target_modules"].split(",") if kw["target_modules"] else None
    cf = kw["counterfactual"]
    kw["counterfactual"] = [x.strip() for x in cf.split(",") if x.strip()] if cf else None
    cfg = SimConfig(**kw)
    found = cfg.problems()
    if found:
        p.error("; ".join(found))
    return cfg, resume


def _version() -> str:
    try:
        return importlib.metadata.version("glora-math")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown (not installed)"


def versions() -> dict[str, str]:
    """The versions of Python and of the packages that define a run's numbers."""
    out = {"python": platform.python_version(), "glora-math": _version()}
    for name in ("torch", "transformers", "peft", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
