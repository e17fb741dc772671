"""A small synthetic cell whose raw records are what the driver writes, for table tests."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from integration.runner.cells import entries, run_id
from integration.runner.records import run_config


def synthetic_cell(raw: Path, seeds: list[int], config: dict[str, Any] | None = None) -> None:
    """Raw JSON of a small cell: FedIT, FlexLoRA (R = r, lower error), glora_auto_rank (a
    larger server rank, the lowest error) and an uncompared reference, 3 rounds each.

    Each record holds its run's settings (``CELL``'s, or ``config``'s) and the metrics every
    round of the driver's holds (test-set ones only where the run evaluates a test set).
    """
    config = config or CELL
    by_id = {run_id(e): e for e in entries(config)}
    raw.mkdir(parents=True, exist_ok=True)
    runs = {  # id: (server ranks, error, accuracy offset per seed)
        "fedit": ([4, 4, 4], 0.20, [0.0, 0.0, 0.0]),
        "flexlora": ([4, 4, 4], 0.07, [0.004, -0.003, 0.001]),
        "glora_auto_rank": ([9, 8, 7], 0.04, [-0.002, 0.003, 0.0]),
        "central": ([4, 4, 4], 0.0, [0.05, 0.05, 0.05]),
    }
    for rid, (ranks, err, off) in runs.items():
        for s in seeds:
            cfg = run_config(config, by_id[rid], s, raw, "cpu")
            rounds = [
                {"round": j + 1, "accuracy": 0.7 + 0.01 * j, "eval_loss": 0.5,
                 "test_accuracy": 0.8 + 0.01 * j + off[s] + 0.001 * s, "test_loss": 0.4 - off[s],
                 "aggregation_error": err * (1 + 0.1 * j), "server_rank": ranks[j],
                 "server_rank_mean": float(ranks[j]), "seconds": 1.0}
                for j in range(3)
            ]  # fmt: skip
            if not (cfg.test_holdout > 0 and cfg.evaluate_test):  # validation numbers only
                rounds = [{k: v for k, v in r.items() if not k.startswith("test")} for r in rounds]
            rec = {"id": rid, "seed": s, "config": asdict(cfg), "rounds": rounds}
            (raw / f"{rid}-seed{s}.json").write_text(json.dumps(rec))


#: The small cell of :func:`synthetic_cell`: a reference, two primary runs, one uncompared.
CELL: dict[str, Any] = {
    "seeds": [0, 1, 2],
    "reference": "fedit",
    "primary": {"metric": "last3", "runs": ["flexlora", "glora_auto_rank"],
                "default_rule": True},
    "base": {"model": "tiny-roberta", "task": "sst2", "rank": 4, "rounds": 3,
             "test_holdout": 100},
    "runs": [{"operator": "fedit"}, {"operator": "flexlora"},
             {"operator": "glora_auto_rank"},
             {"operator": "fedit", "id": "central", "compared": False}],
}  # fmt: skip
