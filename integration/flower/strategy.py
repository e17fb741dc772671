"""Every registered operator as a Flower strategy (Message API, ``flwr.serverapp.strategy``).

:class:`LoRAStrategy` only samples nodes, converts records and checks replies: client replies
become :class:`~integration.peft.io.ClientAdapter` objects, the server state and round policy
are :class:`integration.federated.server.FederatedServer` (the same object the runner drives;
its math is :func:`glora_math.aggregate_modules` with any operator of
:mod:`glora_math.operators`), and the results go back as records. Clients may have different
LoRA ranks: each one receives factors of its own rank (a rank-compatible readout for GLoRA,
FlexLoRA and the like).

The trust boundary: every reply is untrusted. A reply is rejected, with its node, the partition
it names and the reason logged, if it carries an error, lacks a record, has an array that is
not a finite float array of the declared dtype and shape (object, unicode or complex payloads,
garbage bytes, a foreign serialisation type, NaN/Inf, entries beyond ``max_abs``, a rank-0
factor), modules or ``modules_to_save`` tensors that differ from the reference, a bad LoRA
config, a ``num-examples`` that is not a finite number in ``(0, max_examples]``, or comes twice
from one node (the first reply counts). The reference modules and heads come from the server
(``modules=``, the initial arrays); only without them does each round's strict majority decide,
for that round alone. Operators that keep a factor frozen and shared (FFA-LoRA, RoLoRA) also
reject a reply whose frozen factor is not the shared one. If the operator then refuses the
round, each remaining reply is tried on its own and the ones it refuses alone are rejected; for
operators that need equal ranks the replies off the reference rank are rejected. A failure that
cannot be traced to one reply, or a non-finite aggregate, keeps the global model. No
exception from a reply reaches Flower, and no reply changes which other replies are accepted.
Payloads are numpy arrays decoded with ``allow_pickle=False``; nothing is unpickled.

The records a round exchanges are laid out in :mod:`.messages`.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Literal

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from torch import Tensor

from glora_math import GloraError, LoRAFactors
from glora_math.operators import DEFAULT_OPERATOR, get_operator

from ..federated.server import FederatedServer, RoundOutcome
from ..peft.aggregate import aggregate_adapters
from .admission import check_frozen, check_reference, frozen_reference
from .faults_policy import RoundLog, enough, learn_partitions, name_missing, save_replies
from .messages import (
    MAX_ABS,
    MAX_EXAMPLES,
    RecordError,
    _clip,
    _decode_train_reply,
    _finite,
    _majority,
    _partition_of,
    _reason,
    _Reply,
    _weight,
    decode_arrays,
    factors_to_record,
    tensors_to_record,
)


class LoRAStrategy(Strategy):
    """Federated LoRA with any registered aggregation operator (default: GLoRA).

    Parameters
    ----------
    operator
        A name from :func:`glora_math.operators.list_operators`.
    server_rank
        The server rank R (default: the largest client rank of the round). It is also the
        reference rank for operators that need equal client ranks.
    max_residual
        For a certified operator (the GLoRA family, FlexLoRA, ``svd_mean``): a logged
        ``ResidualWarning`` naming the module when its
        certified relative residual exceeds this (0 turns the warning off).
    options
        Further operator options (e.g. ``{"tol": 0.05}`` for ``glora_auto_rank``); a
        ``max_residual`` among them wins over the argument, as in ``glora simulate``.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes
        Node sampling, as in Flower's ``FedAvg``; ``fraction_train < 1`` gives sparse
        participation.
    seed
        Seed of the node sampling (rounds are reproducible).
    modules
        The adapted modules and their ``(out_features, in_features)``: the reference every
        reply must match (``integration.models.lora_shapes(peft_model)`` gives it). If None,
        each round's replies must agree by a strict majority, fixed for that round only.
    shared_a
        FFA-LoRA (and RoLoRA's first round): the frozen, shared ``A`` of each module at the
        largest client rank (a client of rank r holds its first r rows), the reference before
        the server has its own ``A``. If None: each round's strict majority until then.
    max_examples
        Upper bound of a reply's ``num-examples``.
    max_abs
        Upper bound of the absolute value of any entry a reply carries.
    keep_replies
        A folder where each round's accepted replies are written as decoded (for replaying a
        run against its own uploads; ``None``: not kept).
    round_offset, on_round
        Rounds already done before this strategy starts (a resumed run: Flower's round k is
        round ``round_offset + k``), and a function called with each round's log once its
        replies are aggregated (the app writes its results and checkpoint there).
    min_replies, min_fraction
        A round aggregates only if at least ``max(min_replies, ceil(min_fraction * sampled))``
        replies pass the checks; otherwise the global model is unchanged and the round says
        why (log and ``RoundLog.warnings``).
    node_wait
        Seconds to wait for ``min_available_nodes`` to connect before sampling (then the
        round goes on with the nodes there are).

    The ``modules_to_save`` reference is the initial arrays given to :meth:`start` (the
    heads), if not empty; else each round's strict majority.
    """

    def __init__(
        self,
        operator: str = DEFAULT_OPERATOR,
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
        modules: Mapping[str, tuple[int, int]] | None = None,
        shared_a: Mapping[str, Tensor] | None = None,
        max_examples: float = MAX_EXAMPLES,
        max_abs: float = MAX_ABS,
        node_wait: float = 60.0,
        min_replies: int = 1,
        min_fraction: float = 0.0,
        round_offset: int = 0,
        on_round: Callable[[RoundLog], None] | None = None,
        keep_replies: str | Path | None = None,
    ) -> None:
        op = get_operator(operator)
        opts = dict(options or {})
        if "max_residual" in op.options:
            opts.setdefault("max_residual", max_residual)
        # The server state and round policy: the same object the runner drives.
        self.server = FederatedServer(op, server_rank=server_rank, options=opts)
        self.op = self.server.op
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.rng = random.Random(seed)
        self.modules: dict[str, tuple[int, int]] | None = (
            None if modules is None else {n: (int(d), int(k)) for n, (d, k) in modules.items()}
        )
        self.shared_a = None if shared_a is None else {
            n: a.detach().to("cpu", torch.float32) for n, a in shared_a.items()
        }  # fmt: skip
        self.max_examples = float(max_examples)
        self.max_abs = float(max_abs)
        self.node_wait = float(node_wait)
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise GloraError(f"min_replies must be a whole number >= 1, got {min_replies!r}")
        if not 0.0 <= float(min_fraction) <= 1.0:
            raise GloraError(f"min_fraction must be in [0, 1], got {min_fraction!r}")
        self.round_offset = int(round_offset)
        self.keep_replies = None if keep_replies is None else Path(keep_replies)
        self.on_round = on_round
        self.min_replies = min_replies
        self.min_fraction = float(min_fraction)
        # Partitions learnt from replies (node -> partition), to name nodes that go silent.
        self.partition_of: dict[int, int] = {}
        # What only the transport needs: the heads' reference (names and shapes), whether the
        # initial heads arrived, the nodes sampled per round, and the round logs.
        self.dense_reference: dict[str, tuple[int, ...]] | None = None
        self.started = False
        self.sampled: dict[int, set[int]] = {}
        self.history: list[RoundLog] = []

    # ------------------------------------------------------------------ Flower interface

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> operator: %s (%s)", self.op.name, self.op.paper)
        log(INFO, "\t├──> server rank: %s", self.server.server_rank or "max client rank")
        log(INFO, "\t├──> reference modules: %s", "configured" if self.modules is not None
            else "each round's majority")  # fmt: skip
        log(INFO, "\t└──> fraction train/evaluate: %s/%s", self.fraction_train,
            self.fraction_evaluate)  # fmt: skip

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        deadline = time.monotonic() + self.node_wait
        while len(nodes) < self.min_available_nodes and time.monotonic() < deadline:
            log(INFO, "waiting for nodes: %d connected, %d required", len(nodes),
                self.min_available_nodes)  # fmt: skip
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
            nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.min_available_nodes:
            log(WARNING, "only %d nodes connected, %d required; going on with them (the Flower "
                "app's run-config key 'clients' is the number of SuperNodes to wait for)",
                len(nodes), self.min_available_nodes)  # fmt: skip
        size = min(len(nodes), max(minimum, math.ceil(fraction * len(nodes))))
        return sorted(self.rng.sample(nodes, size))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled node: its factors, the folds and the heads."""
        server_round += self.round_offset  # rounds before a resume count
        if not self.started:  # the initial heads (modules_to_save) come in `arrays`
            heads = decode_arrays(arrays, what="initial head")
            self.server.dense = {k: v.to(torch.float32) for k, v in heads.items()}
            if heads:
                self.dense_reference = {k: tuple(v.shape) for k, v in heads.items()}
            self.started = True
        frozen = self._frozen()
        cfg = ConfigRecord({**dict(config), "server-round": server_round,
                            "freeze-a": frozen == "A", "freeze-b": frozen == "B"})  # fmt: skip
        msgs = []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self._learn_partitions(grid, nodes)
        self.sampled[server_round] = set(nodes)
        for node in nodes:
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
        """Decode and check the replies, aggregate the valid ones with the operator.

        Never raises: a bad reply is rejected (logged with node, partition and reason), and an
        aggregation failure that no single reply explains keeps the global model.
        """
        server_round += self.round_offset  # rounds before a resume count
        logged = self._log_for(server_round)
        snapshot = self._snapshot()
        try:
            out = self._aggregate_train(server_round, replies, logged)
        except Exception as err:  # a bug, not a client: keep the model and the server alive
            self._restore(snapshot)
            logged.accepted = []
            note = f"round failed ({_reason(err)}); the global model is unchanged"
            logged.warnings.append(note)
            log(ERROR, "round %d: %s", server_round, note)
            out = None, self._metrics(logged)
        if self.on_round is not None:
            try:
                self.on_round(logged)
            except Exception as err:  # the run goes on; the log says what was not written
                log(ERROR, "round %d: could not write its results (%s)", server_round,
                    _reason(err))  # fmt: skip
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model (update, folds, heads) to the sampled nodes."""
        server_round += self.round_offset  # rounds before a resume count
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
        """Example-weighted mean of the valid evaluation replies (never raises)."""
        server_round += self.round_offset  # rounds before a resume count
        logged = self._log_for(server_round)
        total = acc = loss = 0.0
        seen: set[int] = set()
        try:
            for msg in replies:
                node = int(msg.metadata.src_node_id)
                partition = _partition_of(msg)
                if partition is not None:
                    logged.partitions.setdefault(node, partition)
                try:
                    if node in seen:
                        raise RecordError("duplicate evaluation reply (the first one counts)")
                    seen.add(node)
                    n, a, lo = self._evaluation(msg, node)
                except Exception as err:
                    logged.evaluate_rejected[node] = _reason(err)
                    log(WARNING, "round %d: rejected the evaluation of %s: %s", server_round,
                        logged.who(node), logged.evaluate_rejected[node])  # fmt: skip
                    continue
                total += n
                acc += n * a
                loss += n * lo
        except Exception as err:  # the reply iterator itself failed
            log(ERROR, "round %d: evaluation replies unreadable (%s)", server_round, _reason(err))
        if total == 0:
            return None
        return MetricRecord({"accuracy": acc / total, "eval-loss": loss / total,
                             "num-examples": total})  # fmt: skip

    # ------------------------------------------------------------------ exports

    def global_record(self) -> ArrayRecord:
        """The global model: update factors, dense folds and heads, flattened in one record."""
        return tensors_to_record(self.server.global_tensors())

    def save_global_adapter(
        self, path: str | Path, lora_config: Any, *, base_model: str | None = None
    ) -> list[Path]:
        """The global model as a peft adapter folder (the server's ``save_global_adapter``)."""
        return self.server.save_global_adapter(path, lora_config, base_model=base_model)

    # ------------------------------------------------------------------ internals

    def _log_for(self, server_round: int) -> RoundLog:
        for logged in reversed(self.history):
            if logged.round == server_round:
                return logged
        logged = RoundLog(round=server_round)
        self.history.append(logged)
        return logged

    def _snapshot(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.server.state_tensors(), self.server.state_meta()

    def _restore(self, snapshot: tuple[dict[str, Tensor], dict[str, Any]]) -> None:
        self.server.restore(*snapshot)

    def _evaluation(self, msg: Message, node: int) -> tuple[float, float, float]:
        if msg.has_error():
            raise RecordError(f"client error: {_clip(msg.error.reason)}", client=node)
        m = msg.content.get("metrics")
        if not isinstance(m, MetricRecord):
            raise RecordError("reply has no MetricRecord 'metrics'", client=node)
        n = _weight(m, node, self.max_examples)
        a, lo = m.get("accuracy"), m.get("eval-loss")
        for key, v in (("accuracy", a), ("eval-loss", lo)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise RecordError(f"{key} is not a finite number (got {_clip(repr(v), 60)})",
                                  client=node)  # fmt: skip
        a, lo = float(a), float(lo)  # type: ignore[arg-type]
        if not 0.0 <= a <= 1.0 or lo < 0.0:
            raise RecordError(f"impossible metrics: accuracy {a}, eval-loss {lo}", client=node)
        return n, a, lo

    def _init_for(self, node: int) -> dict[str, LoRAFactors]:
        """Factors a node continues from (the server's policy); ``{}``: a fresh LoRA start."""
        r = self.server.client_rank.get(node)
        if r is None:
            return {}  # first contact
        return self.server.start_for(node, r) or {}

    def _learn_partitions(self, grid: Grid, nodes: Iterable[int]) -> None:
        learn_partitions(grid, nodes, self.partition_of, self.server, timeout=self.node_wait)

    def _reject(self, logged: RoundLog, node: int, reason: str) -> None:
        if node in logged.rejected and reason not in logged.rejected[node]:
            logged.rejected[node] = f"{logged.rejected[node]}; {reason}"
        else:
            logged.rejected[node] = reason

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message], logged: RoundLog
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sampled = self.sampled.pop(server_round, None)
        decoded: dict[int, _Reply] = {}
        seen: set[int] = set()
        flower_errors: list[str] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            partition = _partition_of(msg)
            if partition is not None:
                logged.partitions.setdefault(node, partition)
                self.partition_of[node] = partition
            if msg.has_error() and sampled is not None and node not in sampled:
                # Flower's own error for a node that did not answer (sent by the SuperLink)
                flower_errors.append(_clip(msg.error.reason or f"error code {msg.error.code}"))
                continue
            if node in seen:
                self._reject(logged, node, "duplicate reply (the first reply of a node counts)")
                continue
            seen.add(node)
            if sampled is not None and node not in sampled:
                self._reject(logged, node, "reply from a node not sampled this round")
                continue
            try:
                decoded[node] = _decode_train_reply(
                    msg, node, max_examples=self.max_examples, max_abs=self.max_abs
                )
            except Exception as err:  # any failure to decode is this reply's rejection
                self._reject(logged, node, _reason(err))
        name_missing(logged, sampled, seen, flower_errors, self.partition_of)
        candidates = self._check_against_reference(decoded, logged)
        candidates = enough(logged, candidates, len(sampled or seen), self.min_replies,
                            self.min_fraction)  # fmt: skip
        outcome = self._aggregate_attributed(candidates, logged) if candidates else None
        for node, reason in logged.rejected.items():
            log(WARNING, "round %d: rejected the reply of %s: %s", server_round,
                logged.who(node), reason)  # fmt: skip
        if outcome is not None:
            for note in outcome.warnings:  # e.g. a ResidualWarning naming its module
                log(WARNING, "round %d: %s", server_round, note)
        if outcome is None:
            log(WARNING, "round %d: no reply aggregated; the global model is unchanged",
                server_round)  # fmt: skip
            return None, self._metrics(logged)
        accepted = [decoded[n] for n in outcome.clients]
        self._keep(server_round, accepted)
        logged.warnings += outcome.warnings
        logged.accepted = list(outcome.clients)
        losses = [(a.weight, a.loss) for a in accepted if a.loss is not None]
        if losses:
            logged.train_loss = sum(w * lo for w, lo in losses) / sum(w for w, _ in losses)
        if len(losses) < len(accepted):
            logged.warnings.append("train-loss: replies without a finite loss are left out")
        logged.aggregation_error = outcome.aggregation_error
        cert = outcome.certified_residual
        logged.certified_residual = math.nan if cert is None else cert
        return self.global_record(), self._metrics(logged)

    def _check_against_reference(
        self, decoded: Mapping[int, _Reply], logged: RoundLog
    ) -> list[_Reply]:
        """The replies whose modules, shapes, heads (and frozen factor) match the reference."""
        ok, rejected = check_reference(decoded, self.modules, self.dense_reference)
        frozen = self._frozen()
        if frozen is not None and ok:
            reference = frozen_reference(frozen, sorted(ok[0].adapter.modules),
                                         self.server.global_update, self.shared_a)  # fmt: skip
            ok, more = check_frozen(ok, frozen, reference, self.op.name)
            rejected |= more
        for node, reason in rejected.items():
            self._reject(logged, node, reason)
        return ok

    def _keep(self, server_round: int, accepted: list[_Reply]) -> None:
        if self.keep_replies is not None:
            save_replies(self.keep_replies, server_round, accepted)

    def _frozen(self) -> Literal["A", "B"] | None:
        """The factor clients keep frozen in the server's next round (FFA-LoRA, RoLoRA).

        Counted by the server's aggregated rounds, so clients and server agree even after a
        round that aggregated nothing.
        """
        return self.op.frozen_factor(self.server.round + 1)

    def _aggregate_attributed(
        self, candidates: list[_Reply], logged: RoundLog
    ) -> RoundOutcome | None:
        """Aggregate; if the operator refuses, reject the replies at fault and try once more."""
        try:
            return self._aggregate(candidates)
        except Exception as err:
            first = _reason(err)
        # 1. A reply the operator refuses on its own is at fault, whatever the others sent.
        rest = []
        for r in candidates:
            why = self._solo_error(r)
            if why is None:
                rest.append(r)
            else:
                self._reject(logged, r.node, f"refused by the operator: {why}")
        # 2. Equal-rank operators: the replies off the reference rank are at fault.
        ranks = {r.node: r.ranks() for r in rest}
        if self.op.equal_ranks and len(set(ranks.values())) > 1:
            R = self.server.server_rank
            ref = (
                next((k for k in ranks.values() if all(rk == R for _, rk in k)), None)
                if R is not None else _majority(ranks)
            )  # fmt: skip
            keep = [r for r in rest if ref is not None and ranks[r.node] == ref]
            for r in rest:
                if ref is None or ranks[r.node] != ref:
                    self._reject(logged, r.node, f"rank {r.top_rank()} is off the round's "
                                 f"reference rank ({self.op.name} refused mixed ranks: "
                                 f"{first})")  # fmt: skip
            rest = keep
        if not rest:
            return None
        try:
            return self._aggregate(rest)
        except Exception as err:
            note = (f"aggregation failed and no single reply explains it ({_reason(err)}); "
                    "the global model is unchanged")  # fmt: skip
            logged.warnings.append(note)
            for r in rest:
                self._reject(logged, r.node, f"not aggregated: {note}")
            return None

    def _aggregate(self, replies: list[_Reply]) -> RoundOutcome:
        """One round on the server; on any failure (or a non-finite result) nothing changes."""
        snapshot = self._snapshot()
        try:
            outcome = self.server.aggregate(
                [r.node for r in replies], [r.adapter for r in replies], [r.weight for r in replies]
            )
            s = self.server
            tensors = [*s.dense.values(), *s.base_fold.values()]
            for f in s.global_update.values():
                tensors += [f.B, f.A]
            for mods in s.client_init.values():
                for f in mods.values():
                    tensors += [f.B, f.A]
            if not _finite(tensors):
                raise GloraError("the aggregate has NaN/Inf entries")
        except Exception:
            self._restore(snapshot)
            raise
        return outcome

    def _solo_error(self, reply: _Reply) -> str | None:
        """Why the operator refuses this reply on its own (None if it does not)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rnd = aggregate_adapters(
                    [reply.adapter],
                    [1.0],
                    operator=self.op,
                    rank=self.server.server_rank or reply.top_rank(),
                    states=self.server.op_states,
                    options=self.server.options,
                )
            tensors: list[Tensor | None] = [*rnd.dense.values()]
            for res in rnd.results.values():
                tensors += [res.update.B, res.update.A, res.residual]
            if not _finite(tensors):
                return "its aggregate has NaN/Inf entries"
        except Exception as err:
            return _reason(err)
        return None

    def _metrics(self, logged: RoundLog) -> MetricRecord:
        return MetricRecord(
            {
                "accepted": len(logged.accepted),
                "rejected": len(logged.rejected),
                "missing": len(logged.missing),
                "aggregation-error": logged.aggregation_error,
                "certified-residual": logged.certified_residual,
                "train-loss": logged.train_loss,
            }
        )


__all__ = [
    "LoRAStrategy",
    "RoundLog",
]
