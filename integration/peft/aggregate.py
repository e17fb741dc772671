"""Whole peft adapters aggregated by the core's round (:func:`glora_math.aggregate_modules`).

The adapters become a mapping of module name to the clients' factors; the dense tensors
(``modules_to_save``) are averaged as FedAvg with the round's normalised weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from glora_math import LoRAFactors
from glora_math.errors import GloraError, ShapeMismatchError
from glora_math.operators import (
    AggregateResult,
    AggregationOperator,
    OperatorState,
    list_operators,
    parse_options,
)
from glora_math.rounds import aggregate_modules, certificates
from glora_math.validation import WeightsLike

from .io import (
    AdapterError,
    ClientAdapter,
    adapter_from_state_dict,
    load_adapter,
    save_adapter,
)


@dataclass(frozen=True)
class AdapterRound:
    """The server's result for a whole adapter.

    ``results[name]`` is the operator's result for module ``name``; ``client_modules[i]`` are
    the folded factors client i continues from (None where the operator re-initialises);
    ``dense`` is the FedAvg of the dense tensors; ``weights`` the clients' normalised weights
    and ``clients`` each module's validated client factors (to measure the round against).
    """

    results: dict[str, AggregateResult]
    client_modules: list[dict[str, LoRAFactors] | None]
    dense: dict[str, Tensor]
    states: dict[str, OperatorState | None]
    weights: Tensor | None = None
    clients: Mapping[str, Sequence[LoRAFactors]] = field(default_factory=dict)

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
        """Per module, the certified relative residual (GLoRA family; others are absent)."""
        return certificates(self.results)


def _check_same_modules(clients: Sequence[ClientAdapter]) -> list[str]:
    names = sorted(clients[0].modules)
    for i, c in enumerate(clients):
        missing = set(names) - set(c.modules)
        extra = set(c.modules) - set(names)
        if missing or extra:
            raise AdapterError(
                f"module set differs from client 0's (missing {sorted(missing)[:3]}, extra "
                f"{sorted(extra)[:3]})",
                client=i,
            )
        for name in names:
            if c.modules[name].factors.shape != clients[0].modules[name].factors.shape:
                raise ShapeMismatchError(
                    f"update shape {c.modules[name].factors.shape} differs from client 0's "
                    f"{clients[0].modules[name].factors.shape}",
                    client=i,
                    module=name,
                )
        if set(c.dense) != set(clients[0].dense):
            raise AdapterError("dense (modules_to_save) tensors differ from client 0's", client=i)
    return names


def fedavg_dense(clients: Sequence[ClientAdapter], p: Tensor) -> dict[str, Tensor]:
    """Weighted average of the dense tensors (``modules_to_save``), key by key."""
    out = {}
    for key, ref in clients[0].dense.items():
        for i, c in enumerate(clients):
            if c.dense[key].shape != ref.shape:
                raise ShapeMismatchError(
                    f"dense tensor {key!r} has shape {tuple(c.dense[key].shape)}", client=i
                )
        stacked = torch.stack([c.dense[key].to(p.dtype) for c in clients])
        out[key] = torch.tensordot(p, stacked, dims=1).to(ref.dtype)
    return out


def aggregate_adapters(
    clients: Sequence[ClientAdapter],
    weights: WeightsLike = None,
    *,
    operator: str | AggregationOperator = "glora_auto",
    rank: int,
    client_ranks: Sequence[Mapping[str, int]] | None = None,
    states: Mapping[str, OperatorState | None] | None = None,
    options: Mapping[str, float] | None = None,
) -> AdapterRound:
    """Aggregate whole adapters module by module with a registered operator.

    The adapters become a mapping of module name to the clients' factors, and one call of
    :func:`glora_math.aggregate_modules` (the core's round) does the rest; the dense tensors
    (``modules_to_save``) are averaged with the same normalised weights.

    The default, ``glora_auto``, is GLoRA on the side (the B column spaces or the A row
    spaces) with the smaller certified residual: at the same server rank its error is never
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
        ``{"max_residual": 0.1}`` for the GLoRA family: a ``ResidualWarning`` naming the
        module when a module's certified relative residual exceeds it.

    Every GLoRA-family result carries ``certificate`` (its exact relative error against the
    module's mean update).
    """
    if not clients:
        raise AdapterError("no client adapters")
    names = _check_same_modules(clients)
    modules = {name: [c.modules[name].factors for c in clients] for name in names}
    rnd = aggregate_modules(
        modules,
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
        dense=fedavg_dense(clients, rnd.weights),
        states=rnd.states,
        weights=rnd.weights,
        clients=rnd.clients,
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
    operator: str = "glora_auto",
    rank: int | None = None,
    out: str | Path | None = None,
    options: Mapping[str, float] | None = None,
) -> AdapterRound:
    """One federated round on peft adapters, in one call; optionally saved as adapter folders.

    ``clients``: adapter folders, ``PeftModel``s or ``(state_dict, LoraConfig)`` pairs (see
    :func:`as_adapter`). ``rank``: the server rank R (default: the largest client rank).
    With ``out``, writes ``out/global`` (the server update of every module plus the averaged
    ``modules_to_save``: load it with ``PeftModel.from_pretrained``), ``out/client_<i>`` (what
    client i continues from, at its own rank; not for operators whose clients re-initialise),
    ``out/base_delta.safetensors`` (dense changes to fold into the base weights, for
    FedEx-LoRA and the ``_residual`` operators) and ``out/round.json`` (operator, weights,
    server rank, per-module certificates). Everything else as :func:`aggregate_adapters`.
    """
    adapters = [as_adapter(c, i) for i, c in enumerate(clients)]
    if not adapters:
        raise AdapterError("no client adapters")
    R = rank or max(m.factors.rank for a in adapters for m in a.modules.values())
    rnd = aggregate_adapters(adapters, weights, operator=operator, rank=R, options=options)
    if out is not None:
        folder = Path(out)
        config = adapters[0].config
        save_adapter(folder / "global", rnd.global_modules, rnd.dense, config)
        for i, mods in enumerate(rnd.client_modules):
            if mods is not None:
                save_adapter(folder / f"client_{i}", mods, rnd.dense, adapters[i].config)
        if rnd.base_deltas:
            deltas = {k: v.contiguous() for k, v in rnd.base_deltas.items()}
            save_file(deltas, str(folder / "base_delta.safetensors"))
        summary = {
            "operator": operator,
            "server_rank": R,
            "clients": len(adapters),
            "weights": None if weights is None else [float(w) for w in weights],
            "certified_relative_residual": rnd.certificates(),
        }
        (folder / "round.json").write_text(json.dumps(summary, indent=2))
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
    p.add_argument("--operator", default="glora_auto", help="a name of glora_math.list_operators()")
    p.add_argument("--rank", type=int, default=None, help="server rank R (default: the largest "
                   "client rank)")  # fmt: skip
    p.add_argument("--options", default="", help="operator options, name=value,...")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``glora aggregate ADAPTER... --out DIR``: one round over real peft adapter folders."""
    p = build_parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        p.error(f"--out {out} is not an empty folder (pass --overwrite to replace it)")
    try:
        weights = None
        if args.weights:
            weights = [float(w) for w in args.weights.split(",") if w.strip()]
        opts = parse_options(args.options)
        if args.operator not in list_operators():
            p.error(f"--operator {args.operator!r} is not one of {list_operators()}")
        if out.exists() and args.overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        rnd = aggregate_peft(args.adapters, weights, operator=args.operator, rank=args.rank,
                             out=out, options=opts)  # fmt: skip
    except GloraError as err:  # before ValueError: GloraErrors are ValueErrors too
        sys.stderr.write(f"glora aggregate: error: {err}\n")
        return 2
    except ValueError as err:  # --weights that are not numbers
        p.error(str(err))
    except OSError as err:
        sys.stderr.write(f"glora aggregate: error: {out}: {err.strerror}\n")
        return 2
    certs = rnd.certificates()
    worst = f"; worst certified residual {max(certs.values()):.3e}" if certs else ""
    print(f"wrote {out}/global ({len(rnd.results)} modules, operator {args.operator}){worst}")
    return 0


__all__ = [
    "AdapterRound",
    "ClientLike",
    "aggregate_adapters",
    "aggregate_peft",
    "as_adapter",
    "fedavg_dense",
    "main",
]
