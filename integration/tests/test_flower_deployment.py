"""Flower's deployment engine for real, on 127.0.0.1: one SuperLink, three SuperNodes, flwr run.

The app is the template users copy (``integration/flower_template``); the processes are the
ones its README starts (:class:`LocalDeployment` runs the same command lines, insecure, on free
ports, and tears them down also when the test fails). One partition sends NaN: the server
must reject exactly that partition, with its reason, aggregate the others and export the
global adapter. A run-config value that cannot work must stop the run with a one-line error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from integration.flower.cli import new_app
from integration.flower_app import FlowerConfig, LocalDeployment
from integration.peft_io import load_adapter

BINARIES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr",
            "flwr-serverapp", "flwr-clientapp")  # fmt: skip
MISSING = [b for b in BINARIES if not (Path(sys.executable).parent / b).exists()]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"Flower's deployment binaries are not installed: {MISSING}"
)


def _processes_with(home: Path) -> list[int]:
    """Live processes (not zombies) whose environment has ``FLWR_HOME=<home>``."""
    needle = f"FLWR_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_deployment_engine_rejects_the_faulty_partition_and_exports_the_adapter(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    cfg = FlowerConfig(model="tiny-roberta", clients=3, rounds=1, local_steps=2, batch_size=8,
                       client_ranks=[2, 4, 4], max_train=120, max_eval=60, max_len=32,
                       threads=1, faulty=((2, "nan"),), out=str(out), timeout=60.0,
                       operator="glora_auto")  # mixed ranks, rank-4 readouts  # fmt: skip
    workdir = tmp_path / "deployment"
    app = new_app(tmp_path / "app")  # the folder `glora flower new` writes, as a user has it
    start = time.monotonic()
    with LocalDeployment(3, workdir, startup_timeout=60.0) as deployment:
        # A value that cannot work stops the run, with one line naming the key.
        bad = deployment.run(app, {**cfg.to_run_config(), "participation": 1.5}, timeout=120)
        assert not bad.ok
        assert "run-config key 'participation' = 1.5 must be in (0, 1]" in bad.log
        # The run: three partitions, partition 2 sends NaN.
        res = deployment.run(app, cfg.to_run_config(), timeout=240)
        assert res.ok, f"{res.status}\n{res.log[-3000:]}"
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 20
    while _processes_with(workdir / "flwr-home") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(workdir / "flwr-home") == [], "Flower processes outlived the test"

    results = json.loads((out / "flower_results.json").read_text())
    assert results["run_id"] == res.run_id
    (row,) = results["rounds"]
    assert row["accepted_partitions"] == [0, 1]
    assert list(row["rejected_partitions"]) == ["2"]
    assert "NaN" in row["rejected_partitions"]["2"]
    assert row["aggregation_error"] is not None
    assert 0.0 <= row["evaluate"]["accuracy"] <= 1.0
    assert "rejected the reply of node" in res.log
    assert "(partition 2): tensor" in res.log

    # The global adapter: a peft folder with every adapted module at the server rank.
    folder = out / "global_adapter"
    assert results["global_adapter"] == str(folder)
    adapter = load_adapter(folder)
    assert len(adapter.modules) == 4  # query and value of both layers of the tiny RoBERTa
    for m in adapter.modules.values():
        assert m.factors.rank == 4
        assert bool(torch.isfinite(m.factors.delta()).all())
    assert adapter.dense  # the classifier head (modules_to_save)
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier"
    ]
    # Every round left a verified checkpoint: a new SuperLink and new SuperNodes (new node
    # ids, the same partitions) resume from it and run round 2, each node as its partition.
    assert (out / "checkpoint" / "checkpoint.json").is_file()
    again = replace(cfg, rounds=2, resume=True)
    with LocalDeployment(3, tmp_path / "restarted", startup_timeout=60.0) as deployment:
        res2 = deployment.run(app, again.to_run_config(), timeout=240)
        assert res2.ok, f"{res2.status}\n{res2.log[-3000:]}"
    assert "resume: round 1 restored" in res2.log
    # partitions 0 and 1 continue with their state; partition 2's NaN reply was rejected in
    # round 1, so it has none to continue from
    assert res2.log.count("it continues as that client") == 2
    resumed = json.loads((out / "flower_results.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert resumed["rounds"][0]["accepted_partitions"] == [0, 1]  # round 1 kept as it was
    assert "NaN" in resumed["rounds"][1]["rejected_partitions"]["2"]
    print(f"deployment test: {elapsed:.0f} s with {os.cpu_count()} CPUs")
