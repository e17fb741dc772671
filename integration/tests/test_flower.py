"""The Flower strategy: record conversion, heterogeneous ranks, every operator, bad replies.

These tests drive :class:`LoRAStrategy` with hand-built Flower messages (no Ray); the
end-to-end Flower simulation is ``test_flower_simulation_end_to_end``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from glora_math import LoRAFactors
from glora_math.linalg import lowrank_svd
from glora_math.registry import Guarantee, list_operators
from glora_math.tolerances import product_tol
from integration.flower import LoRAStrategy, factors_to_record, record_to_factors
from integration.peft_io import PREFIX, adapter_from_state_dict, aggregate_adapters

D, K = 12, 10
MODULES = ("layer.0.query", "layer.0.value", "layer.1.query")


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; give the tests one."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _state(r: int, seed: int, *, a_seed: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ga = g if a_seed is None else torch.Generator().manual_seed(a_seed)
    sd = {}
    for m in MODULES:
        sd[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(r, K, generator=ga)
        sd[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(D, r, generator=g)
    sd[f"{PREFIX}classifier.modules_to_save.default.weight"] = torch.randn(2, D, generator=g)
    return sd


def _reply(
    node: int, r: int, seed: int, *, n: int = 10, state: dict[str, torch.Tensor] | None = None
) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "adapter": ArrayRecord(state if state is not None else _state(r, seed)),
            "lora": ConfigRecord({"r": r, "lora_alpha": float(2 * r)}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
        }
    )
    return Message(content, reply_to=sent)


def _adapter(r: int, seed: int):  # type: ignore[no-untyped-def]
    sd = {k: v.double() for k, v in _state(r, seed).items()}
    return adapter_from_state_dict(sd, {"r": r, "lora_alpha": float(2 * r)})


def test_factor_records_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    fs = {
        m: LoRAFactors(torch.randn(D, 3, generator=g), torch.randn(3, K, generator=g))
        for m in MODULES
    }
    back = record_to_factors(factors_to_record(fs))
    assert set(back) == set(fs)
    for m in MODULES:
        assert torch.equal(back[m].B, fs[m].B)
        assert torch.equal(back[m].A, fs[m].A)


def test_glora_round_with_heterogeneous_ranks_and_readouts_of_each_rank() -> None:
    ranks = {1: 2, 2: 4, 3: 4}
    st = LoRAStrategy("glora")
    arrays, metrics = st.aggregate_train(1, [_reply(n, r, n) for n, r in ranks.items()])
    assert arrays is not None
    assert metrics is not None
    assert metrics["accepted"] == 3
    assert metrics["rejected"] == 0
    # The strategy only converts records: its update is aggregate_adapters' on the same inputs.
    ref = aggregate_adapters(
        [_adapter(r, n) for n, r in ranks.items()], [10.0] * 3, rank=4, operator="glora"
    )
    for m in MODULES:
        got = st.server.global_update[m]
        want = ref.results[m].update
        tol = product_tol(torch.float32, n=D + K + 10, scale=float(want.delta().norm()))
        assert float((got.delta().double() - want.delta()).norm()) <= tol
    # Next round: every node receives factors of its own rank, the best rank-r_i truncation.
    msgs = list(st.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2, 3])))
    assert [m.metadata.dst_node_id for m in msgs] == [1, 2, 3]
    for msg in msgs:
        init = record_to_factors(msg.content["init"])  # type: ignore[arg-type]
        r = ranks[msg.metadata.dst_node_id]
        for m in MODULES:
            assert init[m].rank == r
            U, s, Vh = lowrank_svd(
                st.server.global_update[m].B.double(), st.server.global_update[m].A.double()
            )
            best = (U[:, :r] * s[:r]) @ Vh[:r]
            tol = product_tol(torch.float32, n=D + K, scale=float(s.sum()))
            assert float((init[m].delta().double() - best).norm()) <= tol


def test_a_node_that_sat_out_gets_the_broadcast_at_its_rank() -> None:
    st = LoRAStrategy("glora", min_available_nodes=1)
    st.aggregate_train(1, [_reply(1, 2, 1), _reply(2, 4, 2)])
    st.aggregate_train(2, [_reply(2, 4, 3), _reply(3, 4, 4)])  # node 1 (rank 2) sat out
    msgs = list(st.configure_train(3, ArrayRecord(), ConfigRecord(), FakeGrid([1])))
    init = record_to_factors(msgs[0].content["init"])  # type: ignore[arg-type]
    assert all(f.rank == 2 for f in init.values())
    fresh = list(st.configure_train(3, ArrayRecord(), ConfigRecord(), FakeGrid([9])))
    assert len(fresh[0].content["init"]) == 0  # type: ignore[arg-type]  # unknown node: fresh LoRA


def _nan_state() -> dict[str, torch.Tensor]:
    sd = _state(4, 5)
    sd[f"{PREFIX}{MODULES[0]}.lora_B.weight"][0, 0] = math.nan
    return sd


def _missing_state() -> dict[str, torch.Tensor]:
    sd = _state(4, 6)
    del sd[f"{PREFIX}{MODULES[1]}.lora_A.weight"]
    del sd[f"{PREFIX}{MODULES[1]}.lora_B.weight"]
    return sd


def _wrong_shape_state() -> dict[str, torch.Tensor]:
    sd = _state(4, 7)
    sd[f"{PREFIX}{MODULES[2]}.lora_B.weight"] = torch.randn(D + 1, 4)
    return sd


def _half_pair_state() -> dict[str, torch.Tensor]:
    sd = _state(4, 8)
    del sd[f"{PREFIX}{MODULES[0]}.lora_A.weight"]
    return sd


def test_malformed_replies_are_rejected_with_reasons_and_the_round_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent = Message(RecordDict(), dst_node_id=14, message_type=MessageType.TRAIN)
    no_metrics = Message(
        RecordDict({"adapter": ArrayRecord(_state(4, 9)), "lora": ConfigRecord({"r": 4})}),
        reply_to=Message(RecordDict(), dst_node_id=15, message_type=MessageType.TRAIN),
    )
    replies = [
        _reply(1, 4, 1),
        _reply(2, 4, 2),
        _reply(3, 4, 3),
        _reply(10, 4, 0, state=_nan_state()),
        _reply(11, 4, 0, state=_missing_state()),
        _reply(12, 4, 0, state=_wrong_shape_state()),
        _reply(13, 4, 0, state=_half_pair_state()),
        Message(Error(code=0, reason="client crashed"), reply_to=sent),
        no_metrics,
        _reply(16, 4, 16, n=0),
    ]
    st = LoRAStrategy("glora")
    arrays, metrics = st.aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    log = st.history[-1]
    assert log.accepted == [1, 2, 3]
    assert set(log.rejected) == {10, 11, 12, 13, 14, 15, 16}
    assert "NaN" in log.rejected[10]
    assert "missing" in log.rejected[11]
    assert "wrong shape" in log.rejected[12]
    assert "partner" in log.rejected[13]
    assert "client crashed" in log.rejected[14]
    assert "metrics" in log.rejected[15]
    assert "num-examples" in log.rejected[16]
    assert "rejected the reply of node 10" in caplog.text
    # The accepted clients' aggregate is exactly what the three alone give.
    ref = aggregate_adapters(
        [_adapter(4, n) for n in (1, 2, 3)], [10.0] * 3, rank=4, operator="glora"
    )
    for m in MODULES:
        want = ref.results[m].update.delta()
        tol = product_tol(torch.float32, n=D + K + 12, scale=float(want.norm()))
        assert float((st.server.global_update[m].delta().double() - want).norm()) <= tol


def test_a_malformed_lora_config_is_rejected_with_the_key_named() -> None:
    sent = Message(RecordDict(), dst_node_id=21, message_type=MessageType.TRAIN)
    bad_alpha = Message(
        RecordDict(
            {
                "adapter": ArrayRecord(_state(4, 1)),
                "lora": ConfigRecord({"r": 4, "lora_alpha": "not a number"}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        reply_to=sent,
    )
    st = LoRAStrategy("glora")
    arrays, _ = st.aggregate_train(1, [_reply(1, 4, 1), _reply(2, 4, 2), bad_alpha])
    assert arrays is not None
    assert "lora_alpha must be a finite number" in st.history[-1].rejected[21]


def test_a_round_with_only_bad_replies_keeps_the_model() -> None:
    st = LoRAStrategy("glora")
    st.aggregate_train(1, [_reply(1, 4, 1), _reply(2, 4, 2)])
    before = {m: f.delta().clone() for m, f in st.server.global_update.items()}
    arrays, metrics = st.aggregate_train(2, [_reply(3, 4, 0, state=_nan_state())])
    assert arrays is None
    assert metrics is not None
    assert metrics["accepted"] == 0
    for m, delta in before.items():
        assert torch.equal(st.server.global_update[m].delta(), delta)


def test_ffa_rejects_a_client_whose_A_is_not_the_shared_one() -> None:
    st = LoRAStrategy("ffa_lora")
    good = [_reply(n, 4, 0, state=_state(4, n, a_seed=0)) for n in (1, 2)]
    arrays, _ = st.aggregate_train(1, [*good, _reply(3, 4, 3)])
    assert arrays is not None
    assert st.history[-1].accepted == [1, 2]
    assert "shared A" in st.history[-1].rejected[3]


def test_a_client_rank_above_the_server_rank_is_refused_not_crashed() -> None:
    st = LoRAStrategy("glora", server_rank=2)
    arrays, _ = st.aggregate_train(1, [_reply(1, 4, 1), _reply(2, 4, 2)])
    assert arrays is None
    assert "exceeds the server rank" in st.history[-1].rejected[1]


@pytest.mark.parametrize("name", list_operators())
def test_every_operator_runs_as_a_strategy(name: str) -> None:
    from glora_math.registry import get_operator

    op = get_operator(name)
    het = Guarantee.RANK_COMPATIBLE in op.guarantees
    ranks = {1: 2, 2: 4, 3: 4} if het else {1: 4, 2: 4, 3: 4}
    st = LoRAStrategy(name, server_rank=4)
    for rnd in (1, 2):
        msgs = list(st.configure_train(rnd, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2, 3])))
        assert len(msgs) == 3
        a_seed = 0 if op.shared_A else None  # FFA-LoRA clients share one frozen A
        replies = [
            _reply(n, r, 0, state=_state(r, 10 * rnd + n, a_seed=a_seed)) for n, r in ranks.items()
        ]
        arrays, metrics = st.aggregate_train(rnd, replies)
        assert arrays is not None, st.history[-1].rejected
        assert metrics is not None
        assert metrics["accepted"] == 3
        err = metrics["aggregation-error"]
        assert isinstance(err, float)
        assert math.isfinite(err)
    if Guarantee.EXACT_MEAN in op.guarantees:
        # Exact operators reproduce the mean, up to the float32 rounding of the payloads.
        assert err <= product_tol(torch.float32, n=D + K + 12, scale=1.0)


def test_evaluation_replies_are_weighted_and_bad_ones_skipped() -> None:
    st = LoRAStrategy("glora")

    def ev(node: int, **m: float) -> Message:
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        return Message(RecordDict({"metrics": MetricRecord(dict(m))}), reply_to=sent)

    out = st.aggregate_evaluate(
        1,
        [
            ev(1, **{"num-examples": 10, "accuracy": 0.5, "eval-loss": 1.0}),
            ev(2, **{"num-examples": 30, "accuracy": 1.0, "eval-loss": 0.0}),
            ev(3, **{"num-examples": 5, "accuracy": 1.5, "eval-loss": 0.0}),  # impossible
            ev(4, **{"num-examples": 5, "accuracy": math.nan, "eval-loss": 0.0}),
        ],
    )
    assert out is not None
    assert out["accuracy"] == pytest.approx(0.875)
    assert out["num-examples"] == 40


def test_flower_simulation_end_to_end(tmp_path: Path) -> None:
    """A real Flower simulation (Ray backend): 3 clients of ranks 2, 4, 4, 2 rounds, and
    partition 2 sending NaN. Run in a subprocess, as users run it, so that Ray's processes
    and their resource warnings stay out of the test process."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "integration.flower_app", "--clients", "3", "--rounds", "2",
           "--client-ranks", "2", "4", "4", "--faulty", "2:nan", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "flower_results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for r in res["rounds"]:
        assert len(r["accepted"]) == 2
        # Flower's node ids are random; the one rejection is partition 2's NaN reply.
        assert len(r["rejected"]) == 1
        assert "NaN" in next(iter(r["rejected"].values()))
        assert r["aggregation_error"] is not None
        assert r["evaluate"] is not None
        assert 0.0 <= r["evaluate"]["accuracy"] <= 1.0


@pytest.mark.parametrize("operator", ["glora", "glora_auto", "glora_auto_rank"])
def test_glora_rounds_report_a_certificate_equal_to_the_measured_error(operator: str) -> None:
    st = LoRAStrategy(operator, max_residual=1e-3)
    _, metrics = st.aggregate_train(1, [_reply(n, 4, n) for n in (1, 2, 3)])
    assert metrics is not None
    assert math.isclose(
        metrics["certified-residual"], metrics["aggregation-error"], rel_tol=1e-4, abs_tol=1e-6
    )
    # Random clients are far from any rank-4 consensus: the threshold warning is logged.
    if operator != "glora_auto_rank":
        assert any("ResidualWarning" in w for w in st.history[-1].warnings)


def test_the_default_strategy_is_the_side_aware_glora() -> None:
    assert LoRAStrategy().op.name == "glora_auto"
    _, metrics = LoRAStrategy("fedit").aggregate_train(1, [_reply(n, 4, n) for n in (1, 2)])
    assert metrics is not None
    assert math.isnan(metrics["certified-residual"])
