"""The GLoRA routes that never write the clients' gauge-fixed factors (float32 and half clients).

The consensus sees the clients only through ``K = sum_i p_i U_i U_i^T``, and any orthonormal
basis of ``col(B_i)`` gives the same K. Here ``U_i = B_i V_i S_i^{-1}`` comes from the
eigendecomposition of the client's small Gram matrix ``B_i^T B_i = V_i S_i^2 V_i^T``, computed in
float64 (the products of stored float32 entries are then exact), with the numerical rank of B_i
decided by the same rule as the Householder route (:func:`~glora_math.linalg.numerical_rank` on
S_i). The stacked bases are ``M = B D``: the raw stacked B's times the small block-diagonal
``D = diag(sqrt(p_i) V_i S_i^{-1})``.

- Exact consensus: ``M`` is written block by block (one small product per client) and goes to
  the same eigensolver as the general route (:func:`~glora_math.consensus.exact_top`).
- Randomized consensus (:class:`~glora_math.types.Sketch`): ``M`` is never written; the sketch
  runs on the factors (:func:`~glora_math.linalg.randomized_left_svd_factored`), with the same
  test matrix as the general route.

Either way the coordinates come from the raw factors, ``S = sum_i p_i (U^T B_i) A_i``, so P1
(``U S = U U^T W_bar``) holds to working precision, and the per-client coordinates
``C_i = T_i A_i`` of the general route (a pass over the A's that writes as much as it reads)
are never formed.

Accuracy: the implicit basis deviates from orthonormality by at most
:func:`~glora_math.tolerances.orthonormality_tol` where
:func:`~glora_math.tolerances.gram_basis_accurate` holds for every client (the kept part of
each B_i has condition number below about 23000 in float32). Where it does not (float64
inputs, very ill-conditioned float32 clients, all updates zero), or where a sketch is as wide
as the union of the client subspaces, :func:`implicit_state` returns ``None`` and the caller
takes the general route (explicit Householder bases, :func:`~glora_math.consensus.consensus`).

Cost: the float64 Gram matrices, O(d sum_i r_i^2); then the exact consensus, O(d (sum_i
rho_i)^2) like the general route, or ``2 q + 3`` products with the stacked B's, O(d (sum_i r_i)
(R + oversample)) each; one pass over the A's. Against the general route it saves the
Householder QR of every client and writing the coordinates ``C_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.consensus import exact_top, finish_basis
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


def map_blocks(D: Tensor, widths: Sequence[int], ranks: Sequence[int]) -> list[Tensor]:
    """Client i's block of the maps of :func:`gram_basis_maps`: ``r_i`` by ``rho_i``.

    ``widths`` are the clients' ranks r_i, ``ranks`` their numerical ranks rho_i; ``D`` is the
    stack ``(N, r, r)`` (kept directions first) or the dense block-diagonal matrix.
    """
    if D.ndim == 3:
        return [D[i, :, :rho] for i, rho in enumerate(ranks)]
    out, row, col = [], 0, 0
    for r, rho in zip(widths, ranks, strict=True):
        out.append(D[row : row + r, col : col + rho])
        row, col = row + r, col + rho
    return out


def implicit_bases(Bs: Sequence[Tensor], blocks: Sequence[Tensor]) -> Tensor:
    """``M = [sqrt(p_1) U_1, ..., sqrt(p_N) U_N]``: each ``B_i`` times its block, batched.

    ``Bs[i]`` is ``(..., d, r_i)``, ``blocks[i]`` ``(..., r_i, c_i)``; M is ``(..., d, sum_i c_i)``.
    One product per client, written into M's columns (no stacked copy); cost O(d sum_i r_i c_i).
    """
    B0 = Bs[0]
    M = B0.new_empty((*B0.shape[:-1], sum(int(b.shape[-1]) for b in blocks)))
    col = 0
    for B, blk in zip(Bs, blocks, strict=True):
        c = int(blk.shape[-1])
        if c:
            torch.matmul(B, blk, out=M[..., col : col + c])
        col += c
    return M


def implicit_state(
    factors: Sequence[LoRAFactors],
    info: ClientsInfo,
    p: Tensor,
    R: int,
    sketch: Sketch | None,
) -> tuple[Tensor, Tensor, Tensor, float] | None:
    """``(U, S, eigvals, gap)`` of the GLoRA state (qr gauge), or ``None`` (general route).

    ``factors`` are validated clients, ``p`` their normalised weights (``info.work_dtype``);
    ``sketch`` is ``None`` for the exact consensus. Warnings (rank clamped, zero eigengap)
    point at the caller of the caller.
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
    if m == 0:  # all updates zero: the general route warns and returns the empty state
        return None
    p_cols = torch.cat([p[i].expand(c.rank) for i, c in zip(live, cs, strict=True)])
    if sketch is None:
        Uall, eigvals = exact_top(implicit_bases(Bs, map_blocks(D, [c.rank for c in cs], ranks)), R)
        basis = finish_basis(Uall, eigvals, (d, m), R, stacklevel=4)
        U = basis.U
        # p_i (U^T B_i), one small product per client: R by sum r_i.
        coef = torch.cat([B.mT @ U for B in Bs]).mul_(p_cols[:, None]).mT
    else:
        width = R + sketch.oversample
        if width >= min(d, m):
            return None
        gen = torch.Generator().manual_seed(sketch.seed)
        Uall, s, BtU = randomized_left_svd_factored(
            torch.cat(Bs, dim=1), D, width, power_iters=sketch.power_iters, generator=gen, rank=m
        )
        basis = finish_basis(Uall, s.pow(2), (d, m), R, stacklevel=4)
        U = basis.U
        # U^T B_i = signs * (B_i^T Uall[:, :R])^T.
        Rk = int(U.shape[1])
        sg = column_signs(Uall[:, :Rk])
        coef = ((BtU[:, :Rk] * p_cols[:, None]) * sg).mT  # R by sum r_i
    S = U.new_zeros((int(U.shape[1]), info.k))
    col = 0
    for c in cs:  # one pass over the A's, without stacking them
        S.addmm_(coef[:, col : col + c.rank], c.A.to(wd))
        col += c.rank
    return U, S, basis.eigvals, basis.gap


__all__ = ["gram_basis_maps", "implicit_bases", "implicit_state", "map_blocks", "maps_from_gram"]
