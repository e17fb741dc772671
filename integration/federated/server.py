"""The federated LoRA server, framework-free: one implementation for the runner and for Flower.

A :class:`FederatedServer` holds everything a server carries between rounds and applies one
round's policy; it knows nothing of models, data, transports or sampling:

- the global low-rank update per module (what a client adds to the base weights);
- dense folds per module (FedEx-LoRA's residual, GLoRA+residual, FLoRA's merged updates):
  float64 ``out x in`` matrices added to the base weights;
- the averaged dense tensors (peft's ``modules_to_save``, e.g. classifier heads);
- the operators' carried states (FedRot's reference factors, ...);
- the factors each client continues from (:meth:`FederatedServer.start_for`), with the
  absent-client policy;
- checkpoint and restore as flat tensors (safetensors-ready) plus a small JSON-able dict.

:meth:`FederatedServer.aggregate` runs one round on decoded client adapters (through
:func:`integration.peft_io.aggregate_adapters`, i.e. the registry's operator), measures the
exact aggregation error from factors, and applies the result. The runner
(:mod:`integration.simulate`) and the Flower strategy (:mod:`integration.flower`) only sample,
decode, call and encode.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from glora_math.baselines import truncate_svd
from glora_math.compare import round_error
from glora_math.errors import GloraError, GloraWarning
from glora_math.linalg import lowrank_svd
from glora_math.operators import (
    DEFAULT_OPERATOR,
    AggregateResult,
    AggregationOperator,
    Guarantee,
    OperatorState,
)
from glora_math.rounds import resolve_operator
from glora_math.types import LoRAFactors, Split
from glora_math.validation import WeightsLike

from ..peft.aggregate import AdapterRound, aggregate_adapters
from ..peft.io import ClientAdapter, config_dict, save_adapter


@dataclass
class RoundOutcome:
    """What one server round did.

    ``aggregation_error``: the exact relative error of the server update against the mean
    update over all modules, ``sqrt(sum_m ||W_bar_m - update_m||^2 / sum_m ||W_bar_m||^2)``
    (from factors; dense only where the operator folds a dense residual);
    ``aggregation_error_max``: the worst module's. ``certified_residual`` (and ``_max``): the
    same from the certificates (the GLoRA family; FlexLoRA and ``svd_mean``, Eckart-Young),
    None for operators without one.
    ``server_rank``/``server_rank_mean``: max and mean update rank over modules; ``sides``:
    for the GLoRA family, how many modules took each consensus side.
    """

    round: int
    clients: list[int]
    results: dict[str, AggregateResult]
    aggregation_error: float
    aggregation_error_max: float
    certified_residual: float | None
    certified_residual_max: float | None
    server_rank: int
    server_rank_mean: float
    sides: dict[str, int] | None
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """The JSON-able per-round metrics (everything but the results)."""
        return {
            "aggregation_error": self.aggregation_error,
            "aggregation_error_max": self.aggregation_error_max,
            "certified_residual": self.certified_residual,
            "certified_residual_max": self.certified_residual_max,
            "server_rank": self.server_rank,
            "server_rank_mean": self.server_rank_mean,
            "sides": self.sides,
        }


def measure(
    results: Mapping[str, AggregateResult],
    adapters: Sequence[ClientAdapter],
    weights: WeightsLike,
    *,
    clients: Mapping[str, Sequence[LoRAFactors]] | None = None,
) -> dict[str, Any]:
    """The error and shape metrics of :class:`RoundOutcome` for one round's results.

    ``clients`` (each module's client factors, e.g. the round's validated ones) and normalised
    ``weights`` let the measurement reuse what the round checked instead of checking again.
    """
    factors = clients or {m: [a.modules[m].factors for a in adapters] for m in results}
    err = round_error(results, factors, weights)
    certs = [res.certificate for res in results.values()]
    worst = max((c.relative_residual for c in certs if c is not None), default=0.0)
    ranks = [res.update.rank for res in results.values()]
    sides = None
    if results and all(res.side is not None for res in results.values()):
        right = sum(res.side == "right" for res in results.values())
        sides = {"left": len(results) - right, "right": right}
    return {
        "aggregation_error": err.relative,
        "aggregation_error_max": err.worst_module,
        "certified_residual": err.certified,
        "certified_residual_max": worst if err.certified is not None else None,
        "server_rank": max(ranks, default=0),
        "server_rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
        "sides": sides,
    }


def folded(
    base_fold: Mapping[str, Tensor], parts: Mapping[str, Sequence[Tensor | None]]
) -> dict[str, Tensor]:
    """Per module, the dense ``out x in`` change of the base: the folds so far plus ``parts``.

    The one place where a round's dense parts (a residual, an update's product) are added to
    the folds, in float64 and in the order given: the server's own model
    (:meth:`FederatedServer.dense_deltas`) and the counterfactual rounds
    (:meth:`FederatedServer.what_if`) both go through it.
    """
    out = {name: f.detach().clone() for name, f in base_fold.items()}
    for name, extra in parts.items():
        for part in extra:
            if part is not None:
                d = part.detach().to(torch.float64)
                out[name] = out[name] + d if name in out else d
    return out


class FederatedServer:
    """Server state and round policy of federated LoRA with any registered operator.

    Parameters
    ----------
    operator
        A name from :func:`glora_math.operators.list_operators` (default:
        :data:`glora_math.DEFAULT_OPERATOR`).
    server_rank
        The server rank R (default: the largest client rank of each round).
    options
        Operator options (``max_residual``, ``tol``, ``sketch``, ...; see
        :attr:`glora_math.operators.AggregationOperator.options`).
    dense
        The initial dense tensors every client starts from (``modules_to_save``), if any.

    Clients are identified by integers (partition ids in the runner, node ids in Flower).
    """

    def __init__(
        self,
        operator: str | AggregationOperator = DEFAULT_OPERATOR,
        *,
        server_rank: int | None = None,
        options: Mapping[str, float] | None = None,
        dense: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.op: AggregationOperator = resolve_operator(operator)  # looked up once
        self.server_rank = server_rank
        self.options = dict(options or {})
        self.round = 0
        self.global_update: dict[str, LoRAFactors] = {}
        self.base_fold: dict[str, Tensor] = {}
        self.dense: dict[str, Tensor] = {
            k: v.detach().to(torch.float32).clone() for k, v in (dense or {}).items()
        }
        self.op_states: dict[str, OperatorState | None] = {}
        self.client_init: dict[int, dict[str, LoRAFactors]] = {}
        self.client_rank: dict[int, int] = {}

    # ------------------------------------------------------------------ the round

    def aggregate(
        self,
        clients: Sequence[int],
        adapters: Sequence[ClientAdapter],
        weights: Sequence[float],
        *,
        client_ranks: Sequence[int] | None = None,
    ) -> RoundOutcome:
        """Aggregate one round's decoded client adapters and apply the result.

        ``clients`` names each adapter's client; ``weights`` are their weights (e.g. sample
        counts); ``client_ranks`` the rank each client reads out next (default: its adapter's
        largest module rank). The certified operators' warnings are caught and returned in the
        outcome.

        Raises
        ------
        GloraError
            If the operator refuses the round (nothing is applied then).
        """
        if len(clients) != len(adapters) or len(weights) != len(adapters):
            raise GloraError(
                f"got {len(clients)} client ids, {len(adapters)} adapters, {len(weights)} weights"
            )
        ranks = (
            [max(m.factors.rank for m in a.modules.values()) for a in adapters]
            if client_ranks is None
            else [int(r) for r in client_ranks]
        )
        R = self.server_rank or max(ranks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GloraWarning)
            rnd = aggregate_adapters(
                adapters,
                weights,
                operator=self.op,
                rank=R,
                client_ranks=None
                if client_ranks is None
                else [dict.fromkeys(adapters[0].modules, r) for r in ranks],
                states=self.op_states,
                options=self.options,
            )
        notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
        outcome = RoundOutcome(
            round=self.round + 1,
            clients=list(clients),
            results=dict(rnd.results),
            warnings=notes,
            **measure(
                rnd.results,
                adapters,
                weights if rnd.weights is None else rnd.weights,
                clients=rnd.clients,
            ),
        )
        self._apply(rnd, list(clients), ranks)
        self.round += 1
        return outcome

    def what_if(
        self,
        operator: str | AggregationOperator,
        adapters: Sequence[ClientAdapter],
        weights: Sequence[float],
        *,
        options: Mapping[str, float] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        """The global model another (stateless) operator would make of these very uploads.

        Nothing of this server changes. Returns the dense ``out x in`` change of every module
        (this server's folds so far, plus the other operator's folds and update), the averaged
        dense tensors, and the round's metrics (:func:`measure`). The counterfactual rounds of
        the runner use it: every listed operator aggregates the same uploads.

        Raises
        ------
        GloraError
            If the operator keeps state between rounds (it has no history on this trajectory).
        """
        op = resolve_operator(operator)
        if op.stateful:
            raise GloraError(f"operator {op.name!r} is stateful: it has no counterfactual round")
        ranks = [max(m.factors.rank for m in a.modules.values()) for a in adapters]
        opts = self._options_for(op) | dict(options or {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GloraWarning)
            rnd = aggregate_adapters(
                adapters, weights, operator=op, rank=self.server_rank or max(ranks), options=opts
            )
        deltas = folded(self.base_fold, {n: [r.residual, r.update.delta()]
                                         for n, r in rnd.results.items()})  # fmt: skip
        dense = {k: v.to(torch.float32) for k, v in rnd.dense.items()}
        p = weights if rnd.weights is None else rnd.weights
        metrics = measure(rnd.results, adapters, p, clients=rnd.clients)
        return deltas, dense, metrics

    def fork(self, operator: str | AggregationOperator | None = None) -> FederatedServer:
        """A copy of this server that goes on by itself, with this operator or a stateless one.

        The copy shares no mutable state with this server: its rounds change nothing here. The
        counterfactual rounds of the runner fork the server before a round's aggregation (arm
        b: another operator aggregates the same uploads, and its clients train one round
        further from what it sent them) and after it (the broadcast-split arm). Options this
        server was given carry over where the operator takes them.

        Raises
        ------
        GloraError
            If another operator than this server's keeps state between rounds.
        """
        op = self.op if operator is None else resolve_operator(operator)
        same = op.name == self.op.name
        if op.stateful and not same:
            raise GloraError(f"operator {op.name!r} is stateful: it cannot take over this server")
        new = FederatedServer(
            op,
            server_rank=self.server_rank,
            options=self._options_for(op),
        )
        new.round = self.round
        new.global_update = dict(self.global_update)  # LoRAFactors are never changed in place
        new.base_fold = {k: v.clone() for k, v in self.base_fold.items()}
        new.dense = {k: v.clone() for k, v in self.dense.items()}
        new.op_states = dict(self.op_states) if same else {}
        new.client_init = {c: dict(mods) for c, mods in self.client_init.items()}
        new.client_rank = dict(self.client_rank)
        return new

    def rebroadcast(self, split: Split) -> None:
        """Every known client continues from the global update, factored as ``split``.

        Each module's update ``U S V^T`` (its SVD, from the factors) is handed back at the
        client's rank as ``(U S^1/2, S^1/2 V^T)`` (``"balanced"``, what ``svd_mean`` sends),
        ``(U S, V^T)`` (``"left"``, FlexLoRA's) or ``(U, S V^T)`` (``"right"``): one product
        in different gauges (the rank-r_i truncation where the update's rank is larger). The
        broadcast-split arm of the runner measures what this choice does to the next round.

        Raises
        ------
        GloraError
            If the operator keeps no global update to hand back (FLoRA restarts its clients,
            personal operators keep per-client factors).
        """
        if self.op.personal or not self.global_update:
            raise GloraError(
                f"operator {self.op.name!r} hands no global update back to its clients: "
                "nothing to split"
            )
        readouts = {r: self._readout(r, split) for r in set(self.client_rank.values())}
        self.client_init = {c: dict(readouts[r]) for c, r in self.client_rank.items()}

    def save_global_adapter(
        self, path: str | Path, lora_config: Any, *, base_model: str | None = None
    ) -> list[Path]:
        """Write the global model as a peft adapter folder; return what was written.

        ``path/adapter_model.safetensors`` + ``adapter_config.json`` (the global update of every
        module plus the heads; ``PeftModel.from_pretrained`` loads it) if there is an update,
        and ``path/base_delta.safetensors`` (dense ``out x in`` changes to add to the base
        weights: FedEx-LoRA residuals, FLoRA merges) if there are folds. ``lora_config``: a
        ``LoraConfig`` or its dict (target modules, ``modules_to_save``); ``r`` and
        ``rank_pattern`` are set from the update; ``base_model`` becomes the config's
        ``base_model_name_or_path``.
        """
        folder = Path(path)
        written: list[Path] = []
        config = config_dict(lora_config)
        if base_model is not None:
            config["base_model_name_or_path"] = base_model
        if self.global_update:
            save_adapter(folder, self.global_update, self.dense, config)
            written += [folder / "adapter_model.safetensors", folder / "adapter_config.json"]
        if self.base_fold:
            folder.mkdir(parents=True, exist_ok=True)
            folds = {k: v.detach().cpu().contiguous() for k, v in self.base_fold.items()}
            save_file(folds, str(folder / "base_delta.safetensors"))
            written.append(folder / "base_delta.safetensors")
        return written

    def _apply(self, rnd: AdapterRound, clients: list[int], ranks: list[int]) -> None:
        update = {}
        for name, res in rnd.results.items():
            if res.residual is not None:  # FedEx / GLoRA+residual: a dense fold, out x in
                self._fold(name, res.residual)
            if res.client_factors is None:  # FLoRA: merge into the base, clients restart
                self._fold(name, res.update.delta())
            else:
                update[name] = res.update
        self.global_update = update
        self.dense = {k: v.to(torch.float32) for k, v in rnd.dense.items()}
        self.op_states = dict(rnd.states)
        if not self.op.personal:  # absent clients get the broadcast (start_for), not old factors
            self.client_init = {}
        for j, c in enumerate(clients):
            self.client_rank[c] = ranks[j]
            mods = rnd.client_modules[j]
            if mods is not None:
                self.client_init[c] = mods
            else:
                self.client_init.pop(c, None)

    def _fold(self, name: str, delta: Tensor) -> None:
        d = delta.detach().to(torch.float64)
        self.base_fold[name] = self.base_fold[name] + d if name in self.base_fold else d

    def rename_client(self, old: int, new: int) -> None:
        """Client ``old`` continues as ``new`` (a restarted node with a new id, same data)."""
        if old in self.client_rank:
            self.client_rank[new] = self.client_rank.pop(old)
        if old in self.client_init:
            self.client_init[new] = self.client_init.pop(old)

    def start_for(self, client: int, rank: int) -> dict[str, LoRAFactors] | None:
        """The factors ``client`` continues from at ``rank``, or None for a fresh LoRA start.

        A participant of the last round continues from what the operator sent it (for
        FedSA-LoRA, with its personal factors, which absent clients keep). A client that sat
        the last round out gets the broadcast: a participant's factors at the same rank, else,
        for rank-compatible operators, the best rank-r truncation of the server update.
        Before the first round, and for FLoRA (whose clients re-initialise), None.
        """
        if client in self.client_init:
            return self.client_init[client]
        if self.op.personal or not self.global_update:
            return None
        for other, mods in self.client_init.items():
            if self.client_rank.get(other) == rank:
                return mods
        if Guarantee.RANK_COMPATIBLE not in self.op.guarantees:
            return None
        return self._readout(rank, "balanced")

    def _readout(self, rank: int, split: Split) -> dict[str, LoRAFactors]:
        """Every module's global update truncated to ``rank``, its singular values split so.

        The best rank-``rank`` truncation of each update (its SVD, from the factors).
        """
        return {
            name: truncate_svd(*lowrank_svd(upd.B, upd.A), rank, upd.B.dtype, split=split)
            for name, upd in self.global_update.items()
        }

    def _options_for(self, op: AggregationOperator) -> dict[str, float]:
        """The options of this server that ``op`` takes."""
        return {k: v for k, v in self.options.items() if k in op.options}

    def dense_deltas(self) -> dict[str, Tensor]:
        """Per module, the dense ``out x in`` change of the base: folds plus the update."""
        return folded(self.base_fold, {n: [u.delta()] for n, u in self.global_update.items()})

    # ------------------------------------------------------------------ checkpoints

    def global_tensors(self) -> dict[str, Tensor]:
        """The global model as flat tensors: ``update.<m>.B/A``, ``base.<m>``, ``dense.<k>``."""
        out: dict[str, Tensor] = {}
        for name, f in self.global_update.items():
            out[f"update.{name}.B"], out[f"update.{name}.A"] = f.B, f.A
        out.update({f"base.{k}": v for k, v in self.base_fold.items()})
        out.update({f"dense.{k}": v for k, v in self.dense.items()})
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything :meth:`restore` needs, as flat CPU tensors (safetensors-ready)."""
        flat = self.global_tensors()
        for c, init in self.client_init.items():
            for name, f in init.items():
                flat[f"client.{c}.{name}.B"], flat[f"client.{c}.{name}.A"] = f.B, f.A
        for name, st in self.op_states.items():
            for k, v in (st.to_tensors() if st else {}).items():
                flat[f"state.{name}.{k}"] = v
        return {k: v.detach().cpu().clone().contiguous() for k, v in flat.items()}

    def state_meta(self) -> dict[str, Any]:
        """The JSON-able part of the state: operator, round and client ranks."""
        return {
            "operator": self.op.name,
            "round": self.round,
            "client_rank": {str(c): r for c, r in self.client_rank.items()},
        }

    def restore(self, flat: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_tensors` and :meth:`state_meta`.

        Raises
        ------
        GloraError
            If the checkpoint is of another operator or has an unknown tensor name.
        """
        if meta.get("operator", self.op.name) != self.op.name:
            raise GloraError(
                f"the checkpoint is of operator {meta['operator']!r}, not {self.op.name!r}"
            )
        updates: dict[str, dict[str, Tensor]] = {}
        clients: dict[int, dict[str, dict[str, Tensor]]] = {}
        states: dict[str, dict[str, Tensor]] = {}
        self.base_fold, self.dense = {}, {}
        for key, v in flat.items():
            kind, _, rest = key.partition(".")
            if kind == "update":
                name, _, which = rest.rpartition(".")
                updates.setdefault(name, {})[which] = v
            elif kind == "base":
                self.base_fold[rest] = v.to(torch.float64)
            elif kind == "client":
                idx, _, rest2 = rest.partition(".")
                name, _, which = rest2.rpartition(".")
                clients.setdefault(int(idx), {}).setdefault(name, {})[which] = v
            elif kind == "dense":
                self.dense[rest] = v
            elif kind == "state":  # "<module>.round_index" or "<module>.t.<tensor name>"
                if ".t." in rest:
                    module, _, tname = rest.rpartition(".t.")
                    states.setdefault(module, {})[f"t.{tname}"] = v
                else:
                    module, _, sk = rest.rpartition(".")
                    states.setdefault(module, {})[sk] = v
            else:
                raise GloraError(f"unknown checkpoint tensor {key!r}")
        self.global_update = {n: LoRAFactors(d["B"], d["A"]) for n, d in updates.items()}
        self.client_init = {
            c: {n: LoRAFactors(d["B"], d["A"]) for n, d in mods.items()}
            for c, mods in clients.items()
        }
        self.op_states = {m: OperatorState.from_tensors(t) for m, t in states.items()}
        self.round = int(meta.get("round", 0))
        self.client_rank = {int(c): int(r) for c, r in meta.get("client_rank", {}).items()}


__all__ = ["FederatedServer", "RoundOutcome", "measure"]
