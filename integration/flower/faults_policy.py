"""What one Flower round did, and the server's policy for faults in it.

:class:`RoundLog` records a round (accepted, rejected and missing nodes with their partitions
and reasons, errors, certificates, warnings). The policy: nodes never heard from are asked
their partition (:func:`learn_partitions`: a restarted SuperNode continues as the client of
its partition); sampled nodes without a reply of their own are named with Flower's reason
(:func:`name_missing`); a round aggregates only with enough usable replies (:func:`enough`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import TypeVar

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from safetensors.torch import load_file, save_file
from torch import Tensor

from glora_math import LoRAFactors

from ..federated.server import FederatedServer
from ..peft.io import AdapterModule, ClientAdapter
from .messages import _partition_of, _reason, _Reply

T = TypeVar("T")


@dataclass
class RoundLog:
    """What one server round did (also returned as the train MetricRecord).

    ``accepted``: the nodes whose replies were aggregated; ``rejected``: node -> reason (a
    second reply of an accepted node is listed here too); ``partitions``: node -> the
    partition its reply names (this round, or learnt from its earlier replies);
    ``evaluate_rejected``: node -> reason, for evaluation replies; ``missing``: sampled nodes
    with no usable reply, with Flower's reason where it gave one.
    """

    round: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    partitions: dict[int, int] = field(default_factory=dict)
    aggregation_error: float = math.nan
    certified_residual: float = math.nan
    train_loss: float = math.nan
    warnings: list[str] = field(default_factory=list)
    evaluate_rejected: dict[int, str] = field(default_factory=dict)
    # Sampled nodes whose reply never came or came as Flower's own error: node -> reason.
    missing: dict[int, str] = field(default_factory=dict)

    def who(self, node: int) -> str:
        """``node <id> (partition <p>)``, or ``node <id>`` if the reply named no partition."""
        p = self.partitions.get(node)
        return f"node {node}" if p is None else f"node {node} (partition {p})"


def learn_partitions(
    grid: Grid,
    nodes: Iterable[int],
    partition_of: dict[int, int],
    server: FederatedServer,
    *,
    timeout: float,
) -> None:
    """Ask nodes never heard from which partition they hold (a QUERY message).

    A node that holds the partition another node held before (a SuperNode restarted with a
    new id) continues as that client: its rank and the factors it continues from move to the
    new id (``server.rename_client``). Nodes that cannot answer (an app without a query
    handler) stay unknown and are treated as new clients.
    """
    unknown = [n for n in nodes if n not in partition_of]
    if not unknown or not hasattr(grid, "send_and_receive"):
        return
    asks = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
            for n in unknown]  # fmt: skip
    try:
        answers = list(grid.send_and_receive(asks, timeout=timeout))
    except Exception as err:  # the round goes on without the partitions
        log(WARNING, "could not ask nodes for their partitions: %s", _reason(err))
        return
    for msg in answers:
        node, part = int(msg.metadata.src_node_id), _partition_of(msg)
        if msg.has_error() or part is None or node not in unknown:
            continue
        before = [m for m, q in partition_of.items() if q == part and m != node]
        partition_of[node] = part
        for old in before:
            if old in server.client_rank or old in server.client_init:
                server.rename_client(old, node)
                # the old id stays mapped: if it is still sampled, it is named by partition
                log(INFO, "node %d holds partition %d, as node %d did: it continues as that "
                    "client", node, part, old)  # fmt: skip


def name_missing(
    logged: RoundLog,
    sampled: set[int] | None,
    seen: set[int],
    errors: Sequence[str],
    partition_of: dict[int, int],
) -> None:
    """Every sampled node without a reply of its own, by partition, with Flower's reasons."""
    if sampled is None:
        return
    reason = "no reply" + (f" (Flower: {'; '.join(sorted(set(errors)))})" if errors else "")
    for node in sorted(sampled - seen):
        if node in partition_of:
            logged.partitions.setdefault(node, partition_of[node])
        logged.missing[node] = reason
        log(WARNING, "round %d: %s sent %s", logged.round, logged.who(node), reason)


def enough(
    logged: RoundLog, candidates: list[T], sampled: int, min_replies: int, min_fraction: float
) -> list[T]:
    """The candidates if there are enough of them (min-replies, min-fraction), else none."""
    need = max(min_replies, math.ceil(min_fraction * sampled))
    if not candidates or len(candidates) >= need:
        return candidates
    note = (
        f"only {len(candidates)} usable replies, {need} needed (min-replies {min_replies}, "
        f"min-fraction {min_fraction:g}): round skipped, the global model is unchanged"
    )
    logged.warnings.append(note)
    log(WARNING, "round %d: %s", logged.round, note)
    return []


def save_replies(folder: Path, round_index: int, replies: Sequence[_Reply]) -> None:
    """The accepted replies of a round, as decoded (folded factors, heads, weights).

    ``<folder>/round-<k>.safetensors`` and ``round-<k>.json``: what an in-process replay of the
    round needs (:func:`load_replies`), for checking a run against its own uploads.
    """
    folder.mkdir(parents=True, exist_ok=True)
    flat: dict[str, Tensor] = {}
    index = []
    for j, r in enumerate(replies):
        for name, m in r.adapter.modules.items():
            flat[f"{j}.module.{name}.B"] = m.factors.B.contiguous()
            flat[f"{j}.module.{name}.A"] = m.factors.A.contiguous()
        for key, v in r.adapter.dense.items():
            flat[f"{j}.dense.{key}"] = v.contiguous()
        index.append({"node": r.node, "weight": r.weight, "modules": sorted(r.adapter.modules),
                      "dense": sorted(r.adapter.dense)})  # fmt: skip
    save_file(flat, str(folder / f"round-{round_index}.safetensors"))
    (folder / f"round-{round_index}.json").write_text(json.dumps(index))


def load_replies(folder: Path, round_index: int) -> list[tuple[int, float, ClientAdapter]]:
    """``(node, weight, adapter)`` of each accepted reply of a round (:func:`save_replies`)."""
    flat = load_file(str(folder / f"round-{round_index}.safetensors"))
    out = []
    for j, item in enumerate(json.loads((folder / f"round-{round_index}.json").read_text())):
        mods = {n: AdapterModule(n, LoRAFactors(flat[f"{j}.module.{n}.B"],
                                                flat[f"{j}.module.{n}.A"]), 0.0, False)
                for n in item["modules"]}  # fmt: skip
        dense = {k: flat[f"{j}.dense.{k}"] for k in item["dense"]}
        out.append((int(item["node"]), float(item["weight"]), ClientAdapter(mods, dense)))
    return out


__all__ = ["RoundLog", "enough", "learn_partitions", "load_replies", "name_missing", "save_replies"]
