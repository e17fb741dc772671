"""Batched GLoRA: many modules of the same shape aggregated in one call.

A model has many adapted modules of few distinct shapes (e.g. 32 layers x q, k, v, o of
4096 x 4096). Stacking modules of one shape along a leading batch dimension L turns the
per-module QR, SVD and products into batched torch kernels (CPU or GPU) instead of a Python loop
per module. The result equals :func:`glora_math.glora_aggregate` applied to each module; layers
the batched path cannot treat uniformly (a rank-deficient client factor, or a server rank at or
above the numerical rank) are recomputed one by one with the unbatched operator.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from glora_math.aggregate import glora_aggregate
from glora_math.errors import (
    DeviceMismatchError,
    EmptyClientsError,
    NonFiniteError,
    RankError,
    ShapeMismatchError,
    ZeroEigengapWarning,
)
from glora_math.implicit import implicit_bases, maps_from_gram
from glora_math.linalg import (
    column_signs,
    full_rank_qr,
    gram_top_left_svd,
    randomized_left_svd,
    randomized_left_svd_factored,
)
from glora_math.tolerances import (
    gram_route_possible,
    rank_tol,
    working_dtype,
    zero_gap_tol,
)
from glora_math.types import LoRAFactors, Sketch, Split
from glora_math.validation import WeightsLike, all_finite, normalize_weights, validate_rank


@dataclass(frozen=True, slots=True)
class BatchedState:
    """GLoRA server states of L modules of one shape.

    Parameters
    ----------
    U
        Consensus bases, ``(L, d, R)``.
    S
        Shared coordinates, ``(L, R, k)``.
    gap
        Eigengap at R per module, ``(L,)``.
    dtype
        The clients' dtype (readouts are returned in it).
    """

    U: Float[Tensor, "L d R"]
    S: Float[Tensor, "L R k"]
    gap: Float[Tensor, " L"]
    dtype: torch.dtype

    def delta(self) -> Float[Tensor, "L d k"]:
        """Dense updates ``U @ S`` (tests only)."""
        return self.U @ self.S


def _validate(
    Bs: Sequence[Tensor], As: Sequence[Tensor]
) -> tuple[int, int, int, torch.dtype, torch.device]:
    if len(Bs) == 0 or len(Bs) != len(As):
        raise EmptyClientsError(f"got {len(Bs)} left and {len(As)} right factors")
    L, d, _ = Bs[0].shape
    k = As[0].shape[-1]
    dtype = Bs[0].dtype
    for i, (B, A) in enumerate(zip(Bs, As, strict=True)):
        if B.ndim != 3 or A.ndim != 3 or B.shape[0] != L or A.shape[0] != L:
            raise ShapeMismatchError(
                f"expected (L, d, r) and (L, r, k) with L={L}, got {tuple(B.shape)} and "
                f"{tuple(A.shape)}",
                client=i,
            )
        if B.shape[1] != d or A.shape[2] != k or B.shape[2] != A.shape[1]:
            raise ShapeMismatchError(
                f"B {tuple(B.shape)} and A {tuple(A.shape)} do not give ({L}, {d}, {k}) updates",
                client=i,
            )
        if B.device != Bs[0].device or A.device != Bs[0].device:
            raise DeviceMismatchError("factors on different devices", client=i)
        for name, x in (("B", B), ("A", A)):
            if not all_finite(x):
                raise NonFiniteError(f"{name} has non-finite entries", client=i)
        dtype = torch.promote_types(dtype, torch.promote_types(B.dtype, A.dtype))
    return L, d, k, dtype, Bs[0].device


def glora_aggregate_batched(
    Bs: Sequence[Float[Tensor, "L d r"]],
    As: Sequence[Float[Tensor, "L r k"]],
    weights: WeightsLike = None,
    *,
    rank: int,
    sketch: Sketch | None = None,
) -> BatchedState:
    """GLoRA (qr gauge) for L modules at once; equal to the per-module operator.

    Parameters
    ----------
    Bs, As
        Per client, the stacked factors of the L modules: ``(L, d, r_i)`` and ``(L, r_i, k)``.
    weights
        Client weights (shared by all modules).
    rank
        Server rank R.
    sketch
        ``None`` for the exact consensus; a :class:`Sketch` for randomized subspace iteration
        (one Gaussian test matrix shared by the L modules).

    Cost: the per-module cost of :func:`glora_aggregate` times L, in batched kernels.
    """
    R = validate_rank(rank)
    L, d, _, dtype, device = _validate(Bs, As)
    wd = working_dtype(dtype)
    p = normalize_weights(weights, len(Bs), dtype=wd, device=device)
    live = [i for i, pi in enumerate(p.tolist()) if pi > 0]
    if live:
        fast = _implicit_batched(Bs, As, p, live=live, R=R, sketch=sketch, wd=wd)
        if fast is not None:
            Uf, Sf, eigf, unif, mf = fast
            return _finish(
                Bs, As, p, R=R, sketch=sketch, dtype=dtype, U=Uf, S=Sf, eig=eigf, uniform=unif, m=mf
            )
    Qs, Cs, uniform = [], [], torch.ones(L, dtype=torch.bool, device=device)
    for i in live:
        B, A = Bs[i].to(wd), As[i].to(wd)
        Q, T, full = full_rank_qr(B)
        uniform &= full
        Qs.append(Q * p[i].sqrt())
        Cs.append(p[i].sqrt() * (T @ A))
    M = torch.cat(Qs, dim=-1)  # (L, d, m): [sqrt(p_i) U_i]
    m = M.shape[-1]
    if sketch is None:
        # The Gram route where it is accurate; layers where it is not go unbatched below.
        Uall, eig, ok = gram_top_left_svd(M, R)
        uniform &= ok
    else:
        gen = torch.Generator().manual_seed(sketch.seed)
        Uall, sv = randomized_left_svd(
            M, R + sketch.oversample, power_iters=sketch.power_iters, generator=gen
        )
        eig = sv.pow(2)
        # A layer whose stacked bases have numerical rank < R needs clamping: do it unbatched.
        if sv.shape[-1] < R:
            uniform[:] = False
        else:
            uniform &= sv[..., R - 1] > rank_tol(1.0, (d, m), wd) * sv[..., 0]
    Rb = min(R, Uall.shape[-1])
    U = torch.zeros(L, d, R, dtype=wd, device=device)
    U[..., :Rb] = Uall[..., :Rb] * column_signs(Uall[..., :Rb]).unsqueeze(-2)
    # S = sum_i p_i (U^T U_i) C_i = (U^T M) [sqrt(p_i) C_i]_i, with U_i = Q_i, C_i = T_i A_i.
    S = (U.mT @ M) @ torch.cat(Cs, dim=-2)
    return _finish(
        Bs, As, p, R=R, sketch=sketch, dtype=dtype, U=U, S=S, eig=eig, uniform=uniform, m=m
    )


def _implicit_batched(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    p: Tensor,
    *,
    live: Sequence[int],
    R: int,
    sketch: Sketch | None,
    wd: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int] | None:
    """The route of :mod:`glora_math.implicit` (exact or randomized), batched over L modules.

    Returns ``(U, S, eig, uniform, m)`` or ``None`` where that route does not apply (see
    :func:`~glora_math.implicit.implicit_state`). Layers where some client's B is
    rank-deficient or too ill-conditioned for its float64 Gram matrix
    (:func:`~glora_math.tolerances.gram_basis_accurate`), or where the consensus needs the
    accurate route (R near the numerical rank), are marked non-uniform and redone by the
    per-module operator.
    """
    if not gram_route_possible(wd):
        return None
    B0 = Bs[live[0]]
    L, d = int(B0.shape[0]), int(B0.shape[1])
    widths = [int(Bs[i].shape[-1]) for i in live]
    n = sum(widths)
    if any(r > d for r in widths):
        return None
    if sketch is not None and R + sketch.oversample >= min(d, n):
        return None
    uniform = torch.ones(L, dtype=torch.bool, device=B0.device)
    blocks = []
    for i in live:
        B64 = Bs[i].to(torch.float64)
        r = int(B64.shape[-1])
        maps, rho, accurate = maps_from_gram(B64.mT @ B64, d, p[i].to(torch.float64).sqrt(), wd)
        uniform &= (rho == r) & accurate
        blocks.append(maps)
    Bw = [Bs[i].to(wd) for i in live]
    BtQ = None
    if sketch is None:
        M = implicit_bases(Bw, blocks)  # (L, d, n)
        Uall, eig, ok = gram_top_left_svd(M, R)
        uniform &= ok
    else:
        D = torch.zeros(L, n, n, dtype=wd, device=B0.device)
        col = 0
        for blk, r in zip(blocks, widths, strict=True):
            D[:, col : col + r, col : col + r] = blk
            col += r
        gen = torch.Generator().manual_seed(sketch.seed)
        Uall, sv, BtQ = randomized_left_svd_factored(
            torch.cat(Bw, dim=-1),
            D,
            R + sketch.oversample,
            power_iters=sketch.power_iters,
            generator=gen,
        )
        eig = sv.pow(2)
        uniform &= sv[..., R - 1] > rank_tol(1.0, (d, n), wd) * sv[..., 0]
    sg = column_signs(Uall[..., :R]).unsqueeze(-2)
    U = Uall[..., :R] * sg
    # B_i^T U: from the sketch's last product, or one small product per client.
    BtU = torch.cat([B.mT @ U for B in Bw], dim=-2) if BtQ is None else BtQ[..., :R] * sg
    p_cols = torch.cat([p[i].expand(r) for i, r in zip(live, widths, strict=True)])
    coef = (BtU * p_cols[:, None]).mT  # (L, R, n)
    S = coef @ torch.cat([As[i].to(wd) for i in live], dim=-2)
    return U, S, eig, uniform, n


def _finish(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    p: Tensor,
    *,
    R: int,
    sketch: Sketch | None,
    dtype: torch.dtype,
    U: Tensor,
    S: Tensor,
    eig: Tensor,
    uniform: Tensor,
    m: int,
) -> BatchedState:
    """Gap, zero-gap warning and the per-module redo of the non-uniform layers."""
    L, d = int(U.shape[0]), int(U.shape[1])
    wd, device = U.dtype, U.device
    nxt = eig[..., R] if R < eig.shape[-1] else torch.zeros(L, dtype=wd, device=device)
    gap = eig[..., R - 1] - nxt if R <= eig.shape[-1] else torch.zeros(L, dtype=wd, device=device)
    zero = gap <= torch.tensor(
        [zero_gap_tol(float(e), d + m, wd) for e in eig[..., 0]], dtype=wd, device=device
    )
    if bool((zero & uniform).any()):
        warnings.warn(
            ZeroEigengapWarning(
                f"consensus eigengap at R={R} is numerically zero in modules "
                f"{torch.nonzero(zero & uniform).flatten().tolist()}: the server subspace is "
                "not unique"
            ),
            stacklevel=3,
        )
    # Layers that need the general path (rank deficiency, clamping): per-module operator.
    for layer in torch.nonzero(~uniform).flatten().tolist():
        st = glora_aggregate(
            [LoRAFactors(Bs[i][layer], As[i][layer]) for i in range(len(Bs))],
            p,
            rank=R,
            sketch=sketch,
        )
        U[layer] = 0.0
        S[layer] = 0.0
        U[layer, :, : st.rank] = st.U
        S[layer, : st.rank] = st.S
        gap[layer] = st.gap
    return BatchedState(U=U, S=S, gap=gap, dtype=dtype)


def readout_batched(
    state: BatchedState, rank: int, split: Split = "balanced"
) -> tuple[Float[Tensor, "L d r"], Float[Tensor, "L r k"]]:
    """Rank-r readouts of every module (batched SVD of S); see :func:`glora_math.readout`."""
    r = validate_rank(rank)
    R = state.U.shape[-1]
    if r > R:
        raise RankError(f"readout rank {r} exceeds the server rank R={R}")
    Us, s, Vh = torch.linalg.svd(state.S, full_matrices=False)
    sg = column_signs(state.U @ Us).unsqueeze(-2)
    Us, Vh = Us * sg, Vh * sg.mT
    B = state.U @ Us[..., :r]
    A = Vh[..., :r, :]
    sr = s[..., :r]
    if split == "balanced":
        B, A = B * sr.sqrt().unsqueeze(-2), A * sr.sqrt().unsqueeze(-1)
    elif split == "left":
        B = B * sr.unsqueeze(-2)
    elif split == "right":
        A = A * sr.unsqueeze(-1)
    else:
        raise ValueError(f"unknown split {split!r}")
    return B.to(state.dtype), A.to(state.dtype)


__all__ = ["BatchedState", "glora_aggregate_batched", "readout_batched"]
