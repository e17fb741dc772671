"""A run's raw record: what it holds, and when it is a finished run of its cell.

The record is ``<docs>/raw/<cell>/<run>-seed<k>.json``. This module holds the one reading
and the one check of a record, used by everything that reads one: the driver (a recorded run
is skipped; it checks the cell's records before it runs anything, and a fresh record before
it writes it), the cell's tables and the default rule (no table and no choice is made from a
record that is not a finished run of the cell's config). A record is refused, naming the file,
what is wrong and what to do, when it is not JSON, or not an object with a ``config`` and a
list of ``rounds``; when its settings differ from the run's (the device does not count); when
it is another seed's; when it holds fewer or more rounds than the run, or rounds out of order;
when a round lacks a metric every round holds (:data:`ROUND_NEEDS`, and the held-out test
accuracy and loss of a run that evaluates a test set), holds test-set metrics the run does not
evaluate, or a counterfactual arm lacks its accuracy, loss or error, or holds other operators
or splits than the run's settings ask for at that round; or when a recorded metric is not a
finite number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glora_math.errors import GloraError

from .cells import ENTRY_KEYS, run_id
from .config import SimConfig, differences

#: Per-round metrics kept in the raw JSON.
ROUND_KEYS = (
    "round",
    "accuracy",
    "eval_loss",
    "test_accuracy",
    "test_loss",
    "mcc",
    "aggregation_error",
    "aggregation_error_max",
    "certified_residual",
    "certified_residual_max",
    "server_rank",
    "server_rank_mean",
    "sides",
    "seconds",
    "eval_seconds",
    "counterfactual",
    "counterfactual_next",
    "broadcast_split",
)

#: What every round of a finished run holds, whatever its settings (``Simulation.step``).
ROUND_NEEDS = (
    "accuracy",
    "eval_loss",
    "aggregation_error",
    "server_rank",
    "server_rank_mean",
    "seconds",
)

#: What a round also holds when the run evaluates a held-out test set, and only then.
TEST_KEYS = ("test_accuracy", "test_loss")

#: The per-round scalars that must be finite numbers where recorded (``None``: not measured,
#: as the certificate of an operator that has none).
SCALAR_KEYS = (
    *ROUND_NEEDS,
    *TEST_KEYS,
    "mcc",
    "aggregation_error_max",
    "certified_residual",
    "certified_residual_max",
    "eval_seconds",
)

#: The counterfactual arms of a round (``None`` in rounds that have none): operator or split
#: name -> what its global model scored, which must hold :data:`ARM_NEEDS`.
ARM_KEYS = ("counterfactual", "counterfactual_next", "broadcast_split")
ARM_NEEDS = ("accuracy", "loss", "aggregation_error")

#: What to do about a refused record: one whose settings differ, and a damaged one.
_OTHER_SETTINGS = (
    "restore the cell's config, compute elsewhere with a fresh --out (without --docs), or "
    "delete the record deliberately to recompute the run here"
)
_DAMAGED = (
    "restore the record from version control, or delete it deliberately to recompute the run here"
)


class RecordError(GloraError):
    """A raw record that is not a finished run of its cell's config (the message says why)."""


def run_config(
    config: Mapping[str, Any], entry: Mapping[str, Any], seed: int, out: Path, device: str
) -> SimConfig:
    """The :class:`SimConfig` of one (entry, seed) of a cell: its base, the entry's settings."""
    over = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    kw = dict(config["base"]) | over | {"seed": seed, "device": device}
    kw["out"] = str(out / f"{run_id(entry)}-seed{seed}")
    return SimConfig(**kw)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _not_finite(where: str, row: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    """``"<where>'s <key> (<value>) is not a finite number"`` for the first such key."""
    for key in keys:
        if row.get(key) is not None and not _finite(row[key]):
            return f"{where}'s {key} ({row[key]!r}) is not a finite number"
    return None


def _arm_problem(k: int, row: Mapping[str, Any]) -> str | None:
    """What is wrong with round ``k``'s counterfactual arms (``None`` if nothing)."""
    for arm in ARM_KEYS:
        arms = row.get(arm)
        if arms is None:
            continue
        if not isinstance(arms, Mapping):
            return f"round {k}'s {arm} is not a JSON object"
        for name, m in arms.items():
            where = f"round {k}'s {arm} {name}"
            if not isinstance(m, Mapping):
                return f"{where} is not a JSON object"
            missing = [x for x in ARM_NEEDS if m.get(x) is None]
            if missing:
                return f"{where} lacks {', '.join(missing)}"
            bad = _not_finite(where, m, (*ARM_NEEDS, "certified_residual"))
            if bad:
                return bad
    return None


def _arms_asked(k: int, cfg: SimConfig) -> dict[str, set[str]]:
    """The operators or splits each counterfactual arm of round ``k`` holds in run ``cfg``.

    Arm (a) at every round; arm (b) and the broadcast split where
    :meth:`~integration.runner.config.SimConfig.further_arms_at` says, as the run makes them.
    """
    ops = set(cfg.counterfactual or [])
    arms = cfg.further_arms_at(k)
    return {
        "counterfactual": ops,
        "counterfactual_next": ops if arms and cfg.counterfactual_next else set(),
        "broadcast_split": set(cfg.broadcast_splits or []) if arms else set(),
    }


def _arms_differ(k: int, row: Mapping[str, Any], cfg: SimConfig) -> str | None:
    """Whether round ``k``'s arms hold other operators or splits than the run asks for."""
    for arm, want in _arms_asked(k, cfg).items():
        got = row.get(arm)
        names = set(got) if isinstance(got, Mapping) else set()
        if names != want:
            return (f"round {k}'s {arm} holds {sorted(names) or 'nothing'}, and the run's "
                    f"settings ask for {sorted(want) or 'nothing'}")  # fmt: skip
    return None


def _round_problem(k: int, row: Any, test: bool) -> str | None:
    """What is wrong with round ``k`` of a record (``None`` if nothing)."""
    if not isinstance(row, Mapping):
        return f"round {k} is not a JSON object"
    if row.get("round", k) != k:
        return f"its round {k} is numbered {row.get('round')!r}"
    missing = [key for key in (*ROUND_NEEDS, *(TEST_KEYS if test else ())) if row.get(key) is None]
    if missing:
        return f"round {k} lacks {', '.join(missing)}"
    if not test and any(key in row for key in TEST_KEYS):
        return f"round {k} holds test-set metrics, but the run evaluates no test set"
    return _not_finite(f"round {k}", row, SCALAR_KEYS) or _arm_problem(k, row)


def record_problems(rec: Any, cfg: SimConfig) -> list[str]:
    """What keeps ``rec`` (a parsed raw record) from being the finished run ``cfg``.

    Empty if nothing. Each problem is a phrase that follows the record's path ("<file> holds
    17 of the run's 20 rounds"). Settings that differ are reported alone (the rest would
    follow from them); otherwise another seed, the number of rounds and the first round that
    is wrong.
    """
    if not (
        isinstance(rec, Mapping)
        and isinstance(rec.get("config"), Mapping)
        and isinstance(rec.get("rounds"), list)
    ):
        return ["is not a raw record (a JSON object with a 'config' and a list of 'rounds')"]
    diff = differences(rec["config"], cfg)
    if diff:
        more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
        return [f"records this run with other settings ({'; '.join(diff[:3])}{more})"]
    out = []
    if "seed" in rec and rec["seed"] != cfg.seed:
        out.append(f"is the record of seed {rec['seed']!r}, not of seed {cfg.seed}")
    rounds = rec["rounds"]
    if len(rounds) != cfg.rounds:
        out.append(f"holds {len(rounds)} of the run's {cfg.rounds} rounds")
    test = cfg.test_holdout > 0 and cfg.evaluate_test
    for k, row in enumerate(rounds, start=1):
        problem = _round_problem(k, row, test) or _arms_differ(k, row, cfg)
        if problem:
            out.append(problem)
            break
    return out


def read_record(path: Path, cfg: SimConfig) -> dict[str, Any] | None:
    """The raw record at ``path`` if it is the finished run ``cfg``; ``None`` if there is none.

    Raises
    ------
    RecordError
        If the file cannot be read as JSON, or is not the finished run ``cfg``
        (:func:`record_problems`): nothing is taken from it, and nothing overwrites it.
    """
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecordError(f"{path}: unreadable raw record ({err}); {_DAMAGED}") from None
    problems = record_problems(rec, cfg)
    if problems:  # what to do: settings that differ are the config's business, damage is not
        todo = _OTHER_SETTINGS if problems[0].startswith("records this run with") else _DAMAGED
        raise RecordError(f"{path} {'; '.join(problems)}: {todo}")
    out: dict[str, Any] = rec
    return out


__all__ = [
    "ARM_KEYS",
    "ARM_NEEDS",
    "ROUND_KEYS",
    "ROUND_NEEDS",
    "SCALAR_KEYS",
    "TEST_KEYS",
    "RecordError",
    "read_record",
    "record_problems",
    "run_config",
]
