"""SVD-based operators: the best rank-r update of the mean, from factors.

FlexLoRA (arXiv 2402.11505), the exact truncated SVD of the mean (``svd_mean``, the
Eckart-Young optimum at rank R) and HetLoRA (arXiv 2401.06432: zero-pad, average, truncate).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from glora_math import baselines as bl
from glora_math.certificate import measured_certificate, truncation_certificate, warn_residual
from glora_math.errors import UnderflowWarning
from glora_math.linalg import lowrank_fro_norm, svd_route
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
from glora_math.scaling import balanced_power, exponent, shift, times_pow2, warn_lost_update
from glora_math.tolerances import certificate_tol, storage_tol, working_dtype
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


def _at_unit_scale(
    fs: Sequence[LoRAFactors], p: Tensor, work: torch.dtype
) -> tuple[Sequence[LoRAFactors], Tensor, tuple[int, int]]:
    """The clients, their weights and the powers of 2 ``(kb, ka)`` the truncation runs at.

    Inside the comfortable band: the clients as they are, ``(0, 0)`` (bit for bit). Outside:
    clients of weight 0 left out (their entries do not set the scale), each factorisation
    balanced by a power of 2 (``B 2^-e``, ``A 2^e``: the same product; FlexLoRA and
    ``svd_mean`` see only products), then all ``B_i`` times ``2^-kb`` and ``A_i`` times
    ``2^-ka`` (:func:`~glora_math.scaling.shift`): exact, and the mean is ``2^(kb + ka)``
    times theirs.
    """
    if shift(fs, work) == (0, 0):
        return fs, p, (0, 0)  # the same sequence: validated once (glora_math.validation)
    keep = [i for i in range(len(fs)) if float(p[i]) > 0]
    bal = []
    for i in keep:
        e = (exponent(fs[i].B) - exponent(fs[i].A)) // 2
        bal.append(LoRAFactors(times_pow2(fs[i].B, -e), times_pow2(fs[i].A, e)))
    kb, ka = shift(bal, work)
    units = [LoRAFactors(times_pow2(f.B, -kb), times_pow2(f.A, -ka)) for f in bal]
    return units, p[keep], (kb, ka)


def _split_power(f: LoRAFactors, t: int) -> int:
    """The part ``x`` of ``2**t`` that goes to ``B`` (``2**(t - x)`` goes to ``A``).

    0 for ``t = 0`` (nothing rescaled, bit for bit); else the split that leaves the binary
    exponents of the largest entries of ``B`` and ``A`` at most 1 apart.
    """
    if t == 0 or not f.B.numel() or not f.A.numel():
        return 0
    return balanced_power(f.B, f.A, t)


def _back(f: LoRAFactors, x: int, t: int, dtype: torch.dtype) -> LoRAFactors:
    """``f`` (at unit scale, working dtype) as factors of ``f * 2**t`` in ``dtype``."""
    if t == 0:
        return LoRAFactors(f.B.to(dtype), f.A.to(dtype))
    return LoRAFactors(times_pow2(f.B, x).to(dtype), times_pow2(f.A, t - x).to(dtype))


def _warn_stored_loss(glob: LoRAFactors, work: LoRAFactors, x: int, t: int, s: Tensor) -> None:
    """The :class:`~glora_math.errors.UnderflowWarning` of an update partly lost in storage.

    ``work`` is the truncation as computed (working dtype, unit scale), ``glob`` the factors
    returned (scaled by ``2**x``, ``2**(t - x)`` and stored in the clients' dtype). Scaled back
    in float64 (powers of 2: exact, subnormals included), their difference is exactly what
    scaling and storage lost, relative to the mean (``||s||``, its spectrum at unit scale).
    Said where it passes the storage dtype's rounding (:func:`~glora_math.tolerances.
    storage_tol`, scaled by ``||B|| ||A|| / ||W_bar||``) plus the measurement's own (float64
    :func:`~glora_math.tolerances.certificate_tol`): float16 factors with subnormal entries,
    an update near the end of float64's range.
    """
    mean = float(torch.linalg.vector_norm(s.to(torch.float64)))
    if mean == 0.0 or not bool((glob.B != 0).any() and (glob.A != 0).any()):
        return  # a zero mean, or an update lost whole (said with the certificate)
    B, A = work.B.to(torch.float64), work.A.to(torch.float64)
    back_B = times_pow2(glob.B.to(torch.float64), -x)
    back_A = times_pow2(glob.A.to(torch.float64), x - t)
    lost = float(lowrank_fro_norm(torch.cat([back_B, -B], dim=1), torch.cat([back_A, A], dim=0)))
    spread = float(B.norm() * A.norm()) / mean
    n = int(B.shape[0]) + int(A.shape[1])
    tol = storage_tol(glob.B.dtype, scale=spread) + certificate_tol(
        torch.float64, n=n, scale=spread
    )
    if lost > tol * mean:
        warnings.warn(
            UnderflowWarning(
                f"the server update is partly below {glob.B.dtype}'s normal range: storing it "
                f"lost {lost / mean:.3e} of the mean update (its certificate includes this)"
            ),
            stacklevel=5,
        )


def _svd_result(default: Literal["balanced", "left"]) -> OperatorFn:
    """Truncated SVD of the mean; the factor split from option ``balanced_split`` if given."""

    def fn(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        info = validate_clients(fs)
        split = default
        if "balanced_split" in ctx.options:
            split = "balanced" if ctx.options["balanced_split"] > 0 else "left"
        # Clients outside the comfortable band: the truncation at unit scale (powers of 2,
        # exact), its factors scaled back with the power split between them so that neither
        # leaves the range where the update fits (at 1e-162, FlexLoRA's U s had underflowed).
        units, pu, (kb, ka) = _at_unit_scale(fs, p, info.work_dtype)
        U_all, s_all, Vh_all = bl.spectrum_of_mean(units, pu)
        U, s, Vh = U_all[:, : ctx.rank], s_all[: ctx.rank], Vh_all[: ctx.rank]
        work = bl.truncate_svd(U, s, Vh, ctx.rank, U.dtype, split=split)
        x = _split_power(work, kb + ka)
        glob = _back(work, x, kb + ka, info.dtype)
        per = [_back(bl.truncate_svd(U, s, Vh, r, U.dtype, split=split), x, kb + ka, info.dtype)
               for r in ctx.client_ranks]  # fmt: skip
        route = svd_route(info.d, info.k, sum(f.rank for f in fs))
        cert = _certificate(fs, p, glob, s_all, ctx.rank)
        if (kb, ka) != (0, 0) or info.dtype != work.B.dtype:
            _warn_stored_loss(glob, work, x, kb + ka, s_all)
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
