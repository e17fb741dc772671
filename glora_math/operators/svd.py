"""SVD-based operators: the best rank-r update of the mean, from factors.

FlexLoRA (arXiv 2402.11505), the exact truncated SVD of the mean (``svd_mean``, the
Eckart-Young optimum at rank R) and HetLoRA (arXiv 2401.06432: zero-pad, average, truncate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from glora_math import baselines as bl
from glora_math.certificate import measured_certificate, truncation_certificate, warn_residual
from glora_math.linalg import svd_route
from glora_math.operators.interface import (
    AggregateResult,
    AggregationOperator,
    Communication,
    G,
    OperatorFn,
    OperatorState,
    RoundContext,
    factors_cost,
    register,
)
from glora_math.scaling import shift, warn_lost_update
from glora_math.tolerances import working_dtype
from glora_math.types import Certificate, LoRAFactors
from glora_math.validation import validate_clients


def _certificate(
    fs: Sequence[LoRAFactors], p: Tensor, update: LoRAFactors, s: Tensor, rank: int
) -> Certificate:
    """The exact relative error of ``update``, the rank-``rank`` truncation of the mean.

    Float32/float64 clients whose entries lie in the dtype's comfortable band (every realistic
    adapter; :func:`~glora_math.scaling.shift`): the tail of the spectrum ``s`` (Eckart-Young,
    :func:`~glora_math.certificate.truncation_certificate`), free from the SVD, exact to
    working precision. Otherwise the update may not be exactly that truncation (rounded to
    half precision after the SVD; entries that under- or overflow near the ends of the range),
    and its error is measured from the factors in float64 at unit scale
    (:func:`~glora_math.certificate.measured_certificate`); an
    :class:`~glora_math.errors.UnderflowWarning` says so where the whole update is lost.
    """
    dtype = fs[0].B.dtype
    if dtype == working_dtype(dtype) and shift(fs, dtype) == (0, 0):
        return truncation_certificate(s, rank)
    cert = measured_certificate(fs, p, update)
    # A nonzero mean (its norm may be below float64's range) and a zero update.
    if cert.relative_residual > 0 and not bool((update.B != 0).any() and (update.A != 0).any()):
        norm = f"{cert.mean_norm:.3e}" if cert.mean_norm > 0 else "below float64's range"
        warn_lost_update(update.B.dtype, norm, stacklevel=5)
    return cert


def _svd_result(default: Literal["balanced", "left"]) -> OperatorFn:
    """Truncated SVD of the mean; the factor split from option ``balanced_split`` if given."""

    def fn(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        info = validate_clients(fs)
        split = default
        if "balanced_split" in ctx.options:
            split = "balanced" if ctx.options["balanced_split"] > 0 else "left"
        U_all, s_all, Vh_all = bl.spectrum_of_mean(fs, p)
        U, s, Vh = U_all[:, : ctx.rank], s_all[: ctx.rank], Vh_all[: ctx.rank]
        glob = bl.truncate_svd(U, s, Vh, ctx.rank, info.dtype, split=split)
        per = [bl.truncate_svd(U, s, Vh, r, info.dtype, split=split) for r in ctx.client_ranks]
        route = svd_route(info.d, info.k, sum(f.rank for f in fs))
        cert = _certificate(fs, p, glob, s_all, ctx.rank)
        # Called directly (the round strips the option and warns per module by name).
        where = f"rank-{ctx.rank} truncation of the mean"
        limit = ctx.options.get("max_residual", 0.0)
        warn_residual(cert.relative_residual, limit, where, stacklevel=4)
        return AggregateResult(glob, None, per, basis=U, certificate=cert, route=route)

    return fn


def _svd_sensitivity(
    fs: Sequence[LoRAFactors], p: Tensor, R: int, state: OperatorState | None
) -> float:
    """The relative singular gap (s_R - s_{R+1}) / s_1 of the mean (1 when R >= its rank)."""
    s = bl.svd_of_mean(fs, p, rank=max(1, min(R + 1, sum(f.rank for f in fs))))[1]
    s = s.detach().to(torch.float64)
    if s.numel() <= R or float(s[0]) == 0.0:
        return 1.0
    return max((float(s[R - 1]) - float(s[R])) / float(s[0]), 0.0)


_SVD_GUARANTEES = frozenset(
    {
        G.GAUGE_INVARIANT_GL,
        G.GAUGE_INVARIANT_O,
        G.GAUGE_INVARIANT_SO,
        G.COMMON_GAUGE_EQUIVARIANT,
        G.PERMUTATION_INVARIANT,
        G.RANK_COMPATIBLE,
        G.CERTIFIED,
    }
)

#: ``max_residual`` > 0: a ``ResidualWarning`` naming the module where the certified relative
#: residual exceeds it (raised by the round, :func:`glora_math.aggregate_modules`).
_SVD_OPTIONS = {"max_residual": 0.0}

register(
    AggregationOperator(
        name="flexlora",
        paper="arXiv 2402.11505",
        summary="best rank-r_i approximation of the mean, per client (from factors); as the "
        "published code, B = U_r S_r and A = V_r^T (option balanced_split=1: sqrt(S) each)",
        sends_back="rank-r_i factors per client",
        guarantees=_SVD_GUARANTEES,
        fn=_svd_result("left"),
        options={**_SVD_OPTIONS, "balanced_split": 0.0},
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=r * (d + k)),
        sensitivity=_svd_sensitivity,
    )
)

register(
    AggregationOperator(
        name="svd_mean",
        paper="Eckart-Young (the rank-R optimum)",
        summary="exact truncated SVD of the mean at server rank R, readouts per client",
        sends_back="rank-r_i factors per client",
        guarantees=_SVD_GUARANTEES,
        fn=_svd_result("balanced"),
        options=_SVD_OPTIONS,
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=r * (d + k)),
        sensitivity=_svd_sensitivity,
    )
)


def _hetlora(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    weighted = ctx.options.get("norm_weighted", 0.0) > 0
    glob, per = bl.hetlora(fs, p, client_ranks=ctx.client_ranks, norm_weighted=weighted)
    return AggregateResult(glob, None, per)


register(
    AggregationOperator(
        name="hetlora",
        paper="arXiv 2401.06432",
        summary="zero-pad to max rank, average (as the public codes: weights p_i; option "
        "norm_weighted=1: the paper's p_i ||B_i A_i||), truncate per client",
        sends_back="truncated global factors (rank r_i)",
        # With equal ranks HetLoRA is a (norm-weighted) FedIT, hence common-gauge equivariant.
        guarantees=frozenset({G.PERMUTATION_INVARIANT, G.COMMON_GAUGE_EQUIVARIANT}),
        fn=_hetlora,
        options={"norm_weighted": 0.0},
        cost=factors_cost,
    )
)
