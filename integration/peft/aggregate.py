"""Whole peft adapters aggregated by the core's round (:func:`glora_math.aggregate_modules`).

The adapters become a mapping of module name to the clients' factors; the dense tensors
(``modules_to_save``) are averaged as FedAvg with the round's normalised weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from glora_math import LoRAFactors
from glora_math.compare import module_errors
from glora_math.errors import GloraError, ShapeMismatchError
from glora_math.operators import (
    DEFAULT_OPERATOR,
    AggregateResult,
    AggregationOperator,
    OperatorState,
    list_operators,
    parse_options,
)
from glora_math.rounds import aggregate_modules, certificates, resolve_operator
from glora_math.validation import WeightsLike, normalize_weights, validate_rank

from .io import (
    AdapterError,
    ClientAdapter,
    adapter_from_state_dict,
    check_output,
    load_adapter,
    save_adapter,
    write_folder,
)


@dataclass(frozen=True)
class AdapterRound:
    """The server's result for a whole adapter.

    ``results[name]`` is the operator's result for module ``name``; ``client_modules[i]`` are
    the folded factors client i continues from (None where the operator re-initialises);
    ``dense`` is the FedAvg of the dense tensors; ``weights`` the clients' normalised weights
    and ``clients`` each module's validated client factors (to measure the round against);
    ``module_weights``, where clients hold different modules (``modules="union"``), each
    module's normalised weights over the clients that hold it (the clients of
    ``clients[name]``, in that order).
    """

    results: dict[str, AggregateResult]
    client_modules: list[dict[str, LoRAFactors] | None]
    dense: dict[str, Tensor]
    states: dict[str, OperatorState | None]
    weights: Tensor | None = None
    clients: Mapping[str, Sequence[LoRAFactors]] = field(default_factory=dict)
    module_weights: Mapping[str, Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        certs = self.certificates()
        worst = f", worst certified residual {max(certs.values()):.3e}" if certs else ""
        return (
            f"AdapterRound(modules={len(self.results)}, clients={len(self.client_modules)}, "
            f"dense={len(self.dense)}{worst})"
        )

    @property
    def global_modules(self) -> dict[str, LoRAFactors]:
        """The server update of every module as folded factors (the global adapter)."""
        return {name: res.update for name, res in self.results.items()}

    @property
    def base_deltas(self) -> dict[str, Tensor]:
        """Dense ``out x in`` changes to fold into the base weights (FedEx-LoRA, ``_residual``)."""
        return {n: r.residual for n, r in self.results.items() if r.residual is not None}

    def certificates(self) -> dict[str, float]:
        """Per certified module, its certified relative residual.

        The certified operators: the GLoRA family, FlexLoRA, ``svd_mean``; others are absent.
        """
        return certificates(self.results)

    def errors(self) -> dict[str, float]:
        """Per module, the exact relative error ``||update - W_bar|| / ||W_bar||``.

        Every operator, certified or not (:func:`glora_math.compare.module_errors`), each
        module against the mean of the clients that hold it.

        Raises
        ------
        AdapterError
            If the round kept no weights or client factors to measure against (a round built
            by hand rather than by :func:`aggregate_adapters`).
        """
        per = self.module_weights
        missing = [
            m
            for m in self.results
            if m not in self.clients or (per and m not in per) or (not per and self.weights is None)
        ]
        if missing:
            raise AdapterError(
                f"this round kept no client factors or weights of module {missing[0]!r} to "
                "measure it against; build it with aggregate_adapters"
            )
        return module_errors(self.results, self.clients, per or self.weights)


#: The certified relative residual above which a round warns (``ResidualWarning``, naming the
#: module) unless told otherwise: ``aggregate_peft``, ``glora aggregate``, ``glora simulate``
#: and the Flower app. The core operators do not warn unless given ``max_residual``.
DEFAULT_MAX_RESIDUAL = 0.2

#: How clients with different module sets are aggregated (``modules=`` of the functions below).
ModuleSets = Literal["same", "intersection", "union"]


def _check_same_modules(clients: Sequence[ClientAdapter]) -> list[str]:
    names = sorted(clients[0].modules)
    for i, c in enumerate(clients):
        missing = set(names) - set(c.modules)
        extra = set(c.modules) - set(names)
        if missing or extra:
            raise AdapterError(
                f"module set differs from client 0's (missing {sorted(missing)[:3]}, extra "
                f"{sorted(extra)[:3]}); pass modules='intersection' or 'union' to aggregate "
                "clients with different target modules",
                client=i,
            )
    _check_shapes(clients, {name: list(range(len(clients))) for name in names})
    if any(set(c.dense) != set(clients[0].dense) for c in clients):
        i = next(i for i, c in enumerate(clients) if set(c.dense) != set(clients[0].dense))
        raise AdapterError("dense (modules_to_save) tensors differ from client 0's", client=i)
    return names


def _check_shapes(clients: Sequence[ClientAdapter], holders: Mapping[str, list[int]]) -> None:
    for name, who in holders.items():
        first = clients[who[0]].modules[name].factors.shape
        for i in who:
            if clients[i].modules[name].factors.shape != first:
                raise ShapeMismatchError(
                    f"update shape {clients[i].modules[name].factors.shape} differs from client "
                    f"{who[0]}'s {first}",
                    client=i,
                    module=name,
                )


def module_holders(clients: Sequence[ClientAdapter], modules: str) -> dict[str, list[int]]:
    """Module name -> the clients that aggregate it, under the ``modules`` rule.

    ``"same"``: every client must hold the same modules (else an :class:`AdapterError` naming
    the client); ``"intersection"``: the modules every client holds; ``"union"``: every module
    any client holds, aggregated over the clients that hold it (their weights renormalised:
    the mean update of the clients that adapted the module).
    """
    if modules not in ("same", "intersection", "union"):
        raise AdapterError(f"modules must be 'same', 'intersection' or 'union', got {modules!r}")
    if modules == "same":
        return {name: list(range(len(clients))) for name in _check_same_modules(clients)}
    every = sorted(set().union(*(c.modules for c in clients)))
    holders = {n: [i for i, c in enumerate(clients) if n in c.modules] for n in every}
    if modules == "intersection":
        holders = {n: who for n, who in holders.items() if len(who) == len(clients)}
        if not holders:
            raise AdapterError("the clients have no LoRA module in common (modules='intersection')")
    _check_shapes(clients, holders)
    return holders


def fedavg_dense(
    clients: Sequence[ClientAdapter], p: Tensor, *, modules: str = "same"
) -> dict[str, Tensor]:
    """Weighted average of the dense tensors (``modules_to_save``), key by key.

    With ``modules="union"`` a key is averaged over the clients that hold it (their weights
    renormalised); with ``"intersection"`` only the keys every client holds are kept.
    """
    keys = sorted(set().union(*(c.dense for c in clients)))
    out = {}
    for key in keys:
        who = [i for i, c in enumerate(clients) if key in c.dense]
        if len(who) < len(clients) and modules != "union":
            continue  # "same" checked the key sets already
        ref = clients[who[0]].dense[key]
        for i in who:
            if clients[i].dense[key].shape != ref.shape:
                raise ShapeMismatchError(
                    f"dense tensor {key!r} has shape {tuple(clients[i].dense[key].shape)}", client=i
                )
        q = p[who] / p[who].sum() if len(who) < len(clients) else p
        stacked = torch.stack([clients[i].dense[key].to(p.dtype) for i in who])
        out[key] = torch.tensordot(q, stacked, dims=1).to(ref.dtype)
    return out


def aggregate_adapters(
    clients: Sequence[ClientAdapter],
    weights: WeightsLike = None,
    *,
    operator: str | AggregationOperator = DEFAULT_OPERATOR,
    rank: int,
    client_ranks: Sequence[Mapping[str, int]] | None = None,
    states: Mapping[str, OperatorState | None] | None = None,
    options: Mapping[str, float] | None = None,
    modules: ModuleSets = "same",
) -> AdapterRound:
    """Aggregate whole adapters module by module with a registered operator.

    The adapters become a mapping of module name to the clients' factors, and one call of
    :func:`glora_math.aggregate_modules` (the core's round) does the rest; the dense tensors
    (``modules_to_save``) are averaged with the same normalised weights.

    The default operator is :data:`glora_math.DEFAULT_OPERATOR` (README, "Which operator should
    I use?"). ``glora_auto`` is GLoRA on the side (the B column spaces or the A row spaces)
    with the smaller certified residual: at the same server rank its error is never
    above the paper's ``glora`` (P14), and in the shared-init regime of federated rounds the
    paper's left side misses most of the mean (SPEC extensions). Operators that declare a
    ``group_fn`` (the fixed-side GLoRA variants: one stacked call) get the modules grouped
    by (shape, client ranks); the others run per module. Errors name the module and the client.

    Parameters
    ----------
    clients
        The clients' adapters (same module set and shapes; ranks may differ).
    weights
        Client weights (e.g. sample counts).
    operator
        A name from :func:`glora_math.list_operators`, or the operator itself.
    rank
        Server rank R.
    client_ranks
        Per client, the rank of each module it should receive (default: its own ranks).
    states
        Per-module operator states (stateful operators), from the previous round.
    options
        Operator options (:attr:`glora_math.operators.AggregationOperator.options`), e.g.
        ``{"max_residual": 0.1}`` for a certified operator: a ``ResidualWarning`` naming the
        module when a module's certified relative residual exceeds it.
    modules
        Clients with different module sets (:func:`module_holders`): ``"same"`` (the
        default) refuses them, ``"intersection"`` aggregates the modules all clients hold,
        ``"union"`` every module over the clients that hold it (a client continues only
        from the modules it holds).

    Every result of a certified operator (the GLoRA family, FlexLoRA, ``svd_mean``) carries
    ``certificate`` (its exact relative error against the
    module's mean update).
    """
    if not clients:
        raise AdapterError("no client adapters")
    holders = module_holders(clients, modules)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, who in holders.items():
        groups.setdefault(tuple(who), []).append(name)
    if len(groups) == 1 and len(next(iter(groups))) == len(clients):
        names = next(iter(groups.values()))
        rnd = aggregate_modules(
            {name: [c.modules[name].factors for c in clients] for name in names},
            weights,
            operator=operator,
            rank=rank,
            client_ranks=client_ranks,
            states=states,
            options=options,
            _stacklevel=3,
        )
        return AdapterRound(
            results=rnd.results,
            client_modules=rnd.client_modules,
            dense=fedavg_dense(clients, rnd.weights, modules=modules),
            states=rnd.states,
            weights=rnd.weights,
            clients=rnd.clients,
        )
    return _aggregate_groups(clients, groups, weights, operator=operator, rank=rank,
                             client_ranks=client_ranks, states=states, options=options,
                             modules=modules)  # fmt: skip


def _aggregate_groups(
    clients: Sequence[ClientAdapter],
    groups: Mapping[tuple[int, ...], list[str]],
    weights: WeightsLike,
    *,
    operator: str | AggregationOperator,
    rank: int,
    client_ranks: Sequence[Mapping[str, int]] | None,
    states: Mapping[str, OperatorState | None] | None,
    options: Mapping[str, float] | None,
    modules: str,
) -> AdapterRound:
    """One core round per set of clients holding the same modules (``modules="union"``)."""
    p = normalize_weights(weights, len(clients), dtype=torch.float64, device=torch.device("cpu"))
    op = resolve_operator(operator)
    results: dict[str, AggregateResult] = {}
    kept: dict[str, OperatorState | None] = {}
    validated: dict[str, Any] = {}
    per_module: dict[str, Tensor] = {}
    continues: list[dict[str, LoRAFactors] | None] = [{} for _ in clients]
    for who, names in groups.items():
        sub = p[list(who)]
        if float(sub.sum()) <= 0.0:
            continue  # only zero-weight clients hold these modules: nothing to aggregate
        rnd = aggregate_modules(
            {name: [clients[i].modules[name].factors for i in who] for name in names},
            sub,
            operator=op,
            rank=rank,
            client_ranks=None if client_ranks is None else [client_ranks[i] for i in who],
            states=None if states is None else {n: states.get(n) for n in names},
            options=options,
            _stacklevel=4,
        )
        results.update(rnd.results)
        kept.update(rnd.states)
        validated.update(rnd.clients)
        per_module.update(dict.fromkeys(names, rnd.weights))
        for j, i in enumerate(who):
            got, mine = rnd.client_modules[j], continues[i]
            continues[i] = None if got is None or mine is None else mine | got
    return AdapterRound(
        results=results,
        client_modules=continues,
        dense=fedavg_dense(clients, p, modules=modules),
        states=kept,
        weights=p,
        clients=validated,
        module_weights=per_module,
    )


ClientLike = str | Path | ClientAdapter | tuple[Mapping[str, Tensor], Any] | Any


def as_adapter(client: ClientLike, index: int) -> ClientAdapter:
    """One client's adapter from what users have at hand.

    An adapter folder (``save_pretrained``: safetensors + JSON, never unpickled), a
    :class:`ClientAdapter`, a ``(state_dict, config)`` pair (``config`` a dict or a
    ``LoraConfig``), or a peft ``PeftModel`` (its ``"default"`` adapter).
    """
    if isinstance(client, ClientAdapter):
        return client
    if isinstance(client, str | Path):
        return load_adapter(client, client=index)
    if isinstance(client, tuple) and len(client) == 2:
        return adapter_from_state_dict(client[0], client[1], client=index)
    peft_config = getattr(client, "peft_config", None)
    if isinstance(peft_config, Mapping) and "default" in peft_config:
        from peft import get_peft_model_state_dict  # noqa: PLC0415 - only for PeftModels

        state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(client).items()}
        return adapter_from_state_dict(state, peft_config["default"], client=index)
    raise AdapterError(
        "expected an adapter folder, a (state_dict, config) pair, a PeftModel or a "
        f"ClientAdapter, got {type(client).__name__}",
        client=index,
    )


def aggregate_peft(
    clients: Sequence[ClientLike],
    weights: WeightsLike = None,
    *,
    operator: str = DEFAULT_OPERATOR,
    rank: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    options: Mapping[str, float] | None = None,
    modules: ModuleSets = "same",
) -> AdapterRound:
    """One federated round on peft adapters, in one call; optionally saved as adapter folders.

    ``clients``: adapter folders, ``PeftModel``s or ``(state_dict, LoraConfig)`` pairs (see
    :func:`as_adapter`). ``rank``: the server rank R, a positive integer (``None``: the
    largest client rank). With ``out``, writes ``out/global`` (the server update of every
    module plus the averaged ``modules_to_save``: load it with ``PeftModel.from_pretrained``),
    ``out/client_<i>`` (what client i continues from, at its own rank; not for operators whose
    clients re-initialise), ``out/base_delta.safetensors`` (dense changes to fold into the base
    weights, for FedEx-LoRA and the ``_residual`` operators) and ``out/round.json`` (operator,
    weights, server rank, per module the exact relative error against the clients' mean update
    (:meth:`AdapterRound.errors`, every operator) and the certificates of certified operators).
    ``out`` must be new or empty unless
    ``overwrite`` (which replaces it whole); it is written at once, so a failed round leaves it
    as it was (:func:`~integration.peft.io.write_folder`, :class:`OutputError`). A certified
    operator warns (``ResidualWarning``, naming the module) where a module's certified relative
    residual exceeds ``options["max_residual"]``, by default :data:`DEFAULT_MAX_RESIDUAL`
    (0 turns it off). Everything else as :func:`aggregate_adapters`.
    """
    if out is not None:
        check_output(out, overwrite=overwrite)  # before any work
    adapters = [as_adapter(c, i) for i, c in enumerate(clients)]
    if not adapters:
        raise AdapterError("no client adapters")
    if rank is None:
        R = max(m.factors.rank for a in adapters for m in a.modules.values())
    else:
        R = validate_rank(rank, name="rank (the server rank; None: the largest client rank)")
    opts = dict(options or {})
    if "max_residual" in resolve_operator(operator).options:
        opts.setdefault("max_residual", DEFAULT_MAX_RESIDUAL)
    rnd = aggregate_adapters(adapters, weights, operator=operator, rank=R, options=opts,
                             modules=modules)  # fmt: skip

    emb = {n for a in adapters for n, m in a.modules.items() if m.embedding}
    errors = rnd.errors() if out is not None else {}

    def write(folder: Path) -> None:
        save_adapter(folder / "global", rnd.global_modules, rnd.dense, adapters[0].config,
                     embeddings=emb)  # fmt: skip
        for i, mods in enumerate(rnd.client_modules):
            if mods is not None:
                save_adapter(folder / f"client_{i}", mods, rnd.dense, adapters[i].config,
                             embeddings=emb)  # fmt: skip
        if rnd.base_deltas:
            deltas = {k: v.contiguous() for k, v in rnd.base_deltas.items()}
            save_file(deltas, str(folder / "base_delta.safetensors"))
        summary = {
            "operator": operator,
            "server_rank": R,
            "clients": len(adapters),
            "modules": modules,
            "weights": None if weights is None else [float(w) for w in weights],
            "normalized_weights": None if rnd.weights is None else rnd.weights.tolist(),
            # null where the mean update is zero and the server update is not (no relative
            # error exists; JSON has no infinity)
            "relative_error": {m: e if math.isfinite(e) else None for m, e in errors.items()},
            "certified_relative_residual": rnd.certificates(),
        }
        (folder / "round.json").write_text(json.dumps(summary, indent=2, allow_nan=False))

    if out is not None:
        write_folder(out, write, overwrite=overwrite)
    return rnd


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``glora aggregate``."""
    p = argparse.ArgumentParser(
        prog="glora aggregate",
        description="Aggregate peft LoRA adapter folders (one per client) with any operator and "
        "write the global adapter (OUT/global), each client's continuation (OUT/client_<i>) "
        "and a round summary (OUT/round.json).",
    )
    p.add_argument("adapters", nargs="+", help="peft adapter folders, one per client")
    p.add_argument("--out", required=True, help="output folder (must be empty or new)")
    p.add_argument("--weights", default=None, help="comma-separated client weights, e.g. "
                   "sample counts (default: equal)")  # fmt: skip
    p.add_argument("--operator", default=DEFAULT_OPERATOR,
                   help="a name of glora_math.list_operators()")  # fmt: skip
    p.add_argument("--rank", type=int, default=None, help="server rank R (default: the largest "
                   "client rank)")  # fmt: skip
    p.add_argument("--options", default="", help="operator options, name=value,...")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--modules", default="same", choices=["same", "intersection", "union"],
                   help="clients with different target modules: refuse them (same), "
                   "aggregate the modules all hold (intersection) or each over its holders "
                   "(union)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``glora aggregate ADAPTER... --out DIR``: one round over real peft adapter folders."""
    p = build_parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        weights = None
        if args.weights:
            weights = [float(w) for w in args.weights.split(",") if w.strip()]
        opts = parse_options(args.options)
        if args.operator not in list_operators():
            p.error(f"--operator {args.operator!r} is not one of {list_operators()}")
        rnd = aggregate_peft(args.adapters, weights, operator=args.operator, rank=args.rank,
                             out=out, overwrite=args.overwrite, options=opts,
                             modules=args.modules)  # fmt: skip
    except GloraError as err:  # before ValueError: GloraErrors are ValueErrors too
        sys.stderr.write(f"glora aggregate: error: {err}\n")
        return 2
    except ValueError as err:  # --weights that are not numbers
        p.error(str(err))
    # As written to round.json (computed once, by aggregate_peft).
    written = json.loads((out / "round.json").read_text())["relative_error"]
    errors = {m: math.inf if e is None else float(e) for m, e in written.items()}
    worst = ""
    if errors:
        name = max(errors, key=lambda m: errors[m])
        worst = f"; worst relative error {errors[name]:.3e} (module {name})"
    print(f"wrote {out}/global ({len(rnd.results)} modules, operator {args.operator}){worst}")
    return 0


__all__ = [
    "DEFAULT_MAX_RESIDUAL",
    "AdapterRound",
    "ClientLike",
    "aggregate_adapters",
    "aggregate_peft",
    "as_adapter",
    "fedavg_dense",
    "main",
    "module_holders",
]
