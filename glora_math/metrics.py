"""Error metrics between low-rank updates, computed without forming d-by-k matrices.

A sum of products ``sum_j B_j A_j`` is one product of stacked factors, and
``||B A||_F = ||T A||_F`` for the thin QR ``B = Q T``: so every distance here costs
O(d m^2 + m^2 k) for m stacked columns, and has no cancellation of squared norms (differences
of order 1e-16 relative are measured correctly in float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glora_math.errors import ShapeMismatchError
from glora_math.linalg import lowrank_fro_norm, lowrank_svd
from glora_math.types import LoRAFactors, ServerState
from glora_math.validation import (
    WeightsLike,
    normalize_weights,
    validate_clients,
    validate_rank,
)


def mean_update(factors: Sequence[LoRAFactors], weights: WeightsLike = None) -> LoRAFactors:
    """The exact mean update ``W_bar = sum_i p_i B_i A_i`` as stacked factors (working dtype).

    ``B = [p_1 B_1, ..., p_N B_N]`` (d by sum r_i), ``A = [A_1; ...; A_N]``. This is FLoRA's
    stacking (arXiv 2409.05976): exact, of rank up to ``sum_i r_i``.
    """
    info = validate_clients(factors)
    p = normalize_weights(weights, len(factors), dtype=info.work_dtype, device=info.device)
    Bs = [p[i] * f.B.to(info.work_dtype) for i, f in enumerate(factors)]
    As = [f.A.to(info.work_dtype) for f in factors]
    return LoRAFactors(torch.cat(Bs, dim=1), torch.cat(As, dim=0))


def difference(x: LoRAFactors, y: LoRAFactors) -> LoRAFactors:
    """``x - y`` as stacked factors ``[B_x, -B_y] [A_x; A_y]`` in the promoted dtype."""
    dt = torch.promote_types(x.B.dtype, y.B.dtype)
    return LoRAFactors(
        torch.cat([x.B.to(dt), -y.B.to(dt)], dim=1), torch.cat([x.A.to(dt), y.A.to(dt)], dim=0)
    )


def state_factors(state: ServerState) -> LoRAFactors:
    """The server update as factors: ``(U_ref, S)`` on the left, ``(S^T, V_ref^T)`` on the right."""
    if state.side == "right":
        return LoRAFactors(state.S.mT, state.U.mT)
    return LoRAFactors(state.U, state.S)


def _one_module(x: LoRAFactors, what: str) -> LoRAFactors:
    """``x`` if it is one module; a stack (leading batch dimensions) is a typed error."""
    if x.batch_shape:
        raise ShapeMismatchError(
            f"{what} takes one module, got stacked factors (batch dimensions {x.batch_shape}): "
            "pass the modules one by one"
        )
    return x


def fro_norm(x: LoRAFactors) -> float:
    """``||B A||_F`` without forming ``B A``."""
    x = _one_module(x, "fro_norm")
    return lowrank_fro_norm(x.B, x.A)


def fro_distance(x: LoRAFactors, y: LoRAFactors) -> float:
    """``||B_x A_x - B_y A_y||_F`` without forming either product."""
    return fro_norm(difference(_one_module(x, "fro_distance"), _one_module(y, "fro_distance")))


def singular_values(x: LoRAFactors) -> torch.Tensor:
    """Singular values of ``B A`` (descending) from the factors, O(d m^2 + m^2 k)."""
    x = _one_module(x, "singular_values")
    return lowrank_svd(x.B, x.A)[1]


def best_rank_approx(x: LoRAFactors, rank: int) -> LoRAFactors:
    """Best rank-``rank`` approximation of ``B A`` (Eckart-Young) as factors ``(U_r s_r, Vh_r)``.

    Computed from the factors (QR + small SVD); never forms ``B A``.
    """
    r = validate_rank(rank)
    x = _one_module(x, "best_rank_approx")
    U, s, Vh = lowrank_svd(x.B, x.A)
    return LoRAFactors(U[:, :r] * s[:r], Vh[:r])


def relative_error(
    approx: LoRAFactors, factors: Sequence[LoRAFactors], weights: WeightsLike = None
) -> float:
    """``||approx - W_bar||_F / ||W_bar||_F`` (0 when both are zero, inf when only W_bar is)."""
    mean = mean_update(factors, weights)
    num = fro_distance(approx, mean)
    den = fro_norm(mean)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


__all__ = [
    "best_rank_approx",
    "difference",
    "fro_distance",
    "fro_norm",
    "mean_update",
    "relative_error",
    "singular_values",
    "state_factors",
]
