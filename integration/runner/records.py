"""A run's raw record: what it holds, and when it is a finished run of its cell.

The record is ``<docs>/raw/<cell>/<run>-seed<k>.json``. The one check of a record, used by
everything that reads one: the driver (a recorded run is skipped, a record with other settings
stops it), the cell's tables and the default rule (a table or a choice is never made from a
record that is not a finished run of the cell's config). A record is refused, naming the file
and what is wrong, when it is not a JSON object with a ``config`` and a list of ``rounds``;
when its settings differ from the run's (the device does not count); when it is another seed's;
when it holds fewer or more rounds than the run, or rounds out of order; when a round lacks the
validation accuracy, the aggregation error, or the held-out test accuracy and loss of a run
that evaluates a test set; or when a recorded metric is not a finite number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from glora_math.errors import GloraError

from .cells import ENTRY_KEYS, run_id
from .config import SimConfig, results_config

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

#: The per-round scalars that must be finite numbers where recorded (``None``: not measured,
#: as the certificate of an operator that has none).
SCALAR_KEYS = (
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


def differences(saved: Mapping[str, Any], cfg: SimConfig) -> list[str]:
    """The result-defining settings in which a saved config differs from ``cfg``.

    A saved field that is no longer a setting counts as a difference (``not a setting now``).
    """
    old, new = results_config(saved), results_config(asdict(cfg))
    out = []
    for k in sorted(old.keys() | new.keys()):
        if k not in new:
            out.append(f"{k}: {old[k]!r} there, not a setting now")
        elif old.get(k) != new[k]:
            out.append(f"{k}: {old.get(k)!r} there, {new[k]!r} now")
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def record_problems(rec: Any, cfg: SimConfig) -> list[str]:
    """What keeps ``rec`` (a parsed raw record) from being the finished run ``cfg``.

    Empty if nothing. Each problem is a phrase that follows the record's path ("<file>
    holds 17 of the run's 20 rounds"); the first problem of a kind stands for the rest.
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
    needed = ["accuracy", "aggregation_error"]
    if cfg.test_holdout > 0 and cfg.evaluate_test:
        needed += ["test_accuracy", "test_loss"]
    for k, row in enumerate(rounds, start=1):
        if not isinstance(row, Mapping):
            out.append(f"round {k} is not a JSON object")
            break
        if row.get("round", k) != k:
            out.append(f"its round {k} is numbered {row.get('round')!r}")
            break
        missing = [key for key in needed if row.get(key) is None]
        if missing:
            out.append(f"round {k} lacks {', '.join(missing)}")
            break
        bad = [key for key in SCALAR_KEYS if key in row and row[key] is not None
               and not _finite(row[key])]  # fmt: skip
        if bad:
            out.append(f"round {k} has a non-finite {', '.join(f'{b} ({row[b]!r})' for b in bad)}")
            break
    return out


def check_record(path: Path, rec: Any, cfg: SimConfig) -> None:
    """Raise :class:`RecordError` naming ``path`` and its problems, unless there are none."""
    problems = record_problems(rec, cfg)
    if problems:
        raise RecordError(f"{path} {'; '.join(problems)}")


__all__ = [
    "ROUND_KEYS",
    "SCALAR_KEYS",
    "RecordError",
    "check_record",
    "differences",
    "record_problems",
    "run_config",
]
