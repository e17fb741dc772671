"""Certified error of a projected server update, from factors (SPEC, extensions: certificate).

For an orthogonal projector ``P`` and the mean update ``W_bar = sum_i p_i B_i A_i``,

    ||W_bar - P W_bar||_F^2 = ||W_bar||_F^2 - ||P W_bar||_F^2          (L1, Pythagoras)

and a GLoRA state stores the coordinates of ``P W_bar`` in an orthonormal basis (P1:
``U S = U U^T W_bar``), so ``||P W_bar||_F = ||S||_F``. The relative residual
``rho = ||W_bar - U S||_F / ||W_bar||_F`` therefore costs one norm of the stacked factors, never
a d-by-k matrix. Where the subtraction would lose more than half the working digits
(:func:`glora_math.tolerances.certificate_by_difference`), ``rho`` is computed directly as the
norm of the stacked difference ``[p_1 B_1, ..., p_N B_N, -U] [A_1; ...; A_N; S]``.

Everything here works on one orientation: a right-side state is certified on the transposed
clients ``(A_i^T, B_i^T)``, which have the same residual norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.linalg import lowrank_fro_norm
from glora_math.tolerances import certificate_by_difference
from glora_math.types import Certificate, LoRAFactors


def _stacked_mean(
    factors: Sequence[LoRAFactors], p: Tensor, wd: torch.dtype
) -> tuple[Tensor, Tensor, float]:
    """``W_bar`` as stacked factors over the live clients, and ``sum_i p_i ||B_i|| ||A_i||``."""
    pl = p.tolist()
    live = [i for i, pi in enumerate(pl) if pi > 0]
    f0 = factors[0]
    if not live:
        return (
            f0.B.new_zeros((f0.B.shape[0], 0), dtype=wd),
            f0.A.new_zeros((0, f0.A.shape[1]), dtype=wd),
            0.0,
        )
    Bs = [factors[i].B.to(wd) * p[i] for i in live]
    As = [factors[i].A.to(wd) for i in live]
    size = sum(
        float(torch.linalg.matrix_norm(B)) * float(torch.linalg.matrix_norm(A))
        for B, A in zip(Bs, As, strict=True)
    )
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0), size


def certify(
    factors: Sequence[LoRAFactors], p: Tensor, U: Tensor, S: Tensor, wd: torch.dtype
) -> Certificate:
    """The certificate of the update ``U S`` (``U`` orthonormal, ``S = U^T W_bar``).

    ``factors`` are validated clients in the state's orientation, ``p`` their normalised
    weights. Cost O((d + k) m^2) for m stacked columns (plus R for the direct way).
    """
    Bc, Ac, size = _stacked_mean(factors, p, wd)
    mean_norm = lowrank_fro_norm(Bc, Ac)
    if mean_norm == 0.0:  # W_bar = 0, hence U S = U U^T W_bar = 0 as well
        return Certificate(0.0, 0.0, "direct")
    kept = float(torch.linalg.matrix_norm(S)) / mean_norm
    rho_sq = max(0.0, 1.0 - kept * kept)
    n = int(Bc.shape[0] + Ac.shape[1] + Bc.shape[1])
    if certificate_by_difference(rho_sq, wd, n=n, scale=size / mean_norm):
        return Certificate(math.sqrt(rho_sq), mean_norm, "difference")
    num = lowrank_fro_norm(torch.cat([Bc, -U.to(wd)], dim=1), torch.cat([Ac, S.to(wd)], dim=0))
    return Certificate(num / mean_norm, mean_norm, "direct")


def residual_curve(S: Tensor, mean_norm: float) -> Tensor:
    """``rho(R)^2`` for R = 0, ..., rows of S, by the difference formula (float64, ``(R+1,)``).

    For nested bases (the first R columns of one ordered basis), ``||P_R W_bar||^2`` is the
    sum of the first R squared row norms of ``S``, so one pass gives the whole curve; it is
    non-increasing in R (auto-rank rule, SPEC extensions).
    """
    rows = S.to(torch.float64).pow(2).sum(dim=1)
    kept = torch.cat([rows.new_zeros(1), torch.cumsum(rows, dim=0)])
    if mean_norm == 0.0:
        return torch.zeros_like(kept)
    return (1.0 - kept / (mean_norm * mean_norm)).clamp_(min=0.0)


__all__ = ["certify", "residual_curve"]
