"""The Flower trust boundary: a client can neither crash nor spoil a round.

Every hostile reply below is rejected on its own, with its node, partition and reason logged;
the honest replies are aggregated exactly as if it had not been sent; no exception reaches
Flower; and no reply changes which other replies are accepted (the hostile one is tried both
first and last).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from integration.flower import LoRAStrategy
from integration.peft_io import PREFIX
from integration.server import FederatedServer

D, K = 12, 10
MODULES = ("layer.0.query", "layer.0.value", "layer.1.query")
HEAD = f"{PREFIX}classifier.modules_to_save.default.weight"
HONEST = (1, 2, 3)
BAD = 9  # the hostile node
PARTITION = 7  # the partition the hostile reply names (where its metrics survive)


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; give the tests one."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _state(r: int, seed: int, *, extra: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in (*MODULES, "layer.1.value") if extra else MODULES:
        sd[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(r, K, generator=g)
        sd[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(D, r, generator=g)
    sd[HEAD] = torch.randn(2, D, generator=g)
    return sd


def _message(node: int, records: dict[str, Any], kind: str = MessageType.TRAIN) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=kind)
    return Message(RecordDict(records), reply_to=sent)


def _reply(
    node: int,
    r: int = 4,
    seed: int | None = None,
    *,
    state: dict[str, torch.Tensor] | None = None,
    arrays: ArrayRecord | None = None,
    lora: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Message:
    if arrays is None:
        arrays = ArrayRecord(
            state if state is not None else _state(r, node if seed is None else seed)
        )
    return _message(
        node,
        {
            "adapter": arrays,
            "lora": ConfigRecord(
                lora if lora is not None else {"r": r, "lora_alpha": float(2 * r)}
            ),
            "metrics": MetricRecord(
                metrics
                if metrics is not None
                else {"num-examples": 10, "train-loss": 0.5, "partition-id": node}
            ),
        },
    )


def _honest() -> list[Message]:
    return [_reply(n) for n in HONEST]


def _with_array(key: str, arr: Array) -> ArrayRecord:
    """An honest state (rank 4, seed BAD) whose entry ``key`` is replaced by a raw Array."""
    rec = ArrayRecord(_state(4, BAD))
    rec[key] = arr
    return rec


def _npy(value: np.ndarray, *, pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=pickle)
    return buf.getvalue()


B0 = f"{PREFIX}{MODULES[0]}.lora_B.weight"
A0 = f"{PREFIX}{MODULES[0]}.lora_A.weight"
HOSTILE_METRICS = {"num-examples": 10, "train-loss": 0.5, "partition-id": PARTITION}


@dataclass(frozen=True)
class Case:
    """A hostile reply of node BAD and a piece of the reason its rejection must give."""

    name: str
    make: Callable[[], Message]
    reason: str
    strategy: dict[str, Any] = field(default_factory=dict)
    named: bool = True  # whether the reply still names its partition


def _rank0() -> Message:
    sd = _state(4, BAD)
    sd[A0], sd[B0] = torch.zeros(0, K), torch.zeros(D, 0)
    return _reply(BAD, state=sd, metrics=HOSTILE_METRICS)


def _all_rank0() -> Message:
    sd = {
        k: (torch.zeros(0, K) if ".lora_A." in k else torch.zeros(D, 0))
        for k in _state(4, 0)
        if ".lora_" in k
    }
    sd[HEAD] = torch.randn(2, D)
    return _reply(BAD, state=sd, lora={"r": 0, "lora_alpha": 8.0}, metrics=HOSTILE_METRICS)


def _raw(key: str, dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Message:
    arrays = _with_array(key, Array(dtype=dtype, shape=shape, stype=stype, data=data))
    return _reply(BAD, arrays=arrays, metrics=HOSTILE_METRICS)


def _huge() -> Message:
    sd = {k: v.double() for k, v in _state(4, BAD).items()}
    sd[B0] = torch.full((D, 4), 1e200, dtype=torch.float64)
    return _reply(BAD, state=sd, metrics=HOSTILE_METRICS)


CASES = [
    Case("rank-0 module", _rank0, "rank-0"),
    Case("rank-0 adapter (r = 0)", _all_rank0, "rank-0"),
    Case(
        "unicode array",
        lambda: _raw(B0, "<U3", (D, 4), "numpy.ndarray", _npy(np.full((D, 4), "abc"))),
        "dtype '<U3'",
    ),
    Case(
        "object array",
        lambda: _raw(
            B0, "object", (2,), "numpy.ndarray", _npy(np.array([{}, 1], dtype=object), pickle=True)
        ),
        "cannot be decoded",
    ),
    Case(
        "complex array",
        lambda: _reply(
            BAD, arrays=_with_array(B0, Array(np.ones((D, 4)) + 1j)), metrics=HOSTILE_METRICS
        ),
        "dtype '<c16'",
    ),
    Case(
        "integer array",
        lambda: _reply(
            BAD,
            arrays=_with_array(B0, Array(np.ones((D, 4), dtype=np.int64))),
            metrics=HOSTILE_METRICS,
        ),
        "dtype '<i8'",
    ),
    Case(
        "garbage bytes",
        lambda: _raw(B0, "float32", (D, 4), "numpy.ndarray", b"\x93NUMPY garbage"),
        "cannot be decoded",
    ),
    Case(
        "empty payload",
        lambda: _raw(B0, "float32", (D, 4), "numpy.ndarray", b""),
        "cannot be decoded",
    ),
    Case(
        "wrong stype",
        lambda: _raw(B0, "float32", (D, 4), "torch.Tensor", _npy(np.ones((D, 4), np.float32))),
        "serialisation type",
    ),
    Case(
        "declared dtype lies",
        lambda: _raw(B0, "float64", (D, 4), "numpy.ndarray", _npy(np.ones((D, 4), np.float32))),
        "declares dtype",
    ),
    Case(
        "declared shape lies",
        lambda: _raw(B0, "float32", (4, D), "numpy.ndarray", _npy(np.ones((D, 4), np.float32))),
        "declares dtype",
    ),
    Case("entries of 1e200", _huge, "above the bound"),
    Case(
        "lora_alpha of 1e300",
        lambda: _reply(BAD, lora={"r": 4, "lora_alpha": 1e300}, metrics=HOSTILE_METRICS),
        "lora_alpha too large",
    ),
    Case(
        "rank 8 above the server rank 4",
        lambda: _reply(BAD, 8, metrics=HOSTILE_METRICS),
        "exceeds the server rank",
        {"server_rank": 4},
    ),
    Case(
        "num-examples 1e308",
        lambda: _reply(BAD, metrics={**HOSTILE_METRICS, "num-examples": 1e308}),
        "num-examples",
    ),
    Case(
        "num-examples a list",
        lambda: _reply(BAD, metrics={**HOSTILE_METRICS, "num-examples": [10, 10]}),
        "num-examples",
    ),
    Case(
        "num-examples NaN",
        lambda: _reply(BAD, metrics={**HOSTILE_METRICS, "num-examples": math.nan}),
        "num-examples",
    ),
    Case(
        "metrics as a ConfigRecord",
        lambda: _message(
            BAD,
            {
                "adapter": ArrayRecord(_state(4, BAD)),
                "lora": ConfigRecord({"r": 4}),
                "metrics": ConfigRecord({"num-examples": 10}),
            },
        ),
        "MetricRecord 'metrics'",
        named=False,
    ),
    Case(
        "no adapter",
        lambda: _message(
            BAD, {"lora": ConfigRecord({"r": 4}), "metrics": MetricRecord(HOSTILE_METRICS)}
        ),
        "ArrayRecord 'adapter'",
    ),
    Case(
        "r is a string",
        lambda: _reply(BAD, lora={"r": "4"}, metrics=HOSTILE_METRICS),
        "r must be a positive",
    ),
    Case(
        "r disagrees with the factors",
        lambda: _reply(BAD, lora={"r": 2, "lora_alpha": 8.0}, metrics=HOSTILE_METRICS),
        "config says r",
    ),
    Case(
        "rank_pattern not JSON",
        lambda: _reply(BAD, lora={"r": 4, "rank_pattern": "{oops"}, metrics=HOSTILE_METRICS),
        "rank_pattern",
    ),
    Case(
        "extra module",
        lambda: _reply(BAD, state=_state(4, BAD, extra=True), metrics=HOSTILE_METRICS),
        "module mismatch",
    ),
    Case(
        "extra head",
        lambda: _reply(
            BAD,
            state={**_state(4, BAD), f"{PREFIX}pooler.weight": torch.ones(3, 3)},
            metrics=HOSTILE_METRICS,
        ),
        "modules_to_save",
    ),
    Case(
        "client error",
        lambda: Message(
            Error(code=0, reason="boom\nFAKE LOG LINE"),
            reply_to=Message(RecordDict(), dst_node_id=BAD, message_type=MessageType.TRAIN),
        ),
        "client error: boom",
        named=False,
    ),
]


def _global(st: LoRAStrategy) -> dict[str, torch.Tensor]:
    return st.server.state_tensors()


@pytest.mark.parametrize("first", [True, False], ids=["hostile-first", "hostile-last"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_reply_is_rejected_alone_and_changes_nothing_else(
    case: Case, first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    honest = LoRAStrategy("glora", **case.strategy)
    want_arrays, want_metrics = honest.aggregate_train(1, _honest())
    assert want_arrays is not None
    st = LoRAStrategy("glora", **case.strategy)
    hostile = case.make()
    replies = [hostile, *_honest()] if first else [*_honest(), hostile]
    arrays, metrics = st.aggregate_train(1, replies)  # never raises
    log = st.history[-1]
    assert log.accepted == list(HONEST)
    assert set(log.rejected) == {BAD}
    assert case.reason in log.rejected[BAD]
    assert "\n" not in log.rejected[BAD]  # client text cannot forge log lines
    who = f"node {BAD} (partition {PARTITION})" if case.named else f"node {BAD}:"
    assert f"rejected the reply of {who}" in caplog.text
    # The round is exactly the honest one: same server state, same metrics.
    assert arrays is not None
    assert metrics is not None
    got, want = _global(st), _global(honest)
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert metrics["train-loss"] == want_metrics["train-loss"]  # type: ignore[index]
    assert metrics["aggregation-error"] == want_metrics["aggregation-error"]  # type: ignore[index]


def test_two_replies_of_1e308_examples_cannot_overflow_the_weights() -> None:
    big = {"num-examples": 1e308, "train-loss": 0.5}
    st = LoRAStrategy("glora")
    arrays, metrics = st.aggregate_train(
        1, [_reply(8, metrics=big), _reply(9, metrics=big), *_honest()]
    )
    assert arrays is not None
    assert metrics is not None
    assert st.history[-1].accepted == list(HONEST)
    assert set(st.history[-1].rejected) == {8, 9}
    assert math.isfinite(metrics["train-loss"])  # type: ignore[arg-type]


def test_a_node_that_replies_twice_counts_once() -> None:
    honest = LoRAStrategy("glora")
    honest.aggregate_train(1, _honest())
    st = LoRAStrategy("glora")
    again = _reply(2, seed=99, metrics={"num-examples": 1000, "train-loss": 9.0})
    arrays, metrics = st.aggregate_train(1, [*_honest(), again])
    assert arrays is not None
    assert metrics is not None
    assert st.history[-1].accepted == list(HONEST)
    assert "duplicate reply" in st.history[-1].rejected[2]
    assert metrics["train-loss"] == 0.5  # the duplicate's loss and weight are not counted
    for k, v in _global(honest).items():
        assert torch.equal(_global(st)[k], v), k


def test_a_nan_train_loss_is_left_out_of_the_round_metric() -> None:
    st = LoRAStrategy("glora")
    odd = _reply(4, metrics={"num-examples": 10, "train-loss": math.nan})
    _, metrics = st.aggregate_train(1, [*_honest(), odd])
    assert metrics is not None
    assert st.history[-1].accepted == [*HONEST, 4]  # the adapter itself is fine
    assert metrics["train-loss"] == 0.5
    assert any("train-loss" in w for w in st.history[-1].warnings)


@pytest.mark.parametrize("configured", [True, False], ids=["modules=", "no reference"])
def test_an_early_client_with_an_extra_module_cannot_lock_honest_clients_out(
    configured: bool,
) -> None:
    reference = {m: (D, K) for m in MODULES}
    st = LoRAStrategy("glora", modules=reference if configured else None)
    st.aggregate_train(1, [_reply(BAD, state=_state(4, BAD, extra=True))])  # alone, first
    if configured:
        assert "module mismatch" in st.history[-1].rejected[BAD]
    arrays, _ = st.aggregate_train(2, _honest())
    assert arrays is not None
    assert st.history[-1].accepted == list(HONEST)
    assert st.history[-1].rejected == {}


def test_the_module_reference_is_the_servers_even_against_a_majority() -> None:
    st = LoRAStrategy("glora", modules={m: (D, K) for m in MODULES})
    liars = [_reply(n, state=_state(4, n, extra=True)) for n in (7, 8, 9)]
    st.aggregate_train(1, [*liars, *_honest()])
    assert st.history[-1].accepted == list(HONEST)
    assert set(st.history[-1].rejected) == {7, 8, 9}


def test_the_head_reference_comes_from_the_initial_arrays() -> None:
    class Grid:
        def get_node_ids(self) -> list[int]:
            return [*HONEST, BAD]

    st = LoRAStrategy("glora", modules={m: (D, K) for m in MODULES})
    heads = ArrayRecord({HEAD.removeprefix(PREFIX): torch.zeros(2, D)})
    st.configure_train(1, heads, ConfigRecord(), Grid())  # type: ignore[arg-type]
    wide = _state(4, BAD)
    wide[HEAD] = torch.zeros(3, D)  # a head of another shape
    st.aggregate_train(1, [_reply(BAD, state=wide), *_honest()])
    assert st.history[-1].accepted == list(HONEST)
    assert "modules_to_save" in st.history[-1].rejected[BAD]


def test_a_reply_from_a_node_not_sampled_is_rejected() -> None:
    class Grid:
        def get_node_ids(self) -> list[int]:
            return list(HONEST)

    st = LoRAStrategy("glora")
    st.configure_train(1, ArrayRecord(), ConfigRecord(), Grid())  # type: ignore[arg-type]
    st.aggregate_train(1, [*_honest(), _reply(BAD)])
    assert st.history[-1].accepted == list(HONEST)
    assert "not sampled" in st.history[-1].rejected[BAD]


@pytest.mark.parametrize("operator", ["fedit", "fedex_lora", "fedrot_lora"])
@pytest.mark.parametrize("server_rank", [None, 4])
def test_equal_rank_operators_reject_only_the_reply_off_the_reference_rank(
    operator: str, server_rank: int | None
) -> None:
    st = LoRAStrategy(operator, server_rank=server_rank)
    # The odd rank first: it would be "client 0" that everyone else is compared with.
    arrays, _ = st.aggregate_train(1, [_reply(0, 2), *_honest()])
    assert arrays is not None
    assert st.history[-1].accepted == list(HONEST)
    assert set(st.history[-1].rejected) == {0}
    assert "reference rank" in st.history[-1].rejected[0]


def test_ffa_uses_the_configured_shared_a() -> None:
    def ffa_state(node: int, a_seed: int) -> dict[str, torch.Tensor]:
        sd = _state(4, node)
        g = torch.Generator().manual_seed(a_seed)
        for m in MODULES:
            sd[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(4, K, generator=g)
        return sd

    shared = {m: ffa_state(0, 0)[f"{PREFIX}{m}.lora_A.weight"] for m in MODULES}
    st = LoRAStrategy("ffa_lora", shared_a=shared)
    # Two foreign A's that agree with each other outnumber the one honest reply.
    replies = [
        _reply(1, state=ffa_state(1, 0)),
        _reply(8, state=ffa_state(8, 5)),
        _reply(9, state=ffa_state(9, 5)),
    ]
    arrays, _ = st.aggregate_train(1, replies)
    assert arrays is not None
    assert st.history[-1].accepted == [1]
    assert {8, 9} == set(st.history[-1].rejected)


def test_an_aggregation_failure_no_reply_explains_keeps_the_model(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    st = LoRAStrategy("glora")
    st.aggregate_train(1, _honest())
    before = _global(st)

    def broken(self: FederatedServer, *args: Any, **kwargs: Any) -> Any:
        raise torch.linalg.LinAlgError("the Gram matrix is singular")

    monkeypatch.setattr(FederatedServer, "aggregate", broken)
    arrays, metrics = st.aggregate_train(2, _honest())
    assert arrays is None
    assert metrics is not None
    assert metrics["accepted"] == 0
    assert "no single reply explains it" in caplog.text
    for k, v in before.items():
        assert torch.equal(_global(st)[k], v), k


def test_a_non_finite_aggregate_is_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    st = LoRAStrategy("glora")
    st.aggregate_train(1, _honest())
    before = _global(st)
    real = FederatedServer.aggregate

    def poisoned(self: FederatedServer, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        name = sorted(self.global_update)[0]
        self.global_update[name].B[0, 0] = math.nan
        return out

    monkeypatch.setattr(FederatedServer, "aggregate", poisoned)
    arrays, _ = st.aggregate_train(2, _honest())
    assert arrays is None
    assert "NaN/Inf" in st.history[-1].warnings[0]
    for k, v in before.items():
        assert torch.equal(_global(st)[k], v), k


def test_a_reply_stream_that_fails_midway_does_not_crash_the_server() -> None:
    def replies() -> Iterator[Message]:
        yield _reply(1)
        raise ConnectionError("the grid went away")

    st = LoRAStrategy("glora")
    arrays, metrics = st.aggregate_train(1, replies())
    assert arrays is None
    assert metrics is not None
    assert "the grid went away" in st.history[-1].warnings[0]
    assert st.server.global_update == {}


def _ev(node: int, records: dict[str, Any] | None = None, **m: Any) -> Message:
    return _message(
        node,
        records if records is not None else {"metrics": MetricRecord(dict(m))},
        MessageType.EVALUATE,
    )


def test_hostile_evaluation_replies_are_rejected_and_the_rest_averaged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = {"num-examples": 10, "accuracy": 0.5, "eval-loss": 1.0}
    st = LoRAStrategy("glora")
    out = st.aggregate_evaluate(
        1,
        [
            _ev(1, **good, **{"partition-id": 0}),
            _ev(2, **{**good, "accuracy": 1.0, "eval-loss": 0.0}),
            _ev(2, **{**good, "num-examples": 1000, "accuracy": 0.0}),  # twice
            _ev(3, **{**good, "num-examples": 1e308}),
            _ev(4, **{**good, "num-examples": 1e308}),
            _ev(5, **{**good, "accuracy": math.nan}),
            _ev(6, **{**good, "eval-loss": -1.0}),
            _ev(7, **{**good, "num-examples": [10]}),
            _ev(8, {"metrics": ConfigRecord({"accuracy": "0.5"})}),
            _ev(9, {}),
            Message(
                Error(code=1, reason="oom"),
                reply_to=Message(RecordDict(), dst_node_id=10, message_type=MessageType.EVALUATE),
            ),
            _ev(11, **{**good, "partition-id": 3, "accuracy": 2.0}),
        ],
    )
    assert out is not None
    assert out["num-examples"] == 20
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["eval-loss"] == pytest.approx(0.5)
    rejected = st.history[-1].evaluate_rejected
    assert set(rejected) == {2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
    assert "duplicate" in rejected[2]
    assert "rejected the evaluation of node 11 (partition 3)" in caplog.text


def test_evaluation_with_only_hostile_replies_gives_no_metrics() -> None:
    st = LoRAStrategy("glora")
    assert (
        st.aggregate_evaluate(
            1, [_ev(1, **{"num-examples": 1e308, "accuracy": 0.5, "eval-loss": 0.1})]
        )
        is None
    )


def _frozen_state(
    node: int, *, a: int | None = None, b: int | None = None
) -> dict[str, torch.Tensor]:
    """A rank-4 state whose A (or B) is drawn from seed ``a`` (or ``b``), the rest from ``node``."""
    sd = _state(4, node)
    for m in MODULES:
        if a is not None:
            g = torch.Generator().manual_seed(a + MODULES.index(m))
            sd[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(4, K, generator=g)
        if b is not None:
            g = torch.Generator().manual_seed(b + MODULES.index(m))
            sd[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(D, 4, generator=g)
    return sd


def test_after_round_one_the_frozen_a_is_the_servers_own() -> None:
    st = LoRAStrategy("ffa_lora")
    st.aggregate_train(1, [_reply(n, state=_frozen_state(n, a=0)) for n in HONEST])
    assert st.history[-1].accepted == list(HONEST)
    # Round 2: three nodes agree on a foreign A and outnumber the one that kept the shared A.
    liars = [_reply(n, state=_frozen_state(n, a=5)) for n in (7, 8, 9)]
    arrays, _ = st.aggregate_train(2, [*liars, _reply(1, state=_frozen_state(11, a=0))])
    assert arrays is not None
    assert st.history[-1].accepted == [1]
    assert "frozen, shared A" in st.history[-1].rejected[7]


@pytest.mark.parametrize("first", [True, False], ids=["hostile-first", "hostile-last"])
def test_rolora_rejects_only_the_reply_whose_frozen_b_differs(first: bool) -> None:
    st = LoRAStrategy("rolora")
    st.aggregate_train(1, [_reply(n, state=_frozen_state(n, a=0)) for n in HONEST])
    assert st.history[-1].accepted == list(HONEST)
    honest = [_reply(n, state=_frozen_state(10 + n, b=3)) for n in HONEST]  # round 2: B frozen
    hostile = _reply(BAD, state=_frozen_state(BAD, b=4))
    arrays, _ = st.aggregate_train(2, [hostile, *honest] if first else [*honest, hostile])
    assert arrays is not None
    assert st.history[-1].accepted == list(HONEST)
    assert set(st.history[-1].rejected) == {BAD}
    assert "frozen, shared B" in st.history[-1].rejected[BAD]
