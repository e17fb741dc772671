"""Parking unfinished runs (integration.runner.park, ``glora experiment --park/--unpark``): a
run resumed on a machine that lost its output folder gives the uninterrupted run's results,
and nothing damaged, stale or half-written is copied."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from integration.runner import park as parking
from integration.runner.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from integration.runner.files import held
from integration.runner.simulate import SimConfig, Simulation

TINY = {
    "model": "tiny-roberta",
    "clients": 3,
    "rounds": 2,
    "local_steps": 2,
    "max_train": 48,
    "max_eval": 32,
    "batch_size": 8,
    "operator": "glora_auto",
}
TIMING = ("seconds", "eval_seconds")


def _sim(out: Path, **kw: object) -> Simulation:
    return Simulation(SimConfig(**(TINY | {"out": str(out)} | kw)))  # type: ignore[arg-type]


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _cut(run: Path) -> None:
    """One round of two in ``run``, stopped there (no results.json)."""
    _sim(run, rounds=1).run()
    (run / "results.json").unlink()


def _advance(folder: Path) -> None:
    """Write ``folder``'s checkpoint again one round further (what the next round does)."""
    found = read_checkpoint(folder)
    assert found is not None
    meta, flat = found
    keep = {k: meta[k] for k in ("server", "config")}
    write_checkpoint(folder, int(meta["round"]) + 1, flat,
                     keep | {"metrics": [*meta["metrics"], meta["metrics"][-1]]})  # fmt: skip


@pytest.fixture
def cut(tmp_path: Path) -> tuple[Path, Path]:
    """A run stopped after round 1 of 2, and where it parks (already parked there)."""
    run, dest = tmp_path / "out" / "run", tmp_path / "parked" / "cell" / "run"
    _cut(run)
    assert parking.park_run(run, dest) == "run: round 1 parked"
    return run, dest


def test_a_parked_run_resumes_on_a_fresh_machine_to_the_uninterrupted_results(
    tmp_path: Path, cut: tuple[Path, Path]
) -> None:
    run, dest = cut
    full = _sim(tmp_path / "full").run()
    # parked packed: the copy is smaller than the run's own tensor file (clients repeat)
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-1.safetensors.xz",
                                                      "checkpoint.json"]  # fmt: skip
    packed = (dest / "checkpoint-1.safetensors.xz").stat().st_size
    assert packed < (run / "checkpoint-1.safetensors").stat().st_size
    shutil.rmtree(run.parent)  # the fresh machine: the committed parking folder, nothing else
    assert parking.unpark_run(dest, run) == f"run: round 1 unparked from {dest}"
    resumed = _sim(run).run(resume=True)
    assert _strip(resumed) == _strip(full)
    a = load_file(str(tmp_path / "full" / "checkpoint-2.safetensors"))
    b = load_file(str(run / "checkpoint-2.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # finished: the next park removes the parked copy, and nothing is unparked any more
    assert parking.park_run(run, dest) == "run: finished; its parked checkpoint removed"
    assert not dest.exists()
    assert parking.unpark_run(dest, run) is None
    assert parking.park_run(run, dest) is None


def test_park_replaces_a_parked_round_only_by_a_later_one(cut: tuple[Path, Path]) -> None:
    run, dest = cut
    before = (dest / "checkpoint.json").read_bytes()
    assert parking.park_run(run, dest) is None  # the same round: nothing to do
    assert (dest / "checkpoint.json").read_bytes() == before
    _advance(run)
    assert parking.park_run(run, dest) == "run: round 2 parked"
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-2.safetensors.xz",
                                                      "checkpoint.json"]  # fmt: skip
    # a run restarted from round 0 (a machine that was not unparked) keeps the parked round
    shutil.rmtree(run)
    _cut(run)
    assert parking.park_run(run, dest) == "run: round 1 here, round 2 parked; the parked one kept"
    assert json.loads((dest / "checkpoint.json").read_text())["round"] == 2
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".park-")]


def test_unpark_leaves_a_run_that_is_ahead_running_or_finished(cut: tuple[Path, Path]) -> None:
    run, dest = cut
    assert parking.unpark_run(dest, run) == "run: round 1 here, round 1 parked; left as it is"
    shutil.rmtree(run)
    with held(run):  # a run in progress holds its folder
        assert parking.unpark_run(dest, run) == "run: in use by another process; left as it is"
    assert not (run / "checkpoint.json").exists()
    (run / "results.json").write_text("{}")
    assert parking.unpark_run(dest, run) is None


def test_a_checkpoint_written_while_it_is_parked_is_left_for_the_next_park(
    cut: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, dest = cut
    _advance(run)
    copy = shutil.copy2

    def racing(src: Path, dst: Path) -> object:
        out = copy(src, dst)  # the manifest is copied; the run writes its next round now
        _advance(run)
        return out

    monkeypatch.setattr(parking.shutil, "copy2", racing)
    assert parking.park_run(run, dest) == "run: being written; left for the next park"
    monkeypatch.setattr(parking.shutil, "copy2", copy)
    assert json.loads((dest / "checkpoint.json").read_text())["round"] == 1
    assert parking.park_run(run, dest) == "run: round 3 parked"


def test_damaged_checkpoints_are_named_and_never_copied(cut: tuple[Path, Path]) -> None:
    run, dest = cut
    packed = dest / "checkpoint-1.safetensors.xz"
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    shutil.rmtree(run)
    with pytest.raises(CheckpointError, match=r"cell/run/checkpoint-1.safetensors.xz"):
        parking.unpark_run(dest, run)
    assert not (run / "checkpoint.json").exists()
    # the run's own checkpoint replaces a damaged parked copy
    _cut(run)
    assert parking.park_run(run, dest) == "run: round 1 parked"
    assert parking.unpark_run(dest, run) == "run: round 1 here, round 1 parked; left as it is"
    # a damaged checkpoint of the run is named, and not parked
    meta = json.loads((run / "checkpoint.json").read_text())
    meta["round"] = 7
    (run / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"out/run/checkpoint.json was edited"):
        parking.park_run(run, dest)
    assert json.loads((dest / "checkpoint.json").read_text())["round"] == 1
    # and a damaged checkpoint here is replaced by the verified parked one
    assert parking.unpark_run(dest, run) == f"run: round 1 unparked from {dest}"
    assert read_checkpoint(run) is not None


def test_glora_experiment_parks_and_unparks_a_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from integration import experiment

    cfg = {"name": "p", "seeds": [0], "base": TINY, "runs": [{"operator": "fedit"}]}
    config = tmp_path / "p.json"
    config.write_text(json.dumps(cfg))
    out, store, full = tmp_path / "out", tmp_path / "parked", tmp_path / "full"
    args = [str(config), "--out", str(out)]
    ((_, _, sim),) = experiment.plan(cfg, out / "runs")
    Simulation(dataclasses.replace(sim, rounds=1)).run()  # stopped after round 1
    (Path(sim.out) / "results.json").unlink()
    assert experiment.main([*args, "--park", str(store)]) == 0
    assert capsys.readouterr().out == "[p] fedit-seed0: round 1 parked\n"
    shutil.rmtree(out)
    assert experiment.main([*args, "--list", "--unpark", str(store)]) == 0
    assert "[not started; round 1 parked, it resumes from there]" in capsys.readouterr().out
    assert experiment.main([*args, "--unpark", str(store)]) == 0
    assert f"[p] fedit-seed0: round 1 unparked from {store / 'p' / 'fedit-seed0'}\n" in (
        capsys.readouterr().out
    )
    assert experiment.main([str(config), "--out", str(full)]) == 0  # uninterrupted
    rec = json.loads((out / "raw" / "p" / "fedit-seed0.json").read_text())
    ref = json.loads((full / "raw" / "p" / "fedit-seed0.json").read_text())
    assert _strip(rec["rounds"]) == _strip(ref["rounds"])
    capsys.readouterr()
    # recorded: its parked copy goes, even on a machine whose run folder is gone
    shutil.rmtree(out / "runs")
    assert experiment.main([*args, "--park", str(store)]) == 0
    assert capsys.readouterr().out == "[p] fedit-seed0: recorded; its parked checkpoint removed\n"
    assert not (store / "p" / "fedit-seed0").exists()
