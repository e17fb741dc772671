"""The configuration of a simulated federated run: fields, checks, command line.

:class:`SimConfig` is everything that defines a run (saved with every checkpoint); its
:meth:`~SimConfig.problems` are reported before any model or data is loaded; ``parse_args``
turns ``glora simulate`` flags into one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from glora_math.errors import GloraError
from glora_math.operators import get_operator, list_operators, parse_options

from ..federated.settings import HELP, RunSettings


@dataclass
class SimConfig(RunSettings):
    """Everything that defines a simulated run (saved with every checkpoint).

    The settings it shares with the Flower app, their defaults and their checks are
    :class:`~integration.federated.settings.RunSettings`; these are the simulation's own.
    """

    device: str = "cpu"
    # > 0: this many training examples are set aside (fixed by data.SPLIT_SEED, the same for
    # every seed) as a held-out test set that no client trains on and no choice looks at; the
    # global model is evaluated on it every round (test_accuracy, test_loss) beside the
    # validation set (the task's dev split, max_eval). 0: no test set.
    test_holdout: int = 0
    # False: the test rows are still held out (the same training pool) but not evaluated, as
    # in a sweep that must choose on validation alone (and need not pay for test evaluations).
    evaluate_test: bool = True
    objective: str = "classification"  # or "causal_lm": instruction tuning (SmolLM2)
    out: str = "out/simulate"
    # GLoRA family: the randomized consensus (glora_math.Sketch defaults) instead of the exact.
    sketch: bool = False
    # Operators with a "tol" option (glora_auto_rank): the certified-residual tolerance; None
    # keeps the operator's default.
    tol: float | None = None
    # Counterfactual rounds: these (stateless) operators also aggregate every round's very
    # uploads; each resulting global model is evaluated (on the test set if there is one, else
    # on the validation set) and recorded in the round's row, and the run itself goes on with
    # `operator` unchanged.
    counterfactual: list[str] | None = None
    # Arm (b) of the counterfactual rounds: each listed operator's global model is also sent to
    # the next round's participants, trained one round further (the batches the run's own next
    # round uses) and aggregated again by that operator; recorded as "counterfactual_next".
    counterfactual_next: bool = False
    # The broadcast-split arm: after each round, the run's own global update is handed back in
    # each of these factorisations ("own": what the operator sends; "balanced", "left",
    # "right": its SVD split as U S^1/2 | S^1/2 V^T, U S | V^T, U | S V^T), trained one round
    # further and aggregated by the run's operator; recorded as "broadcast_split".
    broadcast_splits: list[str] | None = None
    # Arm (b) and the broadcast-split arm run at rounds 1, 1 + k, 1 + 2k, ... (each costs a
    # round of local training and an evaluation per operator or split).
    counterfactual_every: int = 1
    # Also write the global adapter after every round (out/rounds/<k>/); the final one is
    # always written to out/global_adapter.
    save_every_round: bool = False
    # > 0: each client uploads its factors in a random gauge (B G, G^-1 A), G random invertible
    # with this condition number, seeded by (seed, round, client). Products are unchanged.
    scramble_gauge: float = 0.0

    def further_arms_at(self, k: int) -> bool:
        """Whether arm (b) and the broadcast split run at round ``k`` (1-based).

        Rounds 1, 1 + e, 1 + 2e, ... (e = ``counterfactual_every``); the one place that says
        so, for the run that makes the arms and the record check that reads them.
        """
        return (k - 1) % self.counterfactual_every == 0

    def problems(self) -> list[str]:
        """What is wrong with these settings, as flags (empty if nothing); nothing is loaded."""
        out = [f"--{name.replace('_', '-')} = {_show(value)} {why}"
               for name, value, why in self.invalid_settings()]  # fmt: skip
        rules: list[tuple[bool, str]] = [
            (self.tol is not None and not 0 < self.tol < 1,
             f"--tol must be in (0, 1), got {self.tol}"),
            (self.scramble_gauge < 0 or 0 < self.scramble_gauge < 1,
             f"--scramble-gauge must be 0 or a condition number >= 1, got {self.scramble_gauge}"),
            (self.test_holdout < 0, f"--test-holdout must be >= 0, got {self.test_holdout}"),
            (self.test_holdout > 0 and self.objective != "classification",
             "--test-holdout: a held-out test set is built for classification only"),
            (self.objective not in ("classification", "causal_lm"),
             f"--objective must be classification or causal_lm, got {self.objective!r}"),
            (any(o not in list_operators() or get_operator(o).stateful
                 for o in self.counterfactual or []),
             f"--counterfactual {self.counterfactual}: each must be a registered operator that "
             "keeps no state between rounds"),
            (self.counterfactual_next and not self.counterfactual,
             "--counterfactual-next needs the operators of --counterfactual"),
            (any(x not in SPLITS for x in self.broadcast_splits or []),
             f"--broadcast-splits {self.broadcast_splits}: each must be one of {list(SPLITS)}"),
            (any(x != "own" for x in self.broadcast_splits or [])
             and self.operator in list_operators() and _keeps_factors(self.operator),
             f"--broadcast-splits: operator {self.operator!r} does not broadcast one update "
             "(personal, frozen or restarted factors)"),
            (bool(self.broadcast_splits) and "own" not in (self.broadcast_splits or []),
             "--broadcast-splits must include own (the reference the others are paired with)"),
            (self.counterfactual_next and self.operator not in (self.counterfactual or []),
             f"--counterfactual-next: list the run's own operator {self.operator!r} in "
             "--counterfactual (the reference of the arm)"),
            (not isinstance(self.counterfactual_every, int)
             or isinstance(self.counterfactual_every, bool) or self.counterfactual_every < 1,
             f"--counterfactual-every must be an integer >= 1, got {self.counterfactual_every!r}"),
            (self.sketch and self.operator in list_operators()
             and "sketch" not in get_operator(self.operator).options,
             f"--sketch: operator {self.operator!r} has no randomized consensus"),
            (self.train_file is not None and self.objective == "causal_lm",
             "--train-file: instruction tuning needs a built-in task's template"),
        ]  # fmt: skip
        trouble = _device_problem(self.device)
        return (
            out + [msg for bad, msg in rules if bad] + ([f"--device {trouble}"] if trouble else [])
        )

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
        return [self.rank_of(i) for i in range(self.clients)]

    def named_options(self) -> dict[str, float]:
        """``max_residual``, ``tol`` and ``sketch`` where the operator takes them.

        ``options`` wins over them (:meth:`RunSettings.operator_options`).
        """
        op = get_operator(self.operator)
        out = super().named_options()
        if "tol" in op.options and self.tol is not None:
            out["tol"] = float(self.tol)
        if self.sketch:
            if "sketch" not in op.options:
                raise ConfigError(f"--sketch: operator {op.name!r} has no randomized consensus")
            out["sketch"] = 1.0
        return out


#: The broadcast-split arm's factorisations ("own": what the run's operator sends back).
SPLITS = ("own", "balanced", "left", "right")


def _keeps_factors(operator: str) -> bool:
    """Whether clients of ``operator`` keep personal or frozen factors (nothing to re-split)."""
    op = get_operator(operator)
    return op.personal or op.restarts or op.shared_A or op.frozen is not None


def _device_problem(device: str) -> str | None:
    """What makes a torch device string unusable on this machine (None: nothing)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
    available: dict[str, Callable[[], bool]] = {"cpu": lambda: True,
                                                "cuda": torch.cuda.is_available,
                                                "mps": torch.backends.mps.is_available}  # fmt: skip
    if dev.type not in available:
        return f"{device!r}: only cpu, cuda and mps devices are supported"
    if not available[dev.type]():
        return f"{device!r} is not available on this machine (torch sees no {dev.type} device)"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def _show(value: object) -> str:
    """A setting's value as the user typed it (lists comma-separated)."""
    if isinstance(value, list):
        return ",".join(str(x) for x in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return repr(value) if isinstance(value, str) else str(value)


class ConfigError(GloraError):
    """Settings of a run that cannot work (reported before any model or data is loaded)."""


#: Fields that do not change a run's results (where it writes, how fast it runs).
NOT_RESULTS = ("out", "device", "threads", "data_dir", "save_every_round")


def results_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The result-defining fields of a saved config; a field it lacks counts as its default."""
    full = asdict(SimConfig()) | dict(cfg)
    return {k: v for k, v in full.items() if k not in NOT_RESULTS}


def differences(
    saved: Mapping[str, Any], cfg: SimConfig, *, ignore: tuple[str, ...] = ()
) -> list[str]:
    """The result-defining settings in which a saved config differs from ``cfg``.

    A saved field that is no longer a setting counts as a difference (``not a setting now``);
    the settings named in ``ignore`` are not compared.
    """
    old, new = results_config(saved), results_config(asdict(cfg))
    out = []
    for k in sorted((old.keys() | new.keys()) - set(ignore)):
        if k not in new:
            out.append(f"{k}: {old[k]!r} there, not a setting now")
        elif old.get(k) != new[k]:
            out.append(f"{k}: {old.get(k)!r} there, {new[k]!r} now")
    return out


_HELP = HELP | {
    "device": "torch device, e.g. cpu or cuda",
    "test_holdout": "training examples set aside as a held-out test set, the same for every "
    "seed, never trained on, evaluated every round (0: none)",
    "evaluate_test": "evaluate the held-out test set every round (--no-evaluate-test: hold "
    "it out but never evaluate it, as a sweep that chooses on validation does)",
    "objective": "classification or causal_lm (instruction tuning)",
    "out": "output folder (checkpoints, results.json, plots)",
    "sketch": "GLoRA family: the randomized consensus (subspace iteration, arXiv 0909.4061) "
    "instead of the exact one",
    "tol": "glora_auto_rank: certified relative residual tolerance (default: the operator's, 0.05)",
    "save_every_round": "also write the global adapter of every round to OUT/rounds/<k>/ (the "
    "final one always goes to OUT/global_adapter)",
    "counterfactual": "comma-separated stateless operators that also aggregate every round's "
    "same uploads; each global model is evaluated and recorded, the run goes on unchanged",
    "counterfactual_next": "arm (b): each --counterfactual operator's global model is also "
    "trained one round further by the next round's clients (same batches) and aggregated again",
    "broadcast_splits": "comma-separated factorisations (own, balanced, left, right) in which "
    "the run's global update is handed back and trained one round further",
    "counterfactual_every": "arm (b) and the broadcast splits at rounds 1, 1 + k, 1 + 2k, ...",
    "scramble_gauge": "> 0: every client uploads its factors in a random gauge (B G, G^-1 A) "
    "with this condition number",
}
_CHOICES: dict[str, list[str]] = {"objective": ["classification", "causal_lm"]}


class _OneDefault(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each default once: not where the text says it, not for unset ones."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False):
            return text
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> tuple[SimConfig, bool]:
    """Command-line flags -> (config, resume)."""
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="glora simulate",
        description=__doc__,
        formatter_class=_OneDefault,
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
        kw["server_rank"] = int(kw["server_rank"] or 0) or None  # 0: the largest client rank
        kw["tol"] = float(kw["tol"]) if kw["tol"] else None
    except ValueError as err:
        p.error(f"--client-ranks, --server-rank and --tol take numbers: {err}")
    try:
        kw["options"] = parse_options(kw["options"]) if kw["options"] else None
    except GloraError as err:
        p.error(f"--options: {err}")
    for name in ("target_modules", "labels"):
        kw[name] = (
            [x.strip() for x in kw[name].split(",") if x.strip()] or None if kw[name] else None
        )
    for name in ("counterfactual", "broadcast_splits"):
        cf = kw[name]
        kw[name] = [x.strip() for x in cf.split(",") if x.strip()] if cf else None
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


def _cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    """What defines a run's numbers: Python, the packages, and the processor.

    The processor is recorded because float rounding in BLAS kernels differs between
    processor families.
    """
    out = {"python": platform.python_version(), "glora-math": _version(), "cpu": _cpu_model()}
    for name in ("torch", "transformers", "peft", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
