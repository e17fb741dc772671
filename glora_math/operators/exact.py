"""Exact aggregation by construction: a dense residual or stacked factors.

FedEx-LoRA (arXiv 2410.09432) folds the dense residual ``W_bar - B_bar A_bar`` into the base
weight; FLoRA (arXiv 2409.05976) stacks every client's factors and merges them, after which
clients re-initialise. Both are dense or grow with the clients by definition.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from glora_math import baselines as bl
from glora_math.operators.interface import (
    EXACT_GUARANTEES,
    AggregateResult,
    AggregationOperator,
    Communication,
    RoundContext,
    register,
    same_for_all,
)
from glora_math.types import LoRAFactors


def _fedex(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    g, residual = bl.fedex_lora(fs, p, layout="out_in")
    return AggregateResult(g, residual, same_for_all(len(fs), g, ctx.client_ranks, "FedEx-LoRA"))


register(
    AggregationOperator(
        name="fedex_lora",
        paper="arXiv 2410.09432",
        summary="FedIT factors + exact dense residual folded into the base weight",
        sends_back="global factors (rank r) + dense d x k residual for the base weight",
        guarantees=EXACT_GUARANTEES,
        fn=_fedex,
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=r * (d + k) + d * k),
        equal_ranks=True,
    )
)


def _flora(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    return AggregateResult(bl.flora_stack(fs, p), None, None)


register(
    AggregationOperator(
        name="flora",
        paper="arXiv 2409.05976",
        summary="stack all clients' factors (exact); merge into base, clients re-initialise",
        sends_back="stacked factors (rank sum r_i) merged into the base weight",
        guarantees=EXACT_GUARANTEES,
        fn=_flora,
        restarts=True,
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=n * r * (d + k)),
    )
)
