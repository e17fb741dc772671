"""The randomized GLoRA route that never forms the clients' orthonormal bases.

The randomized consensus (:class:`~glora_math.types.Sketch`) sees the clients only through
``K = sum_i p_i U_i U_i^T``, and any orthonormal basis of ``col(B_i)`` gives the same K. Here
``U_i = B_i V_i S_i^{-1}`` comes from the eigendecomposition of the client's small Gram matrix
``B_i^T B_i = V_i S_i^2 V_i^T``, computed in float64 (the products of stored float32 entries are
then exact), with the numerical rank of B_i decided by the same rule as the Householder route
(:func:`~glora_math.linalg.numerical_rank` on S_i). ``U_i`` is never written: the sketch runs
on ``M = B D``, the raw stacked B's times the small block-diagonal ``D = diag(sqrt(p_i) V_i
S_i^{-1})`` (:func:`~glora_math.linalg.randomized_left_svd_factored`), and the coordinates come
from the raw factors, ``S = sum_i p_i (U^T B_i) A_i``, so P1 (``U S = U U^T W_bar``) holds for
the sketched ``U`` to working precision, as on the general route.

Accuracy: the implicit basis deviates from orthonormality by at most
:func:`~glora_math.tolerances.orthonormality_tol` where
:func:`~glora_math.tolerances.gram_basis_accurate` holds for every client (the kept part of
each B_i has condition number below about 23000 in float32). Where it does not (float64
inputs, very ill-conditioned float32 clients), or where the sketch is as wide as the union of
the client subspaces, :func:`sketched_state` returns ``None`` and the caller takes the general
route (explicit Householder bases, :func:`~glora_math.consensus.consensus`).

Cost: the float64 Gram matrices, O(d sum_i r_i^2); ``2 q + 3`` products with the stacked B's,
O(d (sum_i r_i) (R + oversample)) each; one pass over the A's. Against the general route it
saves the Householder QR of every client, writing the bases and the coordinates ``C_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.consensus import finish_basis
from glora_math.linalg import column_signs, randomized_left_svd_factored
from glora_math.tolerances import gram_basis_accurate, gram_route_possible, rank_tol
from glora_math.types import LoRAFactors, Sketch
from glora_math.validation import ClientsInfo, as_factors


def maps_from_gram(
    G: Tensor, d: int, sqrt_p: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """From float64 Gram matrices ``B^T B`` (..., r, r) of d-row B's: the maps, ranks, accuracy.

    Returns ``sqrt_p V S^{-1}`` (..., r, r) in ``dtype``, with zero columns for the directions
    the rank rule of :func:`~glora_math.linalg.numerical_rank` does not keep; the numerical
    ranks (...); and whether :func:`~glora_math.tolerances.gram_basis_accurate` holds for the
    kept part (...). ``sqrt_p`` broadcasts against the leading dimensions. Batched, so one
    eigensolver call serves many clients (or many modules of one client).
    """
    r = int(G.shape[-1])
    lam, V = torch.linalg.eigh(G)  # ascending
    s = lam.flip(-1).clamp_min(0.0).sqrt()  # descending singular values of each B
    keep = s > rank_tol(1.0, (d, r), dtype) * s[..., :1]
    rho = keep.sum(-1)
    kept = s.gather(-1, (rho - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kappa = torch.where(rho > 0, s[..., 0] / torch.where(rho > 0, kept, 1.0), 1.0)
    inv = torch.where(keep, sqrt_p.unsqueeze(-1) / torch.where(keep, s, 1.0), 0.0)
    return (V.flip(-1) * inv.unsqueeze(-2)).to(dtype), rho, gram_basis_accurate(kappa, dtype)


def gram_basis_maps(
    Bs: Sequence[Tensor], p: Sequence[float], dtype: torch.dtype
) -> tuple[Tensor, list[int]] | None:
    """The maps ``sqrt(p_i) V_i S_i^{-1}`` that turn each ``B_i`` into ``sqrt(p_i) U_i``.

    ``U_i = B_i V_i S_i^{-1}`` is an orthonormal basis of ``col(B_i)``. ``Bs`` are the clients'
    B factors (d by r_i, all in ``dtype``), ``p`` their positive weights. Returns the maps and
    the numerical ranks ``rho_i`` (the rule of :func:`~glora_math.linalg.numerical_rank` on the
    singular values ``S_i``), or ``None`` if some client's kept part is too ill-conditioned for
    the float64 Gram matrix to match a Householder basis in ``dtype``
    (:func:`~glora_math.tolerances.gram_basis_accurate`).

    The maps come as a stack ``(N, r, r)`` when all ranks are equal, the columns of the
    directions a client does not keep set to zero (so ``[B_1 ... B_N]`` times the block
    diagonal of the stack has ``N r - sum rho_i`` zero columns, which change nothing in K), and
    otherwise as the dense block-diagonal matrix, ``sum r_i`` by ``sum rho_i``.
    """
    d = int(Bs[0].shape[0])
    grams = []
    for B in Bs:
        B64 = B.to(torch.float64)
        grams.append(B64.mT @ B64)
    by_rank: dict[int, list[int]] = {}
    for i, B in enumerate(Bs):
        by_rank.setdefault(int(B.shape[1]), []).append(i)
    blocks: list[Tensor | None] = [None] * len(Bs)
    ranks = [0] * len(Bs)
    for idx in by_rank.values():
        pi = torch.tensor([p[i] for i in idx], dtype=torch.float64, device=Bs[0].device)
        G = torch.stack([grams[i] for i in idx])
        maps, rho, accurate = maps_from_gram(G, d, pi.sqrt(), dtype)
        if not bool(accurate.all()):
            return None
        if len(by_rank) == 1:
            return maps, [int(x) for x in rho.tolist()]
        for j, (i, rj) in enumerate(zip(idx, rho.tolist(), strict=True)):
            blocks[i] = maps[j, :, :rj]
            ranks[i] = int(rj)
    D = Bs[0].new_zeros((sum(int(B.shape[1]) for B in Bs), sum(ranks)))
    row = col = 0
    for blk in blocks:
        assert blk is not None
        D[row : row + blk.shape[0], col : col + blk.shape[1]] = blk
        row, col = row + int(blk.shape[0]), col + int(blk.shape[1])
    return D, ranks


def sketched_state(
    factors: Sequence[LoRAFactors], info: ClientsInfo, p: Tensor, R: int, sketch: Sketch
) -> tuple[Tensor, Tensor, Tensor, float] | None:
    """``(U, S, eigvals, gap)`` of the randomized GLoRA state, or ``None`` (general route).

    ``factors`` are validated clients, ``p`` their normalised weights (``info.work_dtype``).
    Warnings (rank clamped, zero eigengap) point at the caller of the caller.
    """
    wd = info.work_dtype
    if not gram_route_possible(wd):
        return None
    pl = p.tolist()
    live = [i for i, pi in enumerate(pl) if pi > 0]
    cs = [as_factors(factors[i], i) for i in live]
    if not cs or any(c.rank == 0 or c.rank > info.d for c in cs):
        return None
    Bs = [c.B.to(wd) for c in cs]
    maps = gram_basis_maps(Bs, [pl[i] for i in live], wd)
    if maps is None:
        return None
    D, ranks = maps
    d, m = info.d, sum(ranks)
    width = R + sketch.oversample
    if m == 0 or width >= min(d, m):
        return None
    B = torch.cat(Bs, dim=1)
    gen = torch.Generator().manual_seed(sketch.seed)
    Uall, s, BtU = randomized_left_svd_factored(
        B, D, width, power_iters=sketch.power_iters, generator=gen, rank=m
    )
    basis = finish_basis(Uall, s.pow(2), (d, m), R, stacklevel=4)
    U = basis.U
    Rk = int(U.shape[1])
    # U^T B_i = signs * (B_i^T Uall[:, :R])^T; S = sum_i p_i (U^T B_i) A_i in one product.
    sg = column_signs(Uall[:, :Rk])
    p_cols = torch.cat([p[i].expand(c.rank) for i, c in zip(live, cs, strict=True)])
    coef = ((BtU[:, :Rk] * p_cols[:, None]) * sg).mT  # R by sum r_i
    S = U.new_zeros((Rk, info.k))
    col = 0
    for c in cs:  # one pass over the A's, without stacking them
        S.addmm_(coef[:, col : col + c.rank], c.A.to(wd))
        col += c.rank
    return U, S, basis.eigvals, basis.gap


__all__ = ["gram_basis_maps", "maps_from_gram", "sketched_state"]
