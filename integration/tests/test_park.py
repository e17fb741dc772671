"""Parking unfinished runs (integration.runner.park, ``glora experiment --park/--unpark``): a
run resumed on a machine that lost its output folder gives the uninterrupted run's results,
and nothing damaged, stale, not the run's or half-written is copied."""

from __future__ import annotations

import dataclasses
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from integration.runner import park as parking
from integration.runner.checkpoint import read_checkpoint, write_checkpoint
from integration.runner.simulate import SimConfig, Simulation
from integration.tests.test_simulate import TINY as SIMULATE_TINY

TINY = SIMULATE_TINY | {"operator": "glora_auto"}
TIMING = ("seconds", "eval_seconds")


def _cfg(out: Path, **kw: object) -> SimConfig:
    return SimConfig(**(TINY | {"out": str(out)} | kw))  # type: ignore[arg-type]


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _cut(run: Path) -> None:
    """One round of two in ``run``, stopped there (no results.json)."""
    Simulation(_cfg(run, rounds=1)).run()
    (run / "results.json").unlink()


def _advance(folder: Path) -> None:
    """Write ``folder``'s checkpoint again one round further (what the next round does)."""
    found = read_checkpoint(folder)
    assert found is not None
    meta, flat = found
    keep = {k: meta[k] for k in ("server", "config")}
    write_checkpoint(folder, int(meta["round"]) + 1, flat,
                     keep | {"metrics": [*meta["metrics"], meta["metrics"][-1]]})  # fmt: skip


def _round(folder: Path) -> int:
    return int(json.loads((folder / "checkpoint.json").read_text())["round"])


@pytest.fixture
def cut(tmp_path: Path) -> tuple[Path, Path, SimConfig]:
    """A run stopped after round 1 of 2, where it parks (parked there), and its config."""
    run, dest = tmp_path / "out" / "run", tmp_path / "parked" / "cell" / "run"
    _cut(run)
    cfg = _cfg(run)
    assert parking.park_run(run, dest, cfg) == "run: round 1 parked"
    return run, dest, cfg


def test_a_parked_run_resumes_on_a_fresh_machine_to_the_uninterrupted_results(
    tmp_path: Path, cut: tuple[Path, Path, SimConfig]
) -> None:
    run, dest, cfg = cut
    full = Simulation(_cfg(tmp_path / "full")).run()
    # parked packed: the copy is smaller than the run's own tensor file (clients repeat)
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-1.safetensors.xz",
                                                      "checkpoint.json"]  # fmt: skip
    packed = (dest / "checkpoint-1.safetensors.xz").stat().st_size
    assert packed < (run / "checkpoint-1.safetensors").stat().st_size
    shutil.rmtree(run.parent)  # the fresh machine: the committed parking folder, nothing else
    assert parking.parked_round(dest, cfg) == 1
    assert parking.unpark_run(dest, run, cfg) == f"run: round 1 unparked from {dest}"
    resumed = Simulation(cfg).run(resume=True)
    assert _strip(resumed) == _strip(full)
    a = load_file(str(tmp_path / "full" / "checkpoint-2.safetensors"))
    b = load_file(str(run / "checkpoint-2.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # finished: the next park removes the parked copy, and nothing is unparked any more
    assert parking.park_run(run, dest, cfg) == "run: finished; its parked checkpoint removed"
    assert not dest.exists()
    assert parking.unpark_run(dest, run, cfg) is None
    assert parking.park_run(run, dest, cfg) is None


def test_park_replaces_a_parked_round_only_by_a_later_one(
    cut: tuple[Path, Path, SimConfig],
) -> None:
    run, dest, cfg = cut
    before = (dest / "checkpoint.json").read_bytes()
    assert parking.park_run(run, dest, cfg) is None  # the same round: nothing to do
    assert (dest / "checkpoint.json").read_bytes() == before
    _advance(run)
    assert parking.park_run(run, dest, cfg) == "run: round 2 parked"
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-2.safetensors.xz",
                                                      "checkpoint.json"]  # fmt: skip
    # a run restarted from round 0 (a machine that was not unparked) keeps the parked round
    shutil.rmtree(run)
    _cut(run)
    assert parking.park_run(run, dest, cfg) == (
        "run: round 1 here, round 2 parked; the parked one kept"
    )
    assert _round(dest) == 2
    assert not [p for p in dest.parent.rglob(".*")]  # no temporary file left to commit


def test_a_parked_copy_that_is_not_this_runs_is_never_resumed(
    cut: tuple[Path, Path, SimConfig],
) -> None:
    # Found by review: the rounds alone were compared, so a parked copy made with another
    # learning rate replaced the run's own checkpoint, which the run then refused.
    run, dest, cfg = cut
    other = dataclasses.replace(cfg, lr=cfg.lr * 2)
    _advance(run)
    assert parking.unpark_run(dest, run, other) == (
        f"run: the parked checkpoint was made with other settings: lr: {cfg.lr!r} there, "
        f"{other.lr!r} now; left"
    )
    assert parking.unpark_run(dest, run, dataclasses.replace(cfg, rounds=0)) == (
        "run: the parked checkpoint was at round 1, past the 0 rounds asked for; left"
    )
    assert parking.parked_round(dest, other) == 0
    assert _round(run) == 2  # the run's own checkpoint untouched
    # park replaces a copy that is not the run's, even by an earlier round
    assert parking.park_run(run, dest, other) == (
        f"run: its checkpoint was made with other settings: lr: {cfg.lr!r} there, "
        f"{other.lr!r} now; not parked"
    )
    assert _round(dest) == 1
    # and a parked copy that is not the run's is replaced, even by an earlier round
    stray = run.parent / "stray"
    Simulation(dataclasses.replace(other, out=str(stray), rounds=1)).run()
    (stray / "results.json").unlink()
    _advance(stray)
    shutil.rmtree(dest)
    assert parking.park_run(stray, dest, dataclasses.replace(other, rounds=5)) == (
        "stray: round 2 parked"
    )
    shutil.rmtree(run)
    _cut(run)
    assert parking.park_run(run, dest, cfg) == (
        f"run: round 1 parked (the parked copy was made with other settings: lr: "
        f"{other.lr!r} there, {cfg.lr!r} now; replaced)"
    )
    assert _round(dest) == 1


def test_unpark_leaves_a_run_that_is_ahead_running_or_finished(
    cut: tuple[Path, Path, SimConfig],
) -> None:
    run, dest, cfg = cut
    assert parking.unpark_run(dest, run, cfg) == (
        "run: round 1 here, round 1 parked; left as it is"
    )
    shutil.rmtree(run)
    # a run in progress in another process holds its folder (an advisory lock)
    code = (
        "import sys, time; from pathlib import Path\n"
        "from integration.runner.files import held\n"
        "with held(Path(sys.argv[1])):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    root = Path(__file__).parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=root,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        assert parking.unpark_run(dest, run, cfg) == (
            "run: in use by another process; left as it is"
        )
    finally:
        proc.kill()
        proc.communicate()
    assert not (run / "checkpoint.json").exists()
    (run / "results.json").write_text("{}")
    assert parking.unpark_run(dest, run, cfg) is None


def test_a_checkpoint_written_while_it_is_parked_is_parked_whole(
    cut: tuple[Path, Path, SimConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, dest, cfg = cut
    cfg = dataclasses.replace(cfg, rounds=5)  # a run of more rounds than its two checkpoints
    _advance(run)
    load = parking._load

    calls: list[Path] = []

    def racing(path: Path) -> bytes:
        calls.append(path)
        if len(calls) == 1:  # the manifest is read; the run writes its next round now
            _advance(run)
        return load(path)

    monkeypatch.setattr(parking, "_load", racing)
    # round 2's tensor file is gone when it is read: the next read finds round 3 whole
    assert parking.park_run(run, dest, cfg) == "run: round 3 parked"
    monkeypatch.setattr(parking, "_load", load)
    assert _round(dest) == 3
    # a manifest whose tensor file stays missing is a damaged checkpoint, said by name
    (run / "checkpoint-3.safetensors").unlink()
    with pytest.raises(
        parking.CheckpointError, match=r"checkpoint-3.safetensors, which is missing"
    ):
        parking.park_run(run, dest, cfg)
    assert _round(dest) == 3


def test_damaged_checkpoints_are_named_and_never_copied(
    cut: tuple[Path, Path, SimConfig],
) -> None:
    run, dest, cfg = cut
    packed = dest / "checkpoint-1.safetensors.xz"
    good = lzma.decompress(packed.read_bytes())
    shutil.rmtree(run)
    # tensors that decompress but are not the ones the manifest hashed (the SHA-256 check)
    packed.write_bytes(lzma.compress(good[:-1] + bytes([good[-1] ^ 1])))
    said = parking.unpark_run(dest, run, cfg)
    assert said is not None
    assert "checkpoint-1.safetensors.xz does not match the SHA-256" in said
    assert said.endswith("the run goes on from its own")
    # a file that does not decompress (LZMA's own check)
    data = bytearray(lzma.compress(good))
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    said = parking.unpark_run(dest, run, cfg)
    assert said is not None
    assert "checkpoint-1.safetensors.xz is damaged" in said
    assert not (run / "checkpoint.json").exists()
    assert parking.parked_round(dest, cfg) == 0
    # the run's own checkpoint replaces a damaged parked copy
    _cut(run)
    said = parking.park_run(run, dest, cfg)
    assert said is not None
    assert said.startswith("run: round 1 parked (the parked copy was damaged (")
    assert parking.unpark_run(dest, run, cfg) == (
        "run: round 1 here, round 1 parked; left as it is"
    )
    # a damaged checkpoint of the run is named, and not parked
    meta = json.loads((run / "checkpoint.json").read_text())
    meta["round"] = 7
    (run / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(parking.CheckpointError, match=r"out/run/checkpoint.json was edited"):
        parking.park_run(run, dest, cfg)
    assert _round(dest) == 1
    # and a damaged checkpoint here is replaced by the checked parked one
    assert parking.unpark_run(dest, run, cfg) == f"run: round 1 unparked from {dest}"
    assert read_checkpoint(run) is not None


def test_a_parked_copy_unsigned_under_the_key_is_refused_and_replaced(
    cut: tuple[Path, Path, SimConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, dest, cfg = cut
    monkeypatch.setenv("GLORA_CHECKPOINT_KEY", "k")
    shutil.rmtree(run)
    said = parking.unpark_run(dest, run, cfg)
    assert said is not None
    assert "is not signed with GLORA_CHECKPOINT_KEY" in said
    Simulation(_cfg(run, rounds=1)).run()  # a signed checkpoint
    (run / "results.json").unlink()
    said = parking.park_run(run, dest, cfg)
    assert said is not None
    assert said.startswith("run: round 1 parked (the parked copy was damaged (")
    shutil.rmtree(run)
    assert parking.unpark_run(dest, run, cfg) == f"run: round 1 unparked from {dest}"
    assert read_checkpoint(run) is not None  # signed, checked under the key


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
    assert experiment.main([*args, "--park", str(store)]) == 0  # nothing left to do: said
    assert capsys.readouterr().out.startswith("[p] nothing to park or remove")
    assert not (store / "p").exists() or not any((store / "p").iterdir())
    # --park is an action of its own
    with pytest.raises(SystemExit):
        experiment.main([*args, "--park", str(store), "--list"])


def test_park_cell_names_a_damaged_run_and_parks_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by review: a damaged checkpoint of one run stopped --park for the whole cell.
    from integration import experiment

    cfg = {"name": "q", "seeds": [0, 1], "base": TINY, "runs": [{"operator": "fedit"}]}
    config = tmp_path / "q.json"
    config.write_text(json.dumps(cfg))
    out, store = tmp_path / "out", tmp_path / "parked"
    for _, _, sim in experiment.plan(cfg, out / "runs"):
        Simulation(dataclasses.replace(sim, rounds=1)).run()
        (Path(sim.out) / "results.json").unlink()
    manifest = out / "runs" / "fedit-seed0" / "checkpoint.json"
    manifest.write_text(manifest.read_text().replace('"round": 1', '"round": 1 '))
    (out / "runs" / "fedit-seed0" / "checkpoint-1.safetensors").unlink()
    assert experiment.main([str(config), "--out", str(out), "--park", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[q] fedit-seed0: not parked, its checkpoint is damaged: ")
    assert lines[0].endswith("checkpoint-1.safetensors, which is missing")
    assert lines[1] == "[q] fedit-seed1: round 1 parked"
