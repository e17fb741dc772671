"""A raw record is read only if it is a finished run of its cell (integration.runner.records).

The rule that picks the default and every table read the committed raw JSON. A run cut short,
another seed's or settings' record, a metric missing or not a number would otherwise decide
the default silently (a truncated run changes which rounds are "the last 3"; a missing server
rank takes a run out of "R = r") or crash a table. Each is refused, naming the file, what is
wrong and what to do, and nothing is written over it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration.runner.experiment import main
from integration.runner.records import RecordError
from integration.runner.tables import decide_default, paired_table
from integration.tests.synthetic import CELL, synthetic_cell

Rec = dict[str, Any]


def _set(rec: Rec, k: int, key: str, value: Any) -> Rec:
    rec["rounds"][k][key] = value
    return rec


def _drop(rec: Rec, k: int, key: str) -> Rec:
    del rec["rounds"][k][key]
    return rec


def _arm(rec: Rec, loss: float) -> Rec:
    arm = {"split": "test", "accuracy": 0.5, "loss": loss, "aggregation_error": 0.1,
           "certified_residual": None}  # fmt: skip
    rec["rounds"][0]["counterfactual"] = {"flexlora": arm}
    return rec


def _swap_rounds(rec: Rec) -> Rec:
    rec["rounds"][1]["round"], rec["rounds"][2]["round"] = 3, 2
    return rec


#: name -> (what it does to flexlora's seed-0 record, what the refusal says)
DAMAGES: dict[str, tuple[Callable[[Rec], Any], str]] = {
    "truncated": (lambda r: r | {"rounds": r["rounds"][:2]}, "holds 2 of the run's 3 rounds"),
    "another lr": (
        lambda r: r | {"config": r["config"] | {"lr": 0.5}},
        "records this run with other settings (lr: 0.5 there, ",
    ),
    "another seed": (lambda r: r | {"seed": 1}, "is the record of seed 1, not of seed 0"),
    "no test accuracy": (lambda r: _drop(r, 1, "test_accuracy"), "round 2 lacks test_accuracy"),
    "no server rank": (lambda r: _drop(r, 0, "server_rank"), "round 1 lacks server_rank"),
    "no seconds": (lambda r: _drop(r, 2, "seconds"), "round 3 lacks seconds"),
    "null error": (
        lambda r: _set(r, 0, "aggregation_error", None),
        "round 1 lacks aggregation_error",
    ),
    "NaN": (
        lambda r: _set(r, 2, "test_accuracy", math.nan),
        "round 3's test_accuracy (nan) is not a finite number",
    ),
    "a string": (
        lambda r: _set(r, 1, "accuracy", "0.7"),
        "round 2's accuracy ('0.7') is not a finite number",
    ),
    "NaN arm": (
        lambda r: _arm(r, math.nan),
        "round 1's counterfactual flexlora's loss (nan) is not a finite number",
    ),
    "an arm not asked for": (
        lambda r: _arm(r, 0.4),
        "round 1's counterfactual holds ['flexlora'], and the run's settings ask for nothing",
    ),
    "rounds out of order": (_swap_rounds, "its round 2 is numbered 3"),
    "not a record": (lambda r: r["rounds"], "is not a raw record"),
}


def _cell(tmp_path: Path, config: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path]:
    config = (config or CELL) | {"name": "c"}
    raw = tmp_path / "raw" / "c"
    synthetic_cell(raw, [0, 1, 2], config)
    (tmp_path / "c.json").write_text(json.dumps(config))
    return config, raw / "flexlora-seed0.json"


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_record_that_is_not_a_finished_run_makes_no_table_and_no_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    config, path = _cell(tmp_path)
    assert decide_default(config, "c", tmp_path).verdict is not None  # intact: a choice
    capsys.readouterr()
    change, said = DAMAGES[damage]
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    before = path.read_bytes()
    for make in (paired_table, decide_default):
        with pytest.raises(RecordError) as exc:
            make(config, "c", tmp_path)
        assert f"{path} {said}" in str(exc.value)
    assert main([str(tmp_path / "c.json"), "--docs", str(tmp_path), "--table"]) == 2
    err = capsys.readouterr().err
    assert f"glora experiment: error: {path} {said}" in err
    # What to do: settings that differ are the config's business; a damaged record is not.
    hint = "restore the cell's config" if damage == "another lr" else "from version control"
    assert hint in err
    assert path.read_bytes() == before


def test_an_unreadable_record_and_a_run_that_is_not_in_the_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, path = _cell(tmp_path)
    path.write_text('{"config": ')
    with pytest.raises(RecordError, match="unreadable raw record"):
        decide_default(config, "c", tmp_path)
    assert main([str(tmp_path / "c.json"), "--docs", str(tmp_path), "--table"]) == 2
    assert f"{path}: unreadable raw record" in capsys.readouterr().err
    from integration.runner.config import ConfigError
    from integration.runner.tables import CellRaw

    with pytest.raises(ConfigError, match="'nope' is not a run of the cell"):
        CellRaw(config, "c", tmp_path).record("nope", 0)


def test_test_set_metrics_must_match_the_runs_settings(tmp_path: Path) -> None:
    # A run that evaluates no test set has none in its record; tables would otherwise read
    # test numbers that no run of this config produces as if it did.
    plain = CELL | {"base": {k: v for k, v in CELL["base"].items() if k != "test_holdout"}}
    config, path = _cell(tmp_path, plain)
    assert decide_default(config, "c", tmp_path).verdict is not None
    rec = json.loads(path.read_text())
    rec["rounds"][0]["test_accuracy"] = 0.8
    path.write_text(json.dumps(rec))
    with pytest.raises(RecordError, match="round 1 holds test-set metrics, but the run"):
        paired_table(config, "c", tmp_path)


def test_every_committed_record_passes_the_check() -> None:
    # The other side of the check: no finished run of a shipped cell is refused. (The
    # driver's own test, test_every_committed_run_counts_as_finished_for_its_cell, goes
    # through recorded(); this one through the tables' reader.)
    from integration.runner.cells import entries, run_id
    from integration.runner.tables import CellRaw

    root = Path(__file__).parents[2]
    docs = root / "docs" / "experiments"
    if not (docs / "raw").is_dir():
        pytest.skip("the committed record (docs/experiments/raw) is in the source checkout")
    read = 0
    for path in sorted((Path(__file__).parents[1] / "experiments").glob("*.json")):
        config = json.loads(path.read_text())
        cr = CellRaw(config, str(config.get("name") or path.stem), docs)
        read += sum(len(cr.records(run_id(e))) for e in entries(config))
    assert read >= 200


def test_the_driver_checks_the_cells_records_before_it_runs_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A damaged record of another seed stops the driver at once, not after hours of a run;
    # and the driver never writes a record that its own readers would refuse.
    from integration.runner import experiment

    base = {"model": "tiny-roberta", "task": "sst2", "clients": 2, "rounds": 1,
            "local_steps": 1, "batch_size": 4, "rank": 2, "max_train": 16, "max_eval": 8,
            "max_len": 16, "threads": 1}  # fmt: skip
    config = {"name": "cell", "seeds": [0, 1], "base": base, "runs": [{"operator": "fedit"}]}
    cfile, out = tmp_path / "cell.json", tmp_path / "out"
    cfile.write_text(json.dumps(config))
    assert main([str(cfile), "--out", str(out), "--seeds", "0"]) == 0
    record = out / "raw" / "cell" / "fedit-seed0.json"
    rec = json.loads(record.read_text())
    record.write_text(json.dumps(rec | {"rounds": []}))
    capsys.readouterr()
    assert main([str(cfile), "--out", str(out), "--seeds", "1"]) == 2
    said = capsys.readouterr()
    assert f"{record} holds 0 of the run's 1 rounds" in said.err
    assert "running fedit seed 1" not in said.out
    assert not (out / "runs" / "fedit-seed1").exists()
    # A finished run whose record would be refused: refused before it is written.
    record.write_text(json.dumps(rec))
    real = experiment.raw_record

    def cut(*args: Any) -> dict[str, Any]:
        made = real(*args)
        return made | {"rounds": made["rounds"][:0]}

    monkeypatch.setattr(experiment, "raw_record", cut)
    assert main([str(cfile), "--out", str(out), "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert "makes a record that is not a finished run of its config (holds 0 of" in err
    assert not (out / "raw" / "cell" / "fedit-seed1.json").exists()


def test_arm_b_and_the_split_must_be_at_the_rounds_the_run_makes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With arm (b) and the broadcast split every 2 rounds of 3, rounds 1 and 3 hold them and
    # round 2 holds neither; a record that says otherwise is not the run its settings make.
    from dataclasses import asdict

    from integration.runner.cells import entries
    from integration.runner.records import run_config

    ops, splits = ["fedit", "flexlora"], ["own", "left"]
    run = {"operator": "fedit", "id": "arms", "counterfactual": ops, "counterfactual_next": True,
           "broadcast_splits": splits, "counterfactual_every": 2}  # fmt: skip
    config = {"name": "c", "seeds": [0], "base": CELL["base"], "runs": [run]}
    (tmp_path / "c.json").write_text(json.dumps(config))
    cfg = run_config(config, entries(config)[0], 0, tmp_path, "cpu")
    arm = {"split": "test", "accuracy": 0.5, "loss": 0.4, "aggregation_error": 0.1,
           "certified_residual": None}  # fmt: skip
    rounds = [
        {"round": k, "accuracy": 0.7, "eval_loss": 0.5, "test_accuracy": 0.8, "test_loss": 0.4,
         "aggregation_error": 0.1, "server_rank": 4, "server_rank_mean": 4.0, "seconds": 1.0,
         "counterfactual": dict.fromkeys(ops, arm)}
        | ({"counterfactual_next": dict.fromkeys(ops, arm),
            "broadcast_split": dict.fromkeys(splits, arm)} if k != 2 else {})
        for k in (1, 2, 3)
    ]  # fmt: skip
    path = tmp_path / "raw" / "c" / "arms-seed0.json"
    path.parent.mkdir(parents=True)
    intact = {"id": "arms", "seed": 0, "config": asdict(cfg), "rounds": rounds}
    path.write_text(json.dumps(intact))
    assert main([str(tmp_path / "c.json"), "--docs", str(tmp_path), "--table"]) == 0
    damages = {
        "round 1's counterfactual_next holds nothing, and the run's settings ask for "
        "['fedit', 'flexlora']": lambda r: r["rounds"][0].pop("counterfactual_next"),
        "round 2's broadcast_split holds ['left', 'own'], and the run's settings ask for "
        "nothing": lambda r: r["rounds"][1].update(broadcast_split=dict.fromkeys(splits, arm)),
        "round 3's broadcast_split holds ['own'], and the run's settings ask for ['left', "
        "'own']": lambda r: r["rounds"][2]["broadcast_split"].pop("left"),
    }
    capsys.readouterr()
    for said, damage in damages.items():
        rec = json.loads(json.dumps(intact))
        damage(rec)
        path.write_text(json.dumps(rec))
        assert main([str(tmp_path / "c.json"), "--docs", str(tmp_path), "--table"]) == 2
        assert f"{path} {said}" in capsys.readouterr().err
