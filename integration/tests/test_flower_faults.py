"""The Flower fault scenario, reduced (3 SuperNodes, 3 rounds, one node killed and restarted,
one malformed node every round, the SuperLink killed and the run resumed): every check holds.

The full scenario (10 nodes, 5 rounds, two kills) is the documented command of
:mod:`integration.flower.faults`; its last result is committed in docs/flower_faults.json.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None, reason="needs the flower extra"
)


def test_a_run_survives_a_killed_node_a_malformed_node_and_a_killed_superlink(
    tmp_path: Path,
) -> None:
    from integration.flower.faults import run_faults

    summary = run_faults(tmp_path, nodes=3, rounds=3, kill=1, down=5.0, timeout=30.0)
    assert summary["checks"] == dict.fromkeys(summary["checks"], True), (
        summary["checks"],
        summary.get("replay"),
        summary.get("resumed_run_log_tail"),
    )
    assert [r["round"] for r in summary["per_round"]] == [1, 2, 3]
    assert summary["superlink_killed_after_round"] == 2


def test_a_round_the_run_never_reached_is_a_failed_check_not_a_crash(tmp_path: Path) -> None:
    from integration.flower.config import FlowerConfig
    from integration.flower.faults import replay_error

    got = replay_error(tmp_path, FlowerConfig(), 3)
    assert got["ok"] is False
    assert "no replies of round 3 were kept" in got["why"]
