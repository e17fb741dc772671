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
from integration.runner.experiment import main
from integration.runner.records import run_config
from integration.runner.stats import paired
from integration.runner.tables import counterfactual_table, trajectories, trajectory_table

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


def _setup(
    tmp_path: Path, m_loss: Any = _m_loss, g_seeds: list[int] | None = None,
    m_seeds: list[int] | None = None,
) -> tuple[Path, Path, dict[str, Any]]:  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    docs = tmp_path / "docs"
    g = _cell("g", "fedit")
    g_path = tmp_path / "g.json"
    g_path.write_text(json.dumps(g))
    m = _cell("m", "flexlora", {"cell": str(g_path), "run": "fedit-arms"})
    m_path = tmp_path / "m.json"
    m_path.write_text(json.dumps(m))
    _write(docs, g, [0, 1, 2] if g_seeds is None else g_seeds, _g_loss)
    _write(docs, m, [0, 1, 2] if m_seeds is None else m_seeds, m_loss)
    return docs, m_path, m


def _row(text: str, start: str) -> list[str]:
    (line,) = [x for x in text.splitlines() if x.startswith(start)]
    return [c.strip() for c in line.strip("|").split("|")]


G_ROW, M_ROW = "| d along fedit's trajectory (g, run fedit-arms)", "| d along flexlora's trajectory"
CHANGE = "| change of d: along flexlora's - along fedit's"
# d = loss(fedit's aggregate) - loss(flexlora's), the mean over the rounds of a seed.
D_G = {s: -(0.1 + 0.01 * s) for s in (0, 1, 2)}  # FedIT's trajectory: FedIT's loss is lower
D_M = {s: 0.05 + 0.001 * s + 0.01 for s in (0, 1, 2)}  # FlexLoRA's: mean of 0, 0.01, 0.02


def test_the_table_pairs_each_trajectorys_loss_difference_by_seed(tmp_path: Path) -> None:
    docs, m_path, m = _setup(tmp_path)
    assert cell_problems(m) == []
    assert main([str(m_path), "--docs", str(docs), "--table"]) == 0
    text = (docs / "m.md").read_text()
    assert "## Arm (a) along two trajectories: fedit's and flexlora's" in text
    g_row, m_row, change = _row(text, G_ROW), _row(text, M_ROW), _row(text, CHANGE)
    assert g_row[1:] == ["3", str(paired(list(D_G.values()), [0.0] * 3))]
    assert g_row[2].startswith("-0.1100 [")  # the sign: FlexLoRA's loss is higher here
    assert m_row[0] == "d along flexlora's trajectory (this cell, run flexlora-arms)"
    assert m_row[1:] == ["3", str(paired(list(D_M.values()), [0.0] * 3))]
    assert m_row[2].startswith("+0.0610 [")
    assert change[1:] == ["3", str(paired(list(D_M.values()), list(D_G.values())))]
    assert change[2].startswith("+0.1710 [")  # 0.061 + 0.110
    assert "The sign follows the trajectory's owner (each trajectory's mean d favours its own " \
        "operator): yes." in " ".join(text.split())  # fmt: skip


def test_only_seeds_both_cells_have_are_read_and_the_sign_waits_for_all(tmp_path: Path) -> None:
    docs, _, m = _setup(tmp_path, m_seeds=[0, 1])  # m's seed 2 not finished yet
    text = " ".join(trajectory_table(m, "m", docs).split())
    assert _row(trajectory_table(m, "m", docs), G_ROW)[1:] == [
        "2", str(paired([D_G[0], D_G[1]], [0.0, 0.0]))  # g's seed 2 left out: not in m yet
    ]  # fmt: skip
    assert "Interim: 2 of the 3 seeds both cells list are finished in both (this cell: [0, 1], " \
        "g: [0, 1, 2]); whether the sign follows the trajectory's owner is read when all are " \
        "in." in text  # fmt: skip
    assert "favours its own operator)" not in text
    arms = " ".join(counterfactual_table(m, "m", docs).split())  # m's own arm (a) table
    assert "**Interim (flexlora-arms): 2 of 3 seeds are in; nothing here is read until every " \
        "seed is.**" in arms  # fmt: skip
    assert "this section holds 2 comparisons" in arms
    docs, _, m = _setup(tmp_path / "disjoint", g_seeds=[0], m_seeds=[2])
    table = trajectory_table(m, "m", docs)
    for row in (G_ROW, M_ROW, CHANGE):
        assert _row(table, row)[1:] == ["0", "no seed in both yet"]
    assert "Interim: 0 of the 3 seeds" in table
    assert (
        trajectory_table({k: v for k, v in m.items() if k != "other_trajectory"}, "m", docs) == ""
    )


def test_a_comparison_that_keeps_its_sign_does_not_follow_the_owner(tmp_path: Path) -> None:
    # Along FlexLoRA's trajectory too, FedIT's aggregate has the lower loss: no home advantage.
    docs, _, m = _setup(tmp_path, lambda op, s, j: 0.5 + (0.03 if op == "flexlora" else 0.0))
    text = trajectory_table(m, "m", docs)
    assert "favours its own operator): no." in " ".join(text.split())
    assert _row(text, M_ROW)[2].startswith("-0.0300 [-0.0300, -0.0300] 0/3")


def test_a_trajectory_that_cannot_be_compared_stops_the_driver_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused before anything runs (a run of cell m takes hours), as a one-line error.
    from integration.runner import experiment

    monkeypatch.setattr(experiment.Simulation, "run", lambda *a, **k: pytest.fail("ran"))
    docs, m_path, m = _setup(tmp_path, m_seeds=[])  # m's records would not fit some changes
    g_path = Path(m["other_trajectory"]["cell"])
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_base = tmp_path / "nobase.json"
    no_base.write_text(json.dumps({k: v for k, v in _cell("g", "fedit").items() if k != "base"}))
    no_seeds = tmp_path / "noseeds.json"
    no_seeds.write_text(json.dumps(_cell("g", "fedit") | {"seeds": ["a"]}))
    other_lr = tmp_path / "lr.json"
    other_lr.write_text(json.dumps(_cell("g", "fedit") | {"base": BASE | {"lr": 0.5}}))
    cases = [
        ({"other_trajectory": {"cell": g_path.name + "x", "run": "fedit-arms"}},
         "other_trajectory: cannot read the cell 'g.jsonx' (FileNotFoundError"),
        ({"other_trajectory": {"cell": str(bad_json), "run": "fedit-arms"}},
         "(JSONDecodeError"),
        ({"other_trajectory": {"cell": str(no_base), "run": "fedit-arms"}},
         "other_trajectory: the run 'fedit-arms' of g has no valid settings (KeyError"),
        ({"other_trajectory": {"cell": str(g_path), "run": "nope"}},
         "'nope' is not a run with counterfactual rounds of g"),
        ({"other_trajectory": {"cell": str(other_lr), "run": "fedit-arms"}},
         "g's run differs from this cell's in more than the operator (there: the other cell's, "
         "now: this one's; lr: 0.5 there, 0.0005 now)"),
        ({"runs": [m["runs"][0] | {"operator": "fedit"}]}, "both trajectories are fedit's"),
        ({"runs": [m["runs"][0] | {"counterfactual": ["flexlora", "glora_auto"]}]},
         "flexlora-arms of this cell does not aggregate ['fedit'] in arm (a)"),
        ({"other_trajectory": {"cell": str(no_seeds), "run": "fedit-arms"}},
         "other_trajectory: g (" + str(no_seeds) + "): 'seeds' must be a non-empty list"),
    ]  # fmt: skip
    for change, why in cases:
        m_path.write_text(json.dumps(m | change))
        for args in ([], ["--table"]):
            assert main([str(m_path), "--docs", str(docs), "--out", str(tmp_path), *args]) == 2
            err = capsys.readouterr().err
            assert err.startswith("glora experiment: error: ")
            assert why in err, (why, err)
            assert err.count("\n") == 1
    # A malformed key is a config problem: refused as any other, before anything is read.
    m_path.write_text(json.dumps(m | {"other_trajectory": {"cell": "g"}}))
    with pytest.raises(SystemExit) as exc:
        main([str(m_path), "--docs", str(docs), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "other_trajectory: must be {'cell': " in capsys.readouterr().err
    two = m | {"runs": [*m["runs"], m["runs"][0] | {"id": "again"}]}
    assert "needs exactly one run with counterfactual rounds here" in cell_problems(two)[0]


def test_a_round_without_both_operators_in_arm_a_is_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every round is read: a record whose arm (a) lacks a round, or one of the two operators
    # in a round, is refused (it is not the run its settings describe), not averaged over
    # the rest.
    for damage in ("none", "no flexlora"):
        docs, m_path, _ = _setup(tmp_path / damage)
        record = docs / "raw" / "g" / "fedit-arms-seed1.json"
        rec = json.loads(record.read_text())
        if damage == "none":
            rec["rounds"][1]["counterfactual"] = None
        else:
            del rec["rounds"][1]["counterfactual"]["flexlora"]
        record.write_text(json.dumps(rec))
        assert main([str(m_path), "--docs", str(docs), "--table"]) == 2
        err = capsys.readouterr().err
        held = "nothing" if damage == "none" else "['fedit', 'glora_auto']"
        assert f"{record} round 2's counterfactual holds {held}, and the run's settings ask " \
            "for ['fedit', 'flexlora', 'glora_auto']" in err  # fmt: skip
        assert err.count("\n") == 1


def test_the_shipped_cell_m_compares_with_cell_gs_fedit_trajectory() -> None:
    root = Path(__file__).resolve().parents[1] / "experiments"
    m = json.loads((root / "m_sst2_counterfactual_flexlora.json").read_text())
    assert m["other_trajectory"] == {"cell": "g_sst2_counterfactual", "run": "fedit-arms"}
    assert cell_problems(m) == []
    t = trajectories(m)  # the same settings along both trajectories; only the owner differs
    assert t is not None
    assert (t.a, t.b, t.other_cell) == ("flexlora", "fedit", "g_sst2_counterfactual")
    assert {k: v for k, v in t.mine.items() if k not in ("operator", "id")} == {
        k: v for k, v in t.theirs.items() if k not in ("operator", "id")
    }


def test_a_run_with_its_own_seeds_is_read_at_those_seeds_only(tmp_path: Path) -> None:
    # An entry that runs at some of its cell's seeds: a record left at another seed is not
    # read, and the run is complete (not interim) once its own seeds are in.
    docs, _, m = _setup(tmp_path)  # records at seeds 0, 1, 2 in both cells
    m = m | {"runs": [m["runs"][0] | {"seeds": [0, 1]}]}
    text = trajectory_table(m, "m", docs)
    assert _row(text, M_ROW)[1:] == ["2", str(paired([D_M[0], D_M[1]], [0.0, 0.0]))]
    assert "favours its own operator): yes." in " ".join(text.split())  # seeds 0, 1: all in
    arms = counterfactual_table(m, "m", docs)
    assert "Interim" not in arms
    assert "(2 seeds)" in arms  # seed 2's record is not the run's
    own = {k: v for k, v in m["runs"][0].items() if k != "seeds"}
    assert "Interim" not in counterfactual_table(m | {"runs": [own]}, "m", docs)
    more = m | {"runs": [own], "seeds": [0, 1, 2, 3]}  # every seed of the cell, one missing
    assert "**Interim (flexlora-arms): 3 of 4 seeds are in;" in counterfactual_table(
        more, "m", docs
    )
