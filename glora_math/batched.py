"""The stacked route of GLoRA: many same-shape modules in batched kernels (internal).

A model has many adapted modules of few distinct shapes (e.g. 32 layers x q, k, v, o of
4096 x 4096). Stacking modules of one shape along a leading batch dimension L turns the
per-module QR, SVD and products into batched torch kernels (CPU or GPU) instead of a Python loop
per module. :func:`glora_math.glora_aggregate` takes this route when its clients' factors carry
a batch dimension; layers the batched kernels cannot treat uniformly (a rank-deficient client
factor, or a server rank at or above the numerical rank) it redoes module by module, so the
result equals the per-module operator on every module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from glora_math.certificate import GramParts
from glora_math.implicit import (
    GramCache,
    diagonal_blocks,
    gram_consensus,
    implicit_bases,
    maps_from_gram,
    route_certificate,
)
from glora_math.linalg import (
    column_signs,
    full_rank_qr,
    gram_top_left_svd,
    randomized_left_svd,
    randomized_left_svd_factored,
)
from glora_math.tolerances import gram_route_possible, rank_tol
from glora_math.types import Sketch


def stacked_route(
    Bs: Sequence[Float[Tensor, "L d r"]],
    As: Sequence[Float[Tensor, "L r k"]],
    p: Tensor,
    *,
    R: int,
    sketch: Sketch | None,
    wd: torch.dtype,
    gram: bool = True,
    certify: bool = False,
    grams: GramCache | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, str, GramParts | None]:
    """The qr-gauge GLoRA route for L same-shape modules at once (validated inputs).

    ``Bs``, ``As``: per client, the stacked factors ``(L, d, r_i)`` and ``(L, r_i, k)`` in
    one orientation; ``p`` the normalised weights (working dtype). Returns ``(U, S, eig,
    uniform, m)``: bases ``(L, d, R)``, coordinates ``(L, R, k)``, consensus spectra ``(L,
    m')``, and which layers the batched kernels treated exactly as the per-module operator
    would; the caller redoes the others (a rank-deficient or ill-conditioned client factor, a
    server rank at or above the numerical rank) module by module. ``m`` is the stacked
    basis width (for the zero-gap rule); the last item names the route taken (``"gram"``:
    the batched Gram route of :mod:`glora_math.implicit`, tried when ``gram``; else
    ``"householder"``), and the last the Gram certificate's parts per module (P16) where the
    exact consensus came from the raw Gram matrices and ``certify`` is set, else ``None``
    (valid for the uniform layers only).
    """
    L, d = int(Bs[0].shape[0]), int(Bs[0].shape[1])
    device = Bs[0].device
    # Clients of rank 0 add nothing to K or S (their update is zero; the weights stay as given).
    live = [i for i, pi in enumerate(p.tolist()) if pi > 0 and int(Bs[i].shape[-1]) > 0]
    fast = None
    if gram:
        fast = _implicit_batched(Bs, As, p, live=live, R=R, sketch=sketch, wd=wd,
                                 certify=certify, grams=grams or GramCache())  # fmt: skip
    if fast is not None:
        U, S, eig, uniform, n, parts = fast
        return U, S, eig, uniform, n, "gram", parts
    if not live:  # every weighted client has rank 0: the per-module operator's empty states
        U0 = torch.zeros(L, d, R, dtype=wd, device=device)
        S0 = torch.zeros(L, R, int(As[0].shape[-1]), dtype=wd, device=device)
        eig0 = torch.zeros(L, 0, dtype=wd, device=device)
        redo = torch.zeros(L, dtype=torch.bool, device=device)
        return U0, S0, eig0, redo, 0, "householder", None
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
        # The Gram route where it is accurate; layers where it is not are redone by the caller.
        Uall, eig, ok = gram_top_left_svd(M, R)
        uniform &= ok
    else:
        gen = torch.Generator().manual_seed(sketch.seed)
        Uall, sv = randomized_left_svd(
            M, R + sketch.oversample, power_iters=sketch.power_iters, generator=gen
        )
        eig = sv.pow(2)
        # A layer whose stacked bases have numerical rank < R needs clamping: per module.
        if sv.shape[-1] < R:
            uniform[:] = False
        else:
            uniform &= sv[..., R - 1] > rank_tol(1.0, (d, m), wd) * sv[..., 0]
    Rb = min(R, Uall.shape[-1])
    U = torch.zeros(L, d, R, dtype=wd, device=device)
    U[..., :Rb] = Uall[..., :Rb] * column_signs(Uall[..., :Rb]).unsqueeze(-2)
    # S = sum_i p_i (U^T U_i) C_i = (U^T M) [sqrt(p_i) C_i]_i, with U_i = Q_i, C_i = T_i A_i.
    S = (U.mT @ M) @ torch.cat(Cs, dim=-2)
    return U, S, eig, uniform, m, "householder", None


def _implicit_batched(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    p: Tensor,
    *,
    live: Sequence[int],
    R: int,
    sketch: Sketch | None,
    wd: torch.dtype,
    certify: bool,
    grams: GramCache,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, GramParts | None] | None:
    """The route of :mod:`glora_math.implicit` (exact or randomized), batched over L modules.

    Returns ``(U, S, eig, uniform, m, parts)`` or ``None`` where that route does not apply (see
    :func:`~glora_math.implicit.implicit_state`). Layers where some client's B is
    rank-deficient or too ill-conditioned for its float64 Gram matrix
    (:func:`~glora_math.tolerances.gram_basis_accurate`), or where the consensus needs the
    accurate route (R near the numerical rank), are marked non-uniform and redone by the
    per-module operator.
    """
    if not gram_route_possible(wd) or not live:
        return None
    B0 = Bs[live[0]]
    L, d = int(B0.shape[0]), int(B0.shape[1])
    widths = [int(Bs[i].shape[-1]) for i in live]
    n = sum(widths)
    if any(r > d for r in widths):
        return None
    if sketch is not None and R + sketch.oversample >= min(d, n):
        return None
    if R > min(d, n):
        # Fewer weighted directions than R (a zero-weight client can raise R above them): the
        # Householder route pads the bases with zero columns and clamps the module.
        return None
    if sketch is None and d >= n:
        return _raw_gram_batched(Bs, As, p, live=live, R=R, wd=wd, certify=certify, grams=grams)
    uniform = torch.ones(L, dtype=torch.bool, device=B0.device)
    blocks = []
    for i in live:
        B64 = Bs[i].to(torch.float64)
        r = int(B64.shape[-1])
        maps, rho, accurate = maps_from_gram(B64.mT @ B64, d, p[i].to(torch.float64).sqrt(), wd)
        uniform &= (rho == r) & accurate
        blocks.append(maps.to(wd))
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
    return U, S, eig, uniform, n, None


def _raw_gram_batched(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    p: Tensor,
    *,
    live: Sequence[int],
    R: int,
    wd: torch.dtype,
    certify: bool,
    grams: GramCache,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, GramParts | None]:
    """The exact consensus of :func:`~glora_math.implicit.gram_consensus`, batched over L.

    One float64 Gram of the stacked B's per module (its diagonal blocks are the clients'
    Gram matrices), and with ``certify`` one of the stacked A's: P16's certificate.
    """
    B0 = Bs[live[0]]
    L, d = int(B0.shape[0]), int(B0.shape[1])
    widths = [int(Bs[i].shape[-1]) for i in live]
    Bw = [Bs[i].to(wd) for i in live]
    gam = grams.get("B", live, Bw)
    uniform = torch.ones(L, dtype=torch.bool, device=B0.device)
    maps = []
    for i, g in zip(live, diagonal_blocks(gam, widths), strict=True):
        mp, rho, accurate = maps_from_gram(g, d, p[i].to(torch.float64).sqrt(), wd)
        uniform &= (rho == int(g.shape[-1])) & accurate
        maps.append(mp)
    U, lam, ok = gram_consensus(Bw, maps, gam, R, wd)
    uniform &= ok
    U = U[..., :R] * column_signs(U[..., :R]).unsqueeze(-2)
    p_cols = torch.cat([p[i].expand(r) for i, r in zip(live, widths, strict=True)])
    coef = (torch.cat([B.mT @ U for B in Bw], dim=-2) * p_cols[:, None]).mT  # (L, R, n)
    Aw = [As[i].to(wd) for i in live]
    S = coef @ torch.cat(Aw, dim=-2)
    parts = route_certificate(gam, grams, live, Bw, Aw, p_cols, U) if certify else None
    return U, S, lam, uniform, sum(widths), parts


__all__ = ["stacked_route"]
