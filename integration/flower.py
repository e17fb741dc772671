"""Every registered operator as a Flower strategy (Message API, ``flwr.serverapp.strategy``).

:class:`LoRAStrategy` only samples nodes, converts records and checks replies: client replies
become :class:`~integration.peft_io.ClientAdapter` objects, the server state and round policy
are :class:`integration.server.FederatedServer` (the same object the runner drives; its math is
:func:`~integration.peft_io.aggregate_adapters` with any operator of
:mod:`glora_math.registry`), and the results go back as records. Clients may have different
LoRA ranks: each one receives factors of its own rank (a rank-compatible readout for GLoRA,
FlexLoRA and the like). A reply with an error, missing or extra modules, wrong shapes, a rank
mismatch or NaN/Inf entries is rejected with a logged reason and the round goes on with the
rest; the server never crashes on client input. Payloads are numpy arrays decoded with
``allow_pickle=False`` by Flower; nothing is unpickled.

Record layout (keys of the ``RecordDict``):

server -> client, train
    ``"init"``: the client's folded factors (``"<module>.B"``, ``"<module>.A"``), empty for a
    fresh LoRA start; ``"base"``: dense folds accumulated into base weights (``"<module>"``,
    FedEx-LoRA residuals, FLoRA merges); ``"dense"``: ``modules_to_save`` tensors;
    ``"config"``: ``server-round``, ``freeze-a`` (FFA-LoRA).
client -> server, train
    ``"adapter"``: the peft LoRA state dict (``get_peft_model_state_dict``); ``"lora"``: its
    ``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``; ``"metrics"``: ``num-examples``
    and ``train-loss``.
server -> client, evaluate
    ``"update"``: the global low-rank update, ``"base"``, ``"dense"``; the client merges them.
client -> server, evaluate
    ``"metrics"``: ``num-examples``, ``accuracy``, ``eval-loss``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from torch import Tensor

from glora_math import GloraError, LoRAFactors
from glora_math.registry import get_operator

from .peft_io import ClientAdapter, adapter_from_state_dict
from .server import FederatedServer

# ----------------------------------------------------------------------------------------------
# Record conversion (pure functions)


def factors_to_record(factors: Mapping[str, LoRAFactors]) -> ArrayRecord:
    """``{"<module>.B": B, "<module>.A": A}`` for every module (float32, contiguous)."""
    out: dict[str, Tensor] = {}
    for name, f in factors.items():
        out[f"{name}.B"] = f.B.detach().to("cpu", torch.float32).contiguous()
        out[f"{name}.A"] = f.A.detach().to("cpu", torch.float32).contiguous()
    return ArrayRecord(out)


def record_to_factors(record: ArrayRecord) -> dict[str, LoRAFactors]:
    """Inverse of :func:`factors_to_record`."""
    sd = record.to_torch_state_dict()
    names = sorted({k.rsplit(".", 1)[0] for k in sd})
    return {n: LoRAFactors(sd[f"{n}.B"], sd[f"{n}.A"]) for n in names}


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Dense tensors as a float32 ArrayRecord."""
    return ArrayRecord(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    )


def _reply_adapter(content: RecordDict, node: int) -> tuple[ClientAdapter, float]:
    """Decode a train reply into a client adapter and its weight, or raise GloraError."""
    for key, kind in (("adapter", ArrayRecord), ("lora", ConfigRecord), ("metrics", MetricRecord)):
        if key not in content or not isinstance(content[key], kind):
            raise GloraError(f"reply has no {kind.__name__} {key!r}", client=node)
    metrics = content["metrics"]
    weight = metrics.get("num-examples") if isinstance(metrics, MetricRecord) else None
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise GloraError(f"reply has no positive 'num-examples' (got {weight!r})", client=node)
    arrays = content["adapter"]
    assert isinstance(arrays, ArrayRecord)
    state = {k: v.to(torch.float64) for k, v in arrays.to_torch_state_dict().items()}
    config = dict(content["lora"])
    adapter = adapter_from_state_dict(state, config, client=node)
    r = config.get("r")
    for name, m in adapter.modules.items():
        if isinstance(r, int) and m.factors.rank != r and "rank_pattern" not in config:
            raise GloraError(f"factors have rank {m.factors.rank}, config says r={r}", client=node)
        if not m.factors.rank:
            raise GloraError("rank-0 factors", client=node, module=name)
    return adapter, float(weight)


def _signature(adapter: ClientAdapter) -> tuple[Any, ...]:
    mods = tuple(sorted((n, m.factors.shape) for n, m in adapter.modules.items()))
    dense = tuple(sorted((k, tuple(v.shape)) for k, v in adapter.dense.items()))
    return mods, dense


# ----------------------------------------------------------------------------------------------
# The strategy


@dataclass
class RoundLog:
    """What one server round did (also returned as the train MetricRecord)."""

    round: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    aggregation_error: float = math.nan
    certified_residual: float = math.nan
    train_loss: float = math.nan
    warnings: list[str] = field(default_factory=list)


class LoRAStrategy(Strategy):
    """Federated LoRA with any registered aggregation operator (default: GLoRA).

    Parameters
    ----------
    operator
        A name from :func:`glora_math.registry.list_operators`.
    server_rank
        The server rank R (default: the largest client rank of the round).
    max_residual
        For the GLoRA family: a logged ``ResidualWarning`` naming the module when its
        certified relative residual exceeds this (0 turns the warning off).
    options
        Further operator options (e.g. ``{"tol": 0.05}`` for ``glora_auto_rank``).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes
        Node sampling, as in Flower's ``FedAvg``; ``fraction_train < 1`` gives sparse
        participation.
    seed
        Seed of the node sampling (rounds are reproducible).
    """

    def __init__(
        self,
        operator: str = "glora_auto",
        *,
        server_rank: int | None = None,
        max_residual: float = 0.2,
        options: Mapping[str, float] | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        seed: int = 0,
    ) -> None:
        op = get_operator(operator)
        opts = dict(options or {})
        if "max_residual" in op.options:
            opts["max_residual"] = max_residual
        # The server state and round policy: the same object the runner drives.
        self.server = FederatedServer(op.name, server_rank=server_rank, options=opts)
        self.op = self.server.op
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.rng = random.Random(seed)
        # What only the transport needs: the reply signature every round must match, whether
        # the initial heads arrived, and the round logs.
        self.reference: tuple[Any, ...] | None = None  # module names and shapes, dense keys
        self.started = False
        self.history: list[RoundLog] = []

    # ------------------------------------------------------------------ Flower interface

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> operator: %s (%s)", self.op.name, self.op.paper)
        log(INFO, "\t├──> server rank: %s", self.server.server_rank or "max client rank")
        log(INFO, "\t└──> fraction train/evaluate: %s/%s", self.fraction_train,
            self.fraction_evaluate)  # fmt: skip

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.min_available_nodes:
            log(WARNING, "only %d nodes connected, %d required", len(nodes),
                self.min_available_nodes)  # fmt: skip
        size = min(len(nodes), max(minimum, math.ceil(fraction * len(nodes))))
        return sorted(self.rng.sample(nodes, size))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled node: its factors, the folds and the heads."""
        if not self.started:  # the initial heads (modules_to_save) come in `arrays`
            heads = arrays.to_torch_state_dict()
            self.server.dense = {k: v.to(torch.float32) for k, v in heads.items()}
            self.started = True
        cfg = ConfigRecord({**dict(config), "server-round": server_round,
                            "freeze-a": self.op.shared_A})  # fmt: skip
        msgs = []
        for node in self._sample(grid, self.fraction_train, self.min_train_nodes):
            content = RecordDict(
                {
                    "init": factors_to_record(self._init_for(node)),
                    "base": tensors_to_record(self.server.base_fold),
                    "dense": tensors_to_record(self.server.dense),
                    "config": cfg,
                }
            )
            msgs.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check the replies, aggregate the valid ones with the operator."""
        logged = RoundLog(round=server_round)
        self.history.append(logged)
        decoded: list[tuple[int, ClientAdapter, float, float]] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                logged.rejected[node] = f"client error: {msg.error.reason}"
                continue
            try:
                adapter, weight = _reply_adapter(msg.content, node)
            except GloraError as err:
                logged.rejected[node] = str(err)
                continue
            loss = msg.content["metrics"].get("train-loss")
            value = float(loss) if isinstance(loss, int | float) else math.nan
            decoded.append((node, adapter, weight, value))
        accepted = self._check_against_reference(decoded, logged)
        for node, reason in logged.rejected.items():
            log(WARNING, "round %d: rejected the reply of node %d: %s", server_round, node, reason)
        if not accepted:
            log(WARNING, "round %d: no valid replies; the global model is unchanged", server_round)
            return None, self._metrics(logged)
        nodes = [a[0] for a in accepted]
        adapters = [a[1] for a in accepted]
        weights = [a[2] for a in accepted]
        try:
            outcome = self.server.aggregate(nodes, adapters, weights)
        except GloraError as err:  # e.g. a client rank above R for GLoRA
            log(WARNING, "round %d: aggregation refused: %s", server_round, err)
            logged.rejected.update({n: f"aggregation refused: {err}" for n in nodes})
            return None, self._metrics(logged)
        logged.warnings = outcome.warnings
        logged.accepted = nodes
        logged.train_loss = sum(w * a[3] for w, a in zip(weights, accepted, strict=True)) / sum(
            weights
        )
        logged.aggregation_error = outcome.aggregation_error
        cert = outcome.certified_residual
        logged.certified_residual = math.nan if cert is None else cert
        return self.global_record(), self._metrics(logged)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model (update, folds, heads) to the sampled nodes."""
        if self.fraction_evaluate == 0.0:
            return []
        content = RecordDict(
            {
                "update": factors_to_record(self.server.global_update),
                "base": tensors_to_record(self.server.base_fold),
                "dense": tensors_to_record(self.server.dense),
                "config": ConfigRecord({**dict(config), "server-round": server_round}),
            }
        )
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        return [
            Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE)
            for n in nodes
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the valid evaluation replies."""
        total = acc = loss = 0.0
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            try:
                if msg.has_error():
                    raise GloraError(f"client error: {msg.error.reason}", client=node)
                m = msg.content["metrics"]
                if not isinstance(m, MetricRecord):
                    raise GloraError("reply has no MetricRecord 'metrics'", client=node)
                n, a, lo = m.get("num-examples"), m.get("accuracy"), m.get("eval-loss")
                vals = (n, a, lo)
                if not all(isinstance(v, int | float) and math.isfinite(v) for v in vals):
                    raise GloraError(f"bad evaluation metrics {dict(m)}", client=node)
                n, a, lo = float(n), float(a), float(lo)  # type: ignore[arg-type]
                if n <= 0 or not 0.0 <= a <= 1.0:
                    raise GloraError(f"bad evaluation metrics {dict(m)}", client=node)
            except (GloraError, KeyError) as err:
                log(WARNING, "round %d: rejected evaluation of node %d: %s", server_round,
                    node, err)  # fmt: skip
                continue
            total += n
            acc += n * a
            loss += n * lo
        if total == 0:
            return None
        return MetricRecord({"accuracy": acc / total, "eval-loss": loss / total,
                             "num-examples": total})  # fmt: skip

    # ------------------------------------------------------------------ internals

    def _init_for(self, node: int) -> dict[str, LoRAFactors]:
        """Factors a node continues from (the server's policy); ``{}``: a fresh LoRA start."""
        r = self.server.client_rank.get(node)
        if r is None:
            return {}  # first contact
        return self.server.start_for(node, r) or {}

    def _check_against_reference(
        self, decoded: list[tuple[int, ClientAdapter, float, float]], logged: RoundLog
    ) -> list[tuple[int, ClientAdapter, float, float]]:
        """Keep the replies whose modules and shapes match the reference.

        The reference is the majority's signature in the first round with replies, then fixed.
        """
        if not decoded:
            return []
        if self.reference is None:
            counts = Counter(_signature(a[1]) for a in decoded)
            self.reference = counts.most_common(1)[0][0]
        mods, dense = self.reference
        ok = []
        for item in decoded:
            node, adapter, _, _ = item
            got_mods, got_dense = _signature(adapter)
            if got_mods != mods:
                want = dict(mods)
                have = dict(got_mods)
                missing = sorted(set(want) - set(have))
                extra = sorted(set(have) - set(want))
                wrong = sorted(n for n in set(want) & set(have) if want[n] != have[n])
                logged.rejected[node] = (
                    f"module mismatch: missing {missing[:3]}, extra {extra[:3]}, "
                    f"wrong shape {[(n, have[n], want[n]) for n in wrong[:3]]}"
                )
            elif got_dense != dense:
                logged.rejected[node] = "modules_to_save tensors differ from the reference"
            else:
                ok.append(item)
        if self.op.shared_A and ok:  # FFA-LoRA: every A must be the one frozen, shared A

            def a_key(adapter: ClientAdapter) -> tuple[bytes, ...]:
                return tuple(
                    adapter.modules[n].factors.A.numpy().tobytes() for n in sorted(adapter.modules)
                )

            majority = Counter(a_key(a[1]) for a in ok).most_common(1)[0][0]
            for node, adapter, _, _ in ok:
                if a_key(adapter) != majority:
                    logged.rejected[node] = "A differs from the frozen, shared A (FFA-LoRA)"
            ok = [a for a in ok if a[0] not in logged.rejected]
        return ok

    def global_record(self) -> ArrayRecord:
        """The global model: update factors, dense folds and heads, flattened in one record."""
        return tensors_to_record(self.server.global_tensors())

    def _metrics(self, logged: RoundLog) -> MetricRecord:
        return MetricRecord(
            {
                "accepted": len(logged.accepted),
                "rejected": len(logged.rejected),
                "aggregation-error": logged.aggregation_error,
                "certified-residual": logged.certified_residual,
                "train-loss": logged.train_loss,
            }
        )


__all__ = [
    "LoRAStrategy",
    "RoundLog",
    "factors_to_record",
    "record_to_factors",
    "tensors_to_record",
]
