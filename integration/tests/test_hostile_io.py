"""The adversarial corpus of the I/O boundaries: peft adapters and the runner's checkpoints.

Every case ends in a typed error naming the client and module (or the file), or in a correct
result; never a raw exception, a hang, a silent wrong scale or a non-finite file.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from glora_math import LoRAFactors
from glora_math.errors import GloraError, NonFiniteError
from integration.peft_io import (
    PREFIX,
    AdapterError,
    adapter_from_state_dict,
    load_adapter,
    save_adapter,
)
from integration.simulate import CheckpointError, ConfigError, SimConfig, Simulation

NAME = "layer.q"


def _state(r: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{PREFIX}{NAME}.lora_A.weight": torch.randn(r, 6, generator=g).to(dtype),
        f"{PREFIX}{NAME}.lora_B.weight": torch.randn(5, r, generator=g).to(dtype),
    }


# ------------------------------------------------------------------------ adapter configs

CONFIGS: dict[str, tuple[dict[str, Any], type[GloraError], str]] = {
    "r = 0": ({"r": 0, "lora_alpha": 8}, AdapterError, "r must be a positive integer"),
    "r = -1": ({"r": -1, "lora_alpha": 8}, AdapterError, "r must be a positive integer"),
    "r = 10**9": ({"r": 10**9, "lora_alpha": 8}, AdapterError, "the config says rank"),
    "r = 'four'": ({"r": "four", "lora_alpha": 8}, AdapterError, "r must be a positive integer"),
    "rank_pattern lies": ({"r": 2, "rank_pattern": {NAME: 4}}, AdapterError, "config says rank 4"),
    "lora_alpha NaN": ({"r": 2, "lora_alpha": math.nan}, AdapterError, "finite number"),
    "lora_alpha str": ({"r": 2, "lora_alpha": "8"}, AdapterError, "finite number"),
    "alpha_pattern not a map": ({"r": 2, "alpha_pattern": [1]}, AdapterError, "must be a mapping"),
    "use_rslora str": ({"r": 2, "use_rslora": "yes"}, AdapterError, "true or false"),
    "catastrophic pattern": ({"r": 2, "alpha_pattern": {"(a+)+": 16}}, AdapterError, "exponential"),
    "pattern too long": ({"r": 2, "alpha_pattern": {"a" * 300: 16}}, AdapterError, "1..256"),
    "bad regex": ({"r": 2, "alpha_pattern": {"(": 16}}, AdapterError, "not a regular expression"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_configs_are_checked_against_the_tensors(case: str) -> None:
    config, kind, match = CONFIGS[case]
    with pytest.raises(kind, match=match) as info:
        adapter_from_state_dict(_state(), config, client=3)
    assert info.value.client == 3


def test_lora_alpha_defaults_to_peft_s_8_not_to_r() -> None:
    ad = adapter_from_state_dict(_state(r=2), {"r": 2}, client=0)
    state = _state(r=2)
    B = state[f"{PREFIX}{NAME}.lora_B.weight"]
    assert torch.allclose(ad.modules[NAME].factors.B, B * (8 / 2))


def test_a_crafted_pattern_and_name_cannot_hang_the_server() -> None:
    # peft matches pattern keys as regexes; (a+)+ against "aaaa...!" backtracks for minutes.
    state = {
        f"{PREFIX}{'a' * 32 + '!'}.lora_A.weight": torch.ones(2, 6),
        f"{PREFIX}{'a' * 32 + '!'}.lora_B.weight": torch.ones(5, 2),
    }
    t0 = time.perf_counter()
    with pytest.raises(AdapterError, match="exponential"):
        adapter_from_state_dict(state, {"r": 2, "alpha_pattern": {"(a+)+": 16}}, client=1)
    assert time.perf_counter() - t0 < 0.5


TENSORS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "int32 lora_B": (
        lambda: _state() | {f"{PREFIX}{NAME}.lora_B.weight": torch.ones(5, 2, dtype=torch.int32)},
        "floating point",
    ),
    "complex head": (
        lambda: _state() | {"classifier.weight": torch.ones(2, 2, dtype=torch.complex64)},
        "expected real numbers",
    ),
    "bool head": (
        lambda: _state() | {"classifier.weight": torch.ones(2, 2, dtype=torch.bool)},
        "expected real numbers",
    ),
    "rank 0": (lambda: _state(r=0), "rank-0"),
    "not a tensor": (lambda: _state() | {"classifier.weight": [1.0, 2.0]}, "not a tensor"),
    "NaN": (
        lambda: _state() | {f"{PREFIX}{NAME}.lora_A.weight": torch.full((2, 6), math.nan)},
        "NaN/Inf",
    ),
    "missing partner": (
        lambda: {f"{PREFIX}{NAME}.lora_A.weight": torch.ones(2, 6)},
        "not its partner",
    ),
    "shapes disagree": (
        lambda: _state() | {f"{PREFIX}{NAME}.lora_A.weight": torch.ones(3, 6)},
        "do not match",
    ),
    "huge key": (lambda: {"k" * 5000: torch.ones(1)}, "at most"),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_bad_tensors_are_typed_errors_naming_the_client(case: str) -> None:
    make, match = TENSORS[case]
    config = {"lora_alpha": 8} if case == "rank 0" else {"r": 2, "lora_alpha": 8}
    with pytest.raises(GloraError, match=match) as info:
        adapter_from_state_dict(make(), config, client=2)
    assert info.value.client == 2


def test_the_writer_refuses_what_would_write_inf(tmp_path: Path) -> None:
    f = LoRAFactors(torch.ones(5, 2), torch.ones(2, 6))
    with pytest.raises(AdapterError, match="cannot be unfolded"):
        save_adapter(tmp_path / "a", {NAME: f}, {}, {"r": 2, "lora_alpha": 0})
    big = LoRAFactors(torch.full((5, 2), 3e38), torch.ones(2, 6))  # / (alpha/r = 0.5) overflows
    with pytest.raises(NonFiniteError, match="Inf/NaN in lora_B"):
        save_adapter(tmp_path / "b", {NAME: big}, {}, {"r": 2, "lora_alpha": 1})
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


FILES: dict[str, Callable[[Path], None]] = {
    "truncated safetensors": lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:40]
    ),
    "garbage safetensors": lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
    "garbage JSON": lambda d: (d / "adapter_config.json").write_text("{not json"),
    "deeply nested JSON": lambda d: (d / "adapter_config.json").write_text(
        "[" * 100000 + "]" * 100000
    ),
    "JSON list": lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
    "missing config": lambda d: (d / "adapter_config.json").unlink(),
}


@pytest.mark.parametrize("case", list(FILES))
def test_damaged_adapter_folders_are_typed_errors(tmp_path: Path, case: str) -> None:
    save_adapter(
        tmp_path,
        {NAME: LoRAFactors(torch.ones(5, 2), torch.ones(2, 6))},
        {},
        {"r": 2, "lora_alpha": 8},
    )
    FILES[case](tmp_path)
    with pytest.raises(AdapterError) as info:
        load_adapter(tmp_path, client=4)
    assert info.value.client == 4


# ------------------------------------------------------------------------------ checkpoints

TINY = {"model": "tiny-roberta", "clients": 2, "rounds": 1, "local_steps": 1, "max_train": 16,
        "max_eval": 8, "batch_size": 4}  # fmt: skip


def _edit_json(key: str, value: Any) -> Callable[[Path], None]:
    def edit(out: Path) -> None:
        meta = json.loads((out / "checkpoint.json").read_text())
        meta[key] = value
        (out / "checkpoint.json").write_text(json.dumps(meta))

    return edit


def _edit_tensor(out: Path) -> None:
    from safetensors.torch import load_file

    path = out / "checkpoint-1.safetensors"
    flat = load_file(str(path))
    key = next(k for k in flat if k.startswith("update."))
    flat[key] = flat[key] + 1.0
    save_file(flat, str(path))


def _rehash(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Edit the tensors, then recompute the SHA-256 and the digest as an attacker would."""

    def edit(out: Path) -> None:
        from safetensors.torch import load_file

        from integration.runner.checkpoint import _digest, _sha256

        path = out / "checkpoint-1.safetensors"
        flat = load_file(str(path))
        change(flat)
        save_file(flat, str(path))
        meta = json.loads((out / "checkpoint.json").read_text())
        meta["sha256"] = _sha256(path)
        meta.pop("digest")
        meta["digest"] = _digest(meta)
        (out / "checkpoint.json").write_text(json.dumps(meta))

    return edit


def _first(flat: dict[str, Any], prefix: str) -> str:
    return next(k for k in flat if k.startswith(prefix))


def _downgrade(out: Path) -> None:
    meta = json.loads((out / "checkpoint.json").read_text())
    meta["format"] = 1
    for key in ("digest", "sha256"):
        meta.pop(key)
    (out / "checkpoint.json").write_text(json.dumps(meta))


CHECKPOINTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "format 1 without digest or SHA-256": (_downgrade, "format 1 is not this version's"),
    "NaN update, hashes recomputed": (
        _rehash(lambda f: f.__setitem__(_first(f, "update."), f[_first(f, "update.")] * math.nan)),
        "NaN/Inf",
    ),
    "Inf head, hashes recomputed": (
        _rehash(lambda f: f.__setitem__(_first(f, "dense."), f[_first(f, "dense.")] * math.inf)),
        "NaN/Inf",
    ),
    "wrong-shaped factor, hashes recomputed": (
        _rehash(
            lambda f: [
                f.__setitem__(k, torch.zeros(7, f[k].shape[1]))
                for k in list(f)
                if k.startswith("update.") and k.endswith(".B")
            ]
        ),
        "the model's weight is",
    ),
    "truncated tensors": (
        lambda o: (o / "checkpoint-1.safetensors").write_bytes(b"\x01" * 10),
        "SHA-256",
    ),
    "garbage JSON": (lambda o: (o / "checkpoint.json").write_text("{oops"), "not readable JSON"),
    "missing tensor file": (lambda o: (o / "checkpoint-1.safetensors").unlink(), "missing"),
    "edited tensor value": (_edit_tensor, "SHA-256"),
    "round moved ahead": (_edit_json("round", 5), "edited or damaged"),
    "path outside the folder": (_edit_json("tensors", "../../etc/passwd"), "edited or damaged"),
    "deleted checkpoint.json": (lambda o: (o / "checkpoint.json").unlink(), "no checkpoint.json"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Simulation(SimConfig(**(TINY | {"out": str(out)}))).run()  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_damaged_checkpoints_are_refused_in_one_line(
    finished_run: Path, tmp_path: Path, case: str
) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    damage, match = CHECKPOINTS[case]
    damage(out)
    sim = Simulation(SimConfig(**(TINY | {"out": str(out), "rounds": 2})))  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=match) as info:
        sim.run(resume=True)
    assert "\n" not in str(info.value)


def test_a_changed_configuration_is_refused(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for change in ({"seed": 1}, {"clients": 3}, {"client_ranks": [2, 4]}):
        sim = Simulation(SimConfig(**(TINY | {"out": str(out), "rounds": 2} | change)))  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="other settings"):
            sim.run(resume=True)


# ------------------------------------------------------------------------- the CLI reader


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"garbage", "cannot read safetensors"),
        (None, "cannot read safetensors"),  # no file at all
        ({"clients.x.B": torch.ones(3, 2)}, "is not clients.<i>.B"),
        ({"clients.0.B": torch.ones(3, 2)}, "client 0: .*missing tensor"),
        ({"other": torch.ones(1)}, "no 'clients.<i>.B'"),
    ],
)
def test_glora_compare_load_reports_bad_files_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object, match: str
) -> None:
    import re

    from glora_math.cli import main

    path = tmp_path / "clients.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        save_file(content, str(path))
    assert main(["compare", "--load", str(path), "--trials", "1"]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert err.count("\n") == 1


def test_a_signed_checkpoint_refuses_an_edit_with_recomputed_hashes(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLORA_CHECKPOINT_KEY", "a secret")
    out = tmp_path / "signed"
    Simulation(SimConfig(**(TINY | {"out": str(out)}))).run()  # type: ignore[arg-type]
    assert "hmac" in json.loads((out / "checkpoint.json").read_text())
    # Untouched: it resumes.
    more = SimConfig(**(TINY | {"out": str(out), "rounds": 2}))  # type: ignore[arg-type]
    assert Simulation(more).load()
    # Edited with every hash recomputed (the attacker has no key): refused.
    _rehash(lambda f: f.__setitem__(_first(f, "update."), f[_first(f, "update.")] + 1.0))(out)
    with pytest.raises(CheckpointError, match="not signed with GLORA_CHECKPOINT_KEY"):
        Simulation(more).load()
    # A checkpoint written without the key is refused while the key is set.
    import shutil

    unsigned = tmp_path / "unsigned"
    shutil.copytree(finished_run, unsigned)
    with pytest.raises(CheckpointError, match="not signed"):
        Simulation(SimConfig(**(TINY | {"out": str(unsigned), "rounds": 2}))).load()  # type: ignore[arg-type]


def test_non_lora_state_dicts_are_refused_by_name() -> None:
    # IA3 / LoHa given as (state_dict, config) pairs, not folders: refused with the reason, not
    # "max() arg is an empty sequence".
    from integration.peft_io import AdapterError, aggregate_peft

    sd = {"base_model.model.x.ia3_l": torch.ones(4)}
    with pytest.raises(AdapterError, match="client 0: peft_type 'IA3' is not LoRA"):
        aggregate_peft([(sd, {"peft_type": "IA3"}), (sd, {"peft_type": "IA3"})])
    with pytest.raises(AdapterError, match="client 0: no LoRA modules in the state dict"):
        aggregate_peft([(sd, {}), (sd, {})])


def test_a_checkpoint_whose_metrics_have_integer_keys_reads_back(tmp_path: Path) -> None:
    # JSON turns integer keys into strings, and sorted strings are not in numeric order: the
    # digest must be of the manifest as read back (a Flower round log keys nodes by id).
    from integration.runner.checkpoint import read_checkpoint, write_checkpoint

    rows = [{"round": 1, "rejected": {10: "NaN", 9: "shape"}}]
    write_checkpoint(tmp_path, 1, {"x": torch.zeros(2)}, {"config": {}, "metrics": rows})
    found = read_checkpoint(tmp_path)
    assert found is not None
    meta, flat = found
    assert meta["metrics"][0]["rejected"] == {"10": "NaN", "9": "shape"}
    assert torch.equal(flat["x"], torch.zeros(2))


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """``write_atomic``, which writes the raw JSON, tables, plots, manifests and tensors: a
    reader (the other chain of a cell rebuilding its table) sees the old file or the new
    one, never a part."""
    from integration.runner.files import write_atomic, write_text_atomic

    path = tmp_path / "fedit-seed0.json"
    write_text_atomic(path, '{"old": 1}')
    assert json.loads(path.read_text()) == {"old": 1}

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert json.loads(path.read_text()) == {"old": 1}
    write_text_atomic(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_held_folder_is_refused_to_a_second_holder_and_freed_after(tmp_path: Path) -> None:
    import fcntl
    import os

    from integration.runner.files import FolderInUseError, busy, held

    folder = tmp_path / "run"
    assert not busy(folder)
    with held(folder):
        assert folder.is_dir()
        assert busy(folder)
        # Held twice by one process: refused, not a wait for itself.
        with pytest.raises(FolderInUseError, match="by this process already"), held(folder):
            pass  # pragma: no cover - never entered
    assert not busy(folder)  # released when the block ended
    # Another holder (here a second open description of the folder, as another process has).
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert busy(folder)
        with (
            pytest.raises(FolderInUseError, match="in use by another process"),
            held(folder, wait=False),
        ):
            pass  # pragma: no cover - never entered
    finally:
        os.close(fd)
    with held(folder, wait=False):
        pass


def test_a_table_waits_for_the_other_writer_of_its_folder(tmp_path: Path) -> None:
    """While another writer holds the docs folder, ``write_table`` waits; after, it writes."""
    import fcntl
    import os
    import threading

    from integration.runner.tables import write_table

    config = {"seeds": [0], "base": {"model": "tiny-roberta", "task": "sst2"},
              "runs": [{"operator": "fedit"}]}  # fmt: skip
    docs = tmp_path / "docs"
    docs.mkdir()
    fd = os.open(docs, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Thread(target=write_table, args=(config, "c", docs))
    try:
        writer.start()
        writer.join(timeout=3.0)  # the table of a cell with no runs takes well under that
        assert writer.is_alive()
        assert not (docs / "c.md").exists()
    finally:
        os.close(fd)  # the other writer is done
    writer.join(timeout=60.0)
    assert not writer.is_alive()
    assert (docs / "c.md").is_file()


def test_a_run_folder_in_use_is_refused_not_interleaved(tmp_path: Path) -> None:
    from integration.runner.files import FolderInUseError, held

    out = tmp_path / "run"
    sim = Simulation(SimConfig(**(TINY | {"out": str(out)})))  # type: ignore[arg-type]
    with held(out), pytest.raises(FolderInUseError, match=re.escape(str(out))):
        sim.run()
    assert not (out / "checkpoint.json").exists()  # nothing was written by the refused run
