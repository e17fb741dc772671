"""The Flower strategy: record conversion, heterogeneous ranks, every operator, bad replies.

These tests drive :class:`LoRAStrategy` with hand-built Flower messages and the client helpers
with real peft models; hostile replies are ``test_flower_hostile.py``, Flower's deployment
engine end to end is ``test_flower_deployment.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
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

from glora_math import DEFAULT_OPERATOR, LoRAFactors
from glora_math.linalg import lowrank_svd
from glora_math.operators import Guarantee, list_operators
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


def _state(
    r: int, seed: int, *, a_seed: int | None = None, b_seed: int | None = None
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ga = g if a_seed is None else torch.Generator().manual_seed(a_seed)
    gb = g if b_seed is None else torch.Generator().manual_seed(b_seed)
    sd = {}
    for m in MODULES:
        sd[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(r, K, generator=ga)
        sd[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(D, r, generator=gb)
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
    from glora_math.operators import get_operator

    op = get_operator(name)
    het = Guarantee.RANK_COMPATIBLE in op.guarantees
    ranks = {1: 2, 2: 4, 3: 4} if het else {1: 4, 2: 4, 3: 4}
    st = LoRAStrategy(name, server_rank=4)
    for rnd in (1, 2):
        msgs = list(st.configure_train(rnd, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2, 3])))
        assert len(msgs) == 3
        # The factor the operator keeps frozen this round is the same for every client
        # (FFA-LoRA: A; RoLoRA: A, then B).
        frozen = op.frozen_factor(rnd)
        assert msgs[0].content["config"]["freeze-a"] == (frozen == "A")  # type: ignore[index]
        assert msgs[0].content["config"]["freeze-b"] == (frozen == "B")  # type: ignore[index]
        a_seed = 0 if frozen == "A" else None
        b_seed = 0 if frozen == "B" else None
        replies = [
            _reply(n, r, 0, state=_state(r, 10 * rnd + n, a_seed=a_seed, b_seed=b_seed))
            for n, r in ranks.items()
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


@pytest.mark.parametrize("operator", ["glora", "glora_auto", "glora_auto_rank", "flexlora"])
def test_certified_rounds_report_a_certificate_equal_to_the_measured_error(operator: str) -> None:
    st = LoRAStrategy(operator, max_residual=1e-3)
    _, metrics = st.aggregate_train(1, [_reply(n, 4, n) for n in (1, 2, 3)])
    assert metrics is not None
    assert math.isclose(
        metrics["certified-residual"], metrics["aggregation-error"], rel_tol=1e-4, abs_tol=1e-6
    )
    # Random clients are far from any rank-4 consensus: the threshold warning is logged.
    if operator != "glora_auto_rank":
        assert any("ResidualWarning" in w for w in st.history[-1].warnings)


def test_the_default_strategy_is_the_default_operator() -> None:
    assert LoRAStrategy().op.name == DEFAULT_OPERATOR
    _, metrics = LoRAStrategy("fedit").aggregate_train(1, [_reply(n, 4, n) for n in (1, 2)])
    assert metrics is not None
    assert math.isnan(metrics["certified-residual"])


# ----------------------------------------------------------------------------------------------
# Client helpers with real peft models, the exported adapter, settings, the CLI


def _peft(r: int, seed: int):  # type: ignore[no-untyped-def]
    from peft import get_peft_model

    from integration.models import build_model, lora_config

    base, _ = build_model("tiny-roberta", 2, 0)
    model = get_peft_model(base, lora_config(r, ("query", "value")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # peft starts B at 0: make the update non-zero
                p.copy_(torch.randn(p.shape, generator=g))
    return base, model


def test_client_helpers_speak_the_record_protocol_with_real_peft_models(tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    from integration.flower import (
        read_evaluate_message,
        read_train_message,
        train_reply,
    )
    from integration.models import lora_config, lora_shapes

    ranks = {11: 2, 12: 4, 13: 4}  # node -> rank; partitions 0, 1, 2
    _, first = _peft(2, 0)
    heads = {
        k.removeprefix(PREFIX): v.detach().clone()
        for k, v in get_peft_model_state_dict(first).items()
        if ".lora_" not in k
    }
    st = LoRAStrategy("glora", modules=lora_shapes(first), min_available_nodes=3)
    grid = FakeGrid(list(ranks))
    for rnd in (1, 2):
        msgs = list(st.configure_train(rnd, ArrayRecord(heads), ConfigRecord(), grid))
        replies = []
        for part, msg in enumerate(msgs):
            node = msg.metadata.dst_node_id
            job = read_train_message(msg)
            assert job.server_round == rnd
            assert job.freeze_a is False
            assert set(job.dense) == set(heads)
            if rnd == 1:
                assert job.init is None  # first contact: a fresh LoRA start
            else:  # later rounds: the server's factors at the node's own rank
                assert job.init is not None
                want = st.server.start_for(node, ranks[node])
                assert want is not None
                for m, f in job.init.items():
                    assert f.rank == ranks[node]
                    assert torch.allclose(f.delta(), want[m].delta().double(), atol=1e-5)
            _, model = _peft(ranks[node], 10 * rnd + part)
            sd = get_peft_model_state_dict(model)
            replies.append(Message(train_reply(sd, lora_config(ranks[node], ("query", "value")),
                                               num_examples=10 + part, train_loss=0.25 * part,
                                               partition=part), reply_to=msg))  # fmt: skip
        arrays, metrics = st.aggregate_train(rnd, replies)
        assert arrays is not None, st.history[-1].rejected
        assert metrics is not None
        assert st.history[-1].accepted == sorted(ranks)
        assert st.history[-1].partitions == {11: 0, 12: 1, 13: 2}
        # num-examples 10, 11, 12 weigh the losses 0, 0.25, 0.5
        assert metrics["train-loss"] == pytest.approx((11 * 0.25 + 12 * 0.5) / 33)
    # Evaluation: the client's deltas are the server's dense change of every module.
    msg = next(iter(st.configure_evaluate(2, ArrayRecord(), ConfigRecord(), grid)))
    job = read_evaluate_message(msg)
    want = st.server.dense_deltas()
    assert set(job.deltas()) == set(want)
    for m, d in job.deltas().items():
        assert torch.allclose(d, want[m], atol=1e-5)
    # The exported global adapter loads into peft and adds exactly the global update.
    folder = tmp_path / "global"
    written = st.save_global_adapter(folder, lora_config(4, ("query", "value")))
    assert written == [folder / "adapter_model.safetensors", folder / "adapter_config.json"]
    from integration.models import build_model

    fresh, _ = build_model("tiny-roberta", 2, 0)  # get_peft_model wrapped `base` in place
    loaded = PeftModel.from_pretrained(fresh, str(folder))
    for m, f in st.server.global_update.items():
        layer = loaded.get_submodule(f"base_model.model.{m}")
        delta = layer.get_delta_weight("default")
        assert torch.allclose(delta.double(), f.delta().double(), atol=1e-5), m


def test_train_reply_carries_rank_and_alpha_patterns() -> None:
    from integration.flower import train_reply

    sd = _state(4, 1)
    sd[f"{PREFIX}{MODULES[2]}.lora_A.weight"] = sd[f"{PREFIX}{MODULES[2]}.lora_A.weight"][:2]
    sd[f"{PREFIX}{MODULES[2]}.lora_B.weight"] = sd[f"{PREFIX}{MODULES[2]}.lora_B.weight"][:, :2]
    config = {"r": 4, "lora_alpha": 8.0, "rank_pattern": {MODULES[2]: 2},
              "alpha_pattern": {MODULES[2]: 16.0}}  # fmt: skip
    reply = Message(train_reply(sd, config, num_examples=5),
                    reply_to=Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN))  # fmt: skip
    st = LoRAStrategy("glora")
    st.aggregate_train(1, [reply])
    assert st.history[-1].accepted == [1]
    want = adapter_from_state_dict({k: v.double() for k, v in sd.items()}, config)
    got = st.server.global_update[MODULES[2]]
    assert got.rank == 2
    assert torch.allclose(got.delta(), want.modules[MODULES[2]].factors.delta(), atol=1e-5)


def test_the_strategy_waits_for_nodes_then_goes_on() -> None:
    class SlowGrid:
        def __init__(self) -> None:
            self.calls = 0

        def get_node_ids(self) -> list[int]:
            self.calls += 1
            return [1] if self.calls < 3 else [1, 2]

    st = LoRAStrategy("glora", min_available_nodes=2, node_wait=10.0)
    msgs = list(st.configure_train(1, ArrayRecord(), ConfigRecord(), SlowGrid()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2]
    impatient = LoRAStrategy("glora", min_available_nodes=2, node_wait=0.0)
    msgs = list(impatient.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1])))
    assert [m.metadata.dst_node_id for m in msgs] == [1]


def test_the_template_lists_every_run_config_key_with_its_default() -> None:
    import importlib
    import tomllib

    from integration.flower_app import TEMPLATE, FlowerConfig

    app = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["config"] == FlowerConfig().to_run_config()
    for ref in app["components"].values():
        module, _, attr = ref.partition(":")
        assert module == "glora_math.integration.flower.app"
        assert hasattr(importlib.import_module("integration.flower.app"), attr)
    # The connection file names the port and the security the README's commands use.
    conn = tomllib.loads((TEMPLATE / "flower-config.toml").read_text())["superlink"]
    assert conn["local-deployment"] == {"address": "127.0.0.1:9093", "insecure": True}


def test_the_template_readme_runs_what_local_deployment_runs(tmp_path: Path) -> None:
    from integration.flower_app import TEMPLATE, LocalDeployment

    readme = (TEMPLATE / "README.md").read_text()
    dep = LocalDeployment(3, tmp_path)
    dep.port = 9093
    lines = {"flower-superlink": dep.superlink_command(), "flower-supernode":
             dep.supernode_command(0, 9100)}  # fmt: skip
    for prog, cmd in lines.items():
        documented = next(line for line in readme.splitlines() if line.startswith(prog))
        want = " ".join(cmd[1:]).replace("--host 127.0.0.1 ", "")
        want = want.replace("--node-config partition-id=0 num-partitions=3",
                            '--node-config "partition-id=0 num-partitions=3"')  # fmt: skip
        assert documented == f"{prog} {want}"


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"rouds": 2}, "unknown run-config key 'rouds' (did you mean 'rounds'?)"),
        ({"rounds": "2"}, "run-config key 'rounds' must be a whole number, got '2' (str)"),
        ({"rounds": 0}, "run-config key 'rounds' = 0 must be at least 1"),
        ({"lr": math.inf}, "run-config key 'lr' must be a finite number"),
        ({"participation": 1.5}, "run-config key 'participation' = 1.5 must be in (0, 1]"),
        ({"client-ranks": "2,x"}, "'client-ranks' must be comma-separated whole numbers"),
        ({"client-ranks": "2,0"}, "run-config key 'client-ranks' = '2,0' must be positive"),
        ({"faulty": "2:boom"}, "run-config key 'faulty' = '2:boom' must be 'partition:kind'"),
        ({"faulty": "2"}, "'faulty' must be comma-separated 'partition:kind' pairs"),
        ({"operator": "glora_atuo"}, "(did you mean 'glora_auto'?)"),
        ({"per-client-init": 1}, "'per-client-init' must be true or false, got 1 (int)"),
        ({"options": "lam"}, "run-config key 'options' = 'lam' cannot be read"),
        (
            {"options": "lam=0.5"},
            f"'options' = 'lam=0.5' names ['lam']; operator '{DEFAULT_OPERATOR}'",
        ),
        ({"train-file": "a.tsv"}, "'train-file' = 'a.tsv' needs its partner"),
        ({"task": "imdb"}, "'task' = 'imdb' is not one of"),
        ({"server-rank": -1}, "'server-rank' = -1 must be positive"),
    ],
)
def test_run_config_errors_are_one_line_and_name_the_key(
    run_config: dict[str, object], message: str
) -> None:
    from integration.flower_app import FlowerConfig, FlowerConfigError

    with pytest.raises(FlowerConfigError) as info:
        FlowerConfig.from_run_config(run_config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_run_config_round_trips() -> None:
    from integration.flower_app import FlowerConfig

    cfg = FlowerConfig(client_ranks=[8, 4], server_rank=8, faulty=((1, "shape"), (2, "nan")),
                       target_modules=["q_proj", "v_proj"], per_client_init=True,
                       operator="lora_fair", options={"lam": 0.02, "steps": 10.0},
                       train_file="t.tsv", eval_file="e.tsv", text_pair_column="b")  # fmt: skip
    assert FlowerConfig.from_run_config(cfg.to_run_config()) == cfg
    assert FlowerConfig.from_run_config(FlowerConfig().to_run_config()) == FlowerConfig()
    unset = FlowerConfig.from_run_config({"server-rank": 0, "client-ranks": "", "data-dir": "",
                                          "target-modules": "", "options": ""})  # fmt: skip
    assert (unset.server_rank, unset.client_ranks, unset.data_dir) == (None, None, None)
    assert (unset.target_modules, unset.options) == (None, None)


def test_the_runner_and_the_flower_app_share_settings_defaults_and_checks() -> None:
    """One RunSettings: every shared field has one default and one check, worded per surface."""
    from dataclasses import fields

    from integration.federated.settings import RunSettings
    from integration.flower_app import FlowerConfig, FlowerConfigError
    from integration.runner.config import SimConfig

    sim, flower = SimConfig(), FlowerConfig()
    for f in fields(RunSettings):
        if f.name != "out":
            assert getattr(sim, f.name) == getattr(flower, f.name), f.name
    for bad in ({"rounds": 0}, {"client_ranks": [2, 0]}, {"lr": -1.0}, {"operator": "nope"}):
        sim_found = SimConfig(**bad).problems()  # type: ignore[arg-type]
        with pytest.raises(FlowerConfigError) as info:
            FlowerConfig(**bad).check()  # type: ignore[arg-type]
        why = RunSettings(**bad).invalid_settings()[0][2]  # type: ignore[arg-type]
        assert sim_found[0].endswith(why)
        assert str(info.value).endswith(why)
    # One --client-ranks meaning: the list cycled over the clients, in both.
    assert SimConfig(clients=5, client_ranks=[2, 8]).ranks() == [2, 8, 2, 8, 2]
    assert [FlowerConfig(client_ranks=[2, 8]).rank_of(p) for p in range(3)] == [2, 8, 2]


def test_node_config_is_checked() -> None:
    from types import SimpleNamespace

    from integration.flower_app import FlowerConfigError, _node

    def node(**nc: object) -> tuple[int, int, str | None]:
        return _node(SimpleNamespace(node_config=nc))  # type: ignore[arg-type]

    assert node(**{"partition-id": 1, "num-partitions": 3}) == (1, 3, None)
    assert node(**{"partition-id": 0, "num-partitions": 1, "data-dir": "/d"}) == (0, 1, "/d")
    with pytest.raises(FlowerConfigError, match="partition-id=<i> num-partitions=<n>"):
        node()
    with pytest.raises(FlowerConfigError, match=r"partition-id=3 is not in \[0, 3\)"):
        node(**{"partition-id": 3, "num-partitions": 3})


def test_the_command_line_checks_its_settings_and_runs_the_deployment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from integration import flower_app

    with pytest.raises(SystemExit) as info:
        flower_app.main(["--participation", "2"])
    assert info.value.code == 2
    assert (
        "error: run-config key 'participation' = 2.0 must be in (0, 1]" in capsys.readouterr().err
    )
    seen = []

    def fake_run(cfg: flower_app.FlowerConfig) -> dict[str, object]:
        seen.append(cfg)
        row = {"round": 1, "accepted_partitions": [0, 1], "rejected_partitions": {"2": "NaN"},
               "aggregation_error": 0.1, "evaluate": {"accuracy": 0.5}}  # fmt: skip
        return {"rounds": [row], "global_adapter": "out/global_adapter"}

    monkeypatch.setattr(flower_app, "run", fake_run)
    argv = ["--rounds", "1", "--client-ranks", "2,8", "--faulty", "2:nan", "--out", "o",
            "--operator", "glora_auto", "--options", "max_residual=0.5", "--per-client-init"]  # fmt: skip
    assert flower_app.main(argv) == 0
    assert seen == [flower_app.FlowerConfig(rounds=1, client_ranks=[2, 8], faulty=((2, "nan"),),
                                            out="o", operator="glora_auto",
                                            options={"max_residual": 0.5},
                                            per_client_init=True)]  # fmt: skip
    assert "round 1: accepted partitions [0, 1], rejected {'2': 'NaN'}" in capsys.readouterr().out


def test_the_exported_adapter_names_its_base_model(tmp_path: Path) -> None:
    from integration.federated.settings import minilm_path
    from integration.flower_app import FlowerConfig

    assert FlowerConfig(model="minilm").base_model_path() == str(minilm_path())
    assert FlowerConfig(model="tiny-roberta").base_model_path() is None  # random: no name
    assert FlowerConfig(model=str(tmp_path)).base_model_path() == str(tmp_path)


def test_a_node_started_for_another_number_of_partitions_is_told_to_set_clients() -> None:
    from integration.flower.app import check_partitions
    from integration.flower_app import FlowerConfig, FlowerConfigError

    check_partitions(FlowerConfig(clients=3), 3)
    with pytest.raises(
        FlowerConfigError, match=r"num-partitions=3 but .*'clients' = 10.*clients=3"
    ):
        check_partitions(FlowerConfig(), 3)


def _named_reply(node: int, r: int, seed: int, partition: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "adapter": ArrayRecord(_state(r, seed)),
            "lora": ConfigRecord({"r": r, "lora_alpha": float(2 * r)}),
            "metrics": MetricRecord(
                {"num-examples": 10, "train-loss": 0.5, "partition-id": partition}
            ),
        }
    )
    return Message(content, reply_to=sent)


def test_missing_nodes_are_named_by_partition_and_too_few_replies_skip_the_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Round 2: node 3 (partition 2, learnt in round 1) never answers and the SuperLink says
    why; with min_replies = 3 the two usable replies are not enough: the model stays."""
    from flwr.app import Error

    st = LoRAStrategy("glora", min_available_nodes=3, min_replies=3)
    grid = FakeGrid([1, 2, 3])
    list(st.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    _, m1 = st.aggregate_train(1, [_named_reply(n, 2, n, n - 1) for n in (1, 2, 3)])
    assert m1 is not None
    assert (m1["accepted"], m1["missing"]) == (3, 0)
    before = {k: v.delta().clone() for k, v in st.server.global_update.items()}
    list(st.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    lost = Message(Error(code=0, reason="node 3 is unavailable"),
                   reply_to=Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN))  # fmt: skip
    with caplog.at_level("WARNING"):
        _, m2 = st.aggregate_train(2, [_named_reply(1, 2, 11, 0), _named_reply(2, 2, 12, 1), lost])
    assert m2 is not None
    logged = st.history[-1]
    assert logged.missing == {3: "no reply (Flower: node 3 is unavailable)"}
    assert logged.who(3) == "node 3 (partition 2)"
    assert (m2["accepted"], m2["rejected"], m2["missing"]) == (0, 0, 1)
    assert any("only 2 usable replies, 3 needed" in w for w in logged.warnings)
    for name, delta in before.items():
        assert torch.equal(st.server.global_update[name].delta(), delta)  # model unchanged
    text = caplog.text
    assert "node 3 (partition 2) sent no reply (Flower: node 3 is unavailable)" in text
    assert "round skipped, the global model is unchanged" in text


def test_residual_warnings_reach_the_server_log(caplog: pytest.LogCaptureFixture) -> None:
    st = LoRAStrategy("glora", server_rank=2, max_residual=1e-3)
    with caplog.at_level("WARNING"):
        st.aggregate_train(1, [_reply(n, 2, n) for n in (1, 2, 3)])
    assert "certified relative residual" in caplog.text


class AnsweringGrid(FakeGrid):
    """A grid whose nodes answer the strategy's QUERY with the partition they hold."""

    def __init__(self, partitions: dict[int, int]) -> None:
        super().__init__(list(partitions))
        self.partitions = partitions
        self.asked: list[int] = []

    def send_and_receive(
        self, messages: list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = []
        for m in messages:
            node = int(m.metadata.dst_node_id)
            self.asked.append(node)
            pid = self.partitions[node]
            out.append(
                Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=m)
            )
        return out


def test_a_restarted_node_continues_as_the_client_of_its_partition() -> None:
    """Node 3 (partition 2) restarts as node 9: it gets node 3's factors, not a fresh start."""
    st = LoRAStrategy("glora", min_available_nodes=3)
    ranks = {1: 2, 2: 4, 3: 4}
    first = AnsweringGrid({1: 0, 2: 1, 3: 2})
    list(st.configure_train(1, ArrayRecord(), ConfigRecord(), first))
    assert sorted(first.asked) == [1, 2, 3]
    st.aggregate_train(1, [_named_reply(n, r, n, n - 1) for n, r in ranks.items()])
    want = st.server.start_for(3, 4)
    assert want
    second = AnsweringGrid({1: 0, 2: 1, 9: 2})
    msgs = list(st.configure_train(2, ArrayRecord(), ConfigRecord(), second))
    assert second.asked == [9]  # only the stranger is asked
    sent = {int(m.metadata.dst_node_id): m for m in msgs}
    init = record_to_factors(sent[9].content["init"])  # type: ignore[arg-type]
    want = record_to_factors(factors_to_record(want))  # what the record carries, bit for bit
    for name, f in want.items():
        assert torch.equal(init[name].B, f.B)
        assert torch.equal(init[name].A, f.A)
    assert st.server.client_rank.get(9) == 4
    assert 3 not in st.server.client_rank
    assert st.partition_of[3] == 2  # still named by its partition if it is sampled again


def test_each_round_leaves_a_verified_checkpoint_and_a_resumed_run_continues_it(
    tmp_path: Path,
) -> None:
    """The server crashes after round 1; round 2 of the resumed run starts from round 1's state."""
    import json

    from integration.flower.app import resume_strategy, save_round
    from integration.flower_app import FlowerConfig
    from integration.runner.checkpoint import CheckpointError

    cfg = FlowerConfig(
        model="tiny-roberta", clients=3, rounds=3, operator="glora", out=str(tmp_path)
    )
    grid = AnsweringGrid({1: 0, 2: 1, 3: 2})
    first = LoRAStrategy("glora", min_available_nodes=3)
    list(first.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    first.aggregate_train(1, [_named_reply(n, 2 + 2 * (n > 1), n, n - 1) for n in (1, 2, 3)])
    save_round(tmp_path, first, cfg, [], run_id=1)
    results = json.loads((tmp_path / "flower_results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1]  # written after the round, not at the end
    # A fresh server process resumes: the same state, round numbering and partitions.
    second = LoRAStrategy("glora", min_available_nodes=3)
    done = resume_strategy(second, tmp_path / "checkpoint", replace(cfg, resume=True))
    assert [r["round"] for r in done] == [1]
    assert second.round_offset == 1
    assert second.partition_of == {1: 0, 2: 1, 3: 2}
    for name, f in first.server.global_update.items():
        assert torch.equal(second.server.global_update[name].B, f.B)
        assert torch.equal(second.server.global_update[name].A, f.A)
    msgs = list(second.configure_train(1, ArrayRecord(), ConfigRecord(), grid))  # Flower's round 1
    assert {m.content["config"]["server-round"] for m in msgs} == {2}  # type: ignore[index]
    for m in msgs:
        node = int(m.metadata.dst_node_id)
        want = record_to_factors(
            factors_to_record(first.server.start_for(node, first.server.client_rank[node]) or {})
        )
        got = record_to_factors(m.content["init"])  # type: ignore[arg-type]
        assert all(torch.equal(got[k].B, want[k].B) for k in want)
    # Refused in one line: other settings, nothing left to do, an edited checkpoint.
    with pytest.raises(CheckpointError, match=r"made with other settings \(lr\)"):
        resume_strategy(LoRAStrategy("glora"), tmp_path / "checkpoint", replace(cfg, lr=0.1))
    with pytest.raises(CheckpointError, match="nothing is left to do"):
        resume_strategy(LoRAStrategy("glora"), tmp_path / "checkpoint", replace(cfg, rounds=1))
    manifest = tmp_path / "checkpoint" / "checkpoint.json"
    meta = json.loads(manifest.read_text())
    meta["metrics"][0]["accepted"] = [1]
    manifest.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="edited or damaged"):
        resume_strategy(LoRAStrategy("glora"), tmp_path / "checkpoint", cfg)


def test_local_runs_share_the_cores_out_unless_told() -> None:
    from integration.flower.app import local_threads
    from integration.flower_app import FlowerConfig

    assert local_threads(FlowerConfig(clients=3), cpus=16) == 5
    assert local_threads(FlowerConfig(clients=10), cpus=2) == 1
    assert local_threads(FlowerConfig(clients=3, threads=4), cpus=16) == 4
