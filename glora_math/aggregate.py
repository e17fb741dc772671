"""The GLoRA aggregation operator (SPEC, GLoRA steps 1-3; arXiv 2605.06733, reconstructed).

Per client: gauge-fix ``B_i A_i = U_i C_i``. Consensus: ``U_ref = TopEig_R(sum_i p_i U_i U_i^T)``.
Shared coordinates: ``S = sum_i p_i (U_ref^T U_i) C_i``. The state ``(U_ref, S)`` represents
``U_ref S = U_ref U_ref^T W_bar``, the projection of the mean update onto the consensus subspace
(P1), and is gauge invariant (P3). Everything is low-rank: nothing d-by-k is formed, and a
d-by-d matrix only when d is below the total client rank (then it is smaller than the factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.consensus import consensus, live_clients, stacked_weights
from glora_math.gauge import gauge_fix_all
from glora_math.implicit import implicit_state
from glora_math.types import GaugeMode, LoRAFactors, ServerState, Sketch
from glora_math.validation import (
    ClientsInfo,
    WeightsLike,
    normalize_weights,
    validate_clients,
    validate_rank,
)


def glora_aggregate(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    rank: int,
    gauge: GaugeMode = "qr",
    sketch: Sketch | None = None,
) -> ServerState:
    """Aggregate client LoRA updates into a gauge-invariant low-rank server state.

    Parameters
    ----------
    factors
        N clients' ``LoRAFactors(B_i, A_i)``, B_i ``(d, r_i)``, A_i ``(r_i, k)``; ranks may
        differ. Scales must already be folded into the factors.
    weights
        Non-negative weights ``(N,)`` (e.g. sample counts), renormalised to sum 1;
        ``None`` for equal weights. Zero-weight clients drop out.
    rank
        Server rank R (clamped, with a ``RankClampedWarning``, to the dimension spanned by the
        clients).
    gauge
        ``"qr"`` or ``"svd"``: see :func:`glora_math.gauge_fix`.
    sketch
        ``None`` for the exact consensus subspace; a :class:`~glora_math.types.Sketch` for the
        randomized one (see :func:`glora_math.consensus_basis`). P1 then holds for the
        subspace the sketch found: the state is still the exact projection of the mean update
        onto its own ``U``.

    Returns
    -------
    ServerState
        ``U`` ``(d, R)``, ``S`` ``(R, k)``, spectrum and eigengap; ``U @ S`` equals
        ``U U^T sum_i p_i B_i A_i``.

    Raises
    ------
    EmptyClientsError, ShapeMismatchError, NonFiniteError, DeviceMismatchError, DtypeError,
    WeightError, RankError

    Cost O(sum_i r_i^2 (d + k) + d (sum_i r_i)^2 + R (d + k) sum_i r_i).

    For float32 (and half) clients with the ``qr`` gauge, both consensus modes run on the raw
    factors (:mod:`glora_math.implicit`): the client bases come from float64 Gram matrices,
    and neither the Householder QR of each client nor its coordinates ``C_i`` are computed.
    The result is the general route's to rounding (the same subspace; for a sketch, from the
    same test matrix).
    """
    R = validate_rank(rank)
    info = validate_clients(factors)
    p = normalize_weights(weights, len(factors), dtype=info.work_dtype, device=info.device)
    fast = implicit_state(factors, info, p, R, sketch) if gauge == "qr" else None
    U, S, eigvals, gap = fast or _general_state(factors, info, p, R, gauge=gauge, sketch=sketch)
    return ServerState(
        U=U,
        S=S,
        eigvals=eigvals,
        gap=gap,
        requested_rank=R,
        weights=p,
        gauge=gauge,
        dtype=info.dtype,
    )


def _general_state(
    factors: Sequence[LoRAFactors],
    info: ClientsInfo,
    p: Tensor,
    R: int,
    *,
    gauge: GaugeMode,
    sketch: Sketch | None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(U, S, eigvals, gap)`` through explicit gauge-fixed clients (every mode and dtype)."""
    fixed = gauge_fix_all(factors, info, gauge)
    basis, M = consensus(fixed, p, R, sketch, stacklevel=4)
    U = basis.U
    # S = sum_i p_i (U^T U_i) C_i = (U^T M) [sqrt(p_1) C_1; ...; sqrt(p_N) C_N]: two products.
    live = live_clients(fixed, p)
    if live and U.shape[1] > 0:
        C = torch.cat([fixed[i].C for i in live], dim=0)
        S = (U.mT @ M) @ (C * stacked_weights(fixed, p, live).unsqueeze(-1))
    else:
        S = U.new_zeros((U.shape[1], info.k))
    return U, S, basis.eigvals, basis.gap


__all__ = ["glora_aggregate"]
