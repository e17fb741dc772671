"""Arm (a) along two trajectories (``other_trajectory``; cell m against cell g).

Arm (a) scores each operator's aggregate of a round's uploads in the state the trajectory
left, which may favour the trajectory's own operator. The pre-registered analysis of cell m
compares FedIT and FlexLoRA along FedIT's trajectory (cell g) and along FlexLoRA's (cell m),
seed by seed. These tests build both cells' raw records with known losses and check that the
table takes the right losses, with the right sign, paired over the right seeds.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from integration.runner.cells import cell_problems, entries, run_id
from integration.runner.config import ConfigError
from integration.runner.experiment import main
from integration.runner.records import run_config
from integration.runner.stats import paired
from integration.runner.tables import trajectory_table

BASE = {"model": "tiny-roberta", "task": "sst2", "rank": 4, "rounds": 3, "test_holdout": 100}
ARMS = ["fedit", "flexlora", "glora_auto"]


def _cell(name: str, owner: str, other: dict[str, str] | None = None) -> dict[str, Any]:
    cell: dict[str, Any] = {
        "name": name,
        "seeds": [0, 1, 2],
        "base": BASE,
        "runs": [{"operator": owner, "id": f"{owner}-arms", "counterfactual": ARMS}],
    }
    return cell | ({"other_trajectory": other} if other else {})


def _write(docs: Path, config: dict[str, Any], seeds: list[int], loss: Any) -> None:
    """Raw records of the cell's arms run; ``loss(op, seed, round)`` is arm (a)'s test loss."""
    (entry,) = entries(config)
    raw = docs / "raw" / config["name"]
    raw.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        cfg = run_config(config, entry, s, raw, "cpu")
        rounds = [
            {"round": j + 1, "accuracy": 0.7, "eval_loss": 0.5, "test_accuracy": 0.8,
             "test_loss": 0.4, "aggregation_error": 0.1, "server_rank": 4,
             "server_rank_mean": 4.0, "seconds": 1.0,
             "counterfactual": {op: {"split": "test", "accuracy": 0.8, "loss": loss(op, s, j),
                                     "aggregation_error": 0.1, "certified_residual": None}
                                for op in ARMS}}
            for j in range(3)
        ]  # fmt: skip
        rec = {"id": run_id(entry), "seed": s, "config": asdict(cfg), "rounds": rounds}
        (raw / f"{run_id(entry)}-seed{s}.json").write_text(json.dumps(rec))


def _g_loss(op: str, s: int, j: int) -> float:  # along FedIT's: FlexLoRA 0.1 + 0.01 s worse
    return 0.5 + (0.1 + 0.01 * s if op == "flexlora" else 0.0) + 0.02 * j


def _m_loss(op: str, s: int, j: int) -> float:  # along FlexLoRA's: FedIT worse, more by round
    return 0.5 + (0.05 + 0.001 * s + 0.01 * j if op == "fedit" else 0.0)


def _setup(tmp_path: Path, m_loss: Any = _m_loss) -> tuple[Path, Path, dict[str, Any]]:
    docs = tmp_path / "docs"
    g = _cell("g", "fedit")
    g_path = tmp_path / "g.json"
    g_path.write_text(json.dumps(g))
    m = _cell("m", "flexlora", {"cell": str(g_path), "run": "fedit-arms"})
    m_path = tmp_path / "m.json"
    m_path.write_text(json.dumps(m))
    _write(docs, g, [0, 1, 2], _g_loss)
    _write(docs, m, [0, 1], m_loss)  # seed 2 of m not finished yet
    return docs, m_path, m


def _row(text: str, start: str) -> list[str]:
    (line,) = [x for x in text.splitlines() if x.startswith(start)]
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_table_pairs_each_trajectorys_loss_difference_by_seed(tmp_path: Path) -> None:
    docs, m_path, m = _setup(tmp_path)
    assert cell_problems(m) == []
    assert main([str(m_path), "--docs", str(docs), "--table"]) == 0
    text = (docs / "m.md").read_text()
    assert "## Arm (a) along two trajectories: fedit's and flexlora's" in text
    # d = loss(fedit's aggregate) - loss(flexlora's), mean over the rounds of a seed.
    d_g = {s: -(0.1 + 0.01 * s) for s in (0, 1, 2)}  # FedIT's trajectory: FedIT lower
    d_m = {s: 0.05 + 0.001 * s + 0.01 for s in (0, 1)}  # FlexLoRA's: the mean of 0, 0.01, 0.02
    g_row = _row(text, "| fedit's (g, run fedit-arms)")
    assert g_row[1:] == ["3", str(paired(list(d_g.values()), [0.0] * 3))]
    assert g_row[2].startswith("-0.1100 [")  # the sign: FlexLoRA's loss is higher here
    m_row = _row(text, "| flexlora's (this cell, run flexlora-arms)")
    assert m_row[1:] == ["2", str(paired(list(d_m.values()), [0.0] * 2))]
    change = _row(text, "| change: along flexlora's - along fedit's, paired by seed")
    assert change[1:] == ["2", str(paired([d_m[0], d_m[1]], [d_g[0], d_g[1]]))]
    assert change[2].startswith("+0.1655 [")  # (0.06 + 0.10 + 0.061 + 0.11) / 2
    assert "The sign follows the trajectory's owner (each trajectory's mean d favours its own " \
        "operator): yes." in " ".join(text.split())  # fmt: skip


def test_a_comparison_that_keeps_its_sign_does_not_follow_the_owner(tmp_path: Path) -> None:
    # Along FlexLoRA's trajectory too, FedIT's aggregate has the lower loss: no home advantage.
    docs, _, m = _setup(tmp_path, lambda op, s, j: 0.5 + (0.03 if op == "flexlora" else 0.0))
    text = trajectory_table(m, "m", docs)
    assert "favours its own operator): no." in " ".join(text.split())
    assert _row(text, "| flexlora's (this cell")[2].startswith("-0.0300 [-0.0300, -0.0300] 0/2")


def test_before_both_trajectories_have_a_seed_the_sign_is_not_read(tmp_path: Path) -> None:
    docs, _, m = _setup(tmp_path)
    for f in (docs / "raw" / "m").glob("*.json"):
        f.unlink()
    text = trajectory_table(m, "m", docs)
    assert _row(text, "| flexlora's (this cell")[1:] == ["0", "no finished seed yet"]
    assert _row(text, "| change:")[1:] == ["0", "no seed in both yet"]
    assert "The sign cannot be read until both trajectories have a finished seed." in text
    assert (
        trajectory_table({k: v for k, v in m.items() if k != "other_trajectory"}, "m", docs) == ""
    )


def test_a_trajectory_that_cannot_be_compared_is_refused(tmp_path: Path) -> None:
    docs, _, m = _setup(tmp_path)
    g_path = m["other_trajectory"]["cell"]
    for other, why in (
        ({"cell": g_path, "run": "nope"}, "'nope' is not a run with counterfactual rounds of g"),
        ({"cell": str(tmp_path / "none.json"), "run": "fedit-arms"}, "no such config file"),
    ):
        with pytest.raises((ConfigError, FileNotFoundError), match=why):
            trajectory_table(m | {"other_trajectory": other}, "m", docs)
    same = m | {"runs": [m["runs"][0] | {"operator": "fedit"}]}
    with pytest.raises(ConfigError, match="both trajectories are fedit's"):
        trajectory_table(same, "m", docs)
    narrow = m | {"runs": [m["runs"][0] | {"counterfactual": ["flexlora", "glora_auto"]}]}
    with pytest.raises(ConfigError, match=r"flexlora-arms of m does not aggregate \['fedit'\]"):
        trajectory_table(narrow, "m", docs)
    assert cell_problems(m | {"other_trajectory": {"cell": "g"}})[0].startswith(
        "other_trajectory: must be {'cell': "
    )
    two = m | {"runs": [*m["runs"], m["runs"][0] | {"id": "again"}]}
    assert "needs exactly one run with counterfactual rounds here" in cell_problems(two)[0]


def test_the_shipped_cell_m_compares_with_cell_gs_fedit_trajectory() -> None:
    root = Path(__file__).resolve().parents[1] / "experiments"
    m = json.loads((root / "m_sst2_counterfactual_flexlora.json").read_text())
    g = json.loads((root / "g_sst2_counterfactual.json").read_text())
    assert m["other_trajectory"] == {"cell": "g_sst2_counterfactual", "run": "fedit-arms"}
    assert cell_problems(m) == []
    # The same arm (a), seeds and settings along both trajectories; only the owner differs.
    (mine,), (theirs,) = entries(m), entries(g)
    assert m["base"] == g["base"]
    assert m["seeds"] == g["seeds"]
    assert {k: v for k, v in mine.items() if k not in ("operator", "id")} == {
        k: v for k, v in theirs.items() if k not in ("operator", "id")
    }
    assert (mine["operator"], theirs["operator"]) == ("flexlora", "fedit")
