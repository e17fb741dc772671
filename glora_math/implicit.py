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

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.certificate import GramParts, gram_parts, stored_basis_products
from glora_math.consensus import exact_top, finish_basis
from glora_math.linalg import (
    column_signs,
    gram_lower,
    randomized_left_svd_factored,
    tall_left_svd,
)
from glora_math.tolerances import (
    eigenvalue_error,
    gram_basis_accurate,
    gram_route_possible,
    rank_tol,
)
from glora_math.types import LoRAFactors, Sketch
from glora_math.validation import ClientsInfo, as_factors


def maps_from_gram(
    G: Tensor, d: int, sqrt_p: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """From float64 Gram matrices ``B^T B`` (..., r, r) of d-row B's: the maps, ranks, accuracy.

    Returns ``sqrt_p V S^{-1}`` (..., r, r) in float64, with zero columns for the directions
    the rank rule of :func:`~glora_math.linalg.numerical_rank` does not keep; the numerical
    ranks (...); and whether :func:`~glora_math.tolerances.gram_basis_accurate` holds in
    ``dtype`` for the kept part (...). ``sqrt_p`` broadcasts against the leading dimensions.
    Batched, so one eigensolver call serves many clients (or many modules of one client).
    """
    r = int(G.shape[-1])
    lam, V = torch.linalg.eigh(G)  # ascending
    s = lam.flip(-1).clamp_min(0.0).sqrt()  # descending singular values of each B
    keep = s > rank_tol(1.0, (d, r), dtype) * s[..., :1]
    rho = keep.sum(-1)
    kept = s.gather(-1, (rho - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kappa = torch.where(rho > 0, s[..., 0] / torch.where(rho > 0, kept, 1.0), 1.0)
    inv = torch.where(keep, sqrt_p.unsqueeze(-1) / torch.where(keep, s, 1.0), 0.0)
    return V.flip(-1) * inv.unsqueeze(-2), rho, gram_basis_accurate(kappa, dtype)


def client_maps(
    grams: Sequence[Tensor], d: int, p: Sequence[float], dtype: torch.dtype
) -> tuple[list[Tensor], list[int]] | None:
    """Per client, from its float64 Gram ``B_i^T B_i``: the map ``sqrt(p_i) V_i S_i^{-1}``.

    Returns the maps (float64, ``r_i`` by ``r_i``, zero columns for dropped directions) and the
    numerical ranks, or ``None`` where some client fails
    :func:`~glora_math.tolerances.gram_basis_accurate` in ``dtype``. Clients of one rank
    share one batched eigensolver call.
    """
    by_rank: dict[int, list[int]] = {}
    for i, G in enumerate(grams):
        by_rank.setdefault(int(G.shape[-1]), []).append(i)
    maps: list[Tensor] = [grams[0]] * len(grams)
    ranks = [0] * len(grams)
    for idx in by_rank.values():
        pi = torch.tensor([p[i] for i in idx], dtype=torch.float64, device=grams[0].device)
        got, rho, accurate = maps_from_gram(torch.stack([grams[i] for i in idx]), d, pi.sqrt(),
                                            dtype)  # fmt: skip
        if not bool(accurate.all()):
            return None
        for j, i in enumerate(idx):
            maps[i], ranks[i] = got[j], int(rho[j])
    return maps, ranks


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
    grams = [B64.mT @ B64 for B64 in (B.to(torch.float64) for B in Bs)]
    got = client_maps(grams, d, p, dtype)
    if got is None:
        return None
    maps, ranks = got
    if len({int(B.shape[1]) for B in Bs}) == 1:
        return torch.stack(maps).to(dtype), ranks
    return block_diagonal(
        [mp[:, :rho].to(dtype) for mp, rho in zip(maps, ranks, strict=True)]
    ), ranks


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


class GramCache:
    """Raw float64 Gram matrices of the clients' factors, shared by the two sides of one call.

    The left side's consensus needs ``B^T B`` and its certificate ``A A^T``; the right side's
    (the transpose problem) the same two matrices the other way round. ``side="auto"`` computes
    each once. Keys are ``"B"`` and ``"A"`` in the left orientation with the live clients they
    cover; :meth:`flipped` is the view of the right side (the same store).
    """

    def __init__(self, store: dict[str, tuple[tuple[int, ...], Tensor]] | None = None,
                 *, flip: bool = False) -> None:  # fmt: skip
        self._store = {} if store is None else store
        self._flip = flip

    def flipped(self) -> GramCache:
        """The same matrices, seen from the transpose problem."""
        return GramCache(self._store, flip=not self._flip)

    def get(self, which: str, live: Sequence[int], Xs: Sequence[Tensor]) -> Tensor:
        """``raw_gram(Xs)`` for factor ``which`` ("B" or "A", this view's orientation)."""
        key = {"B": "A", "A": "B"}[which] if self._flip else which
        found = self._store.get(key)
        if found is not None and found[0] == tuple(live):
            return found[1]
        gam = raw_gram(Xs)
        self._store[key] = (tuple(live), gam)
        return gam


def raw_gram(Xs: Sequence[Tensor]) -> Tensor:
    """``X^T X`` for ``X = [X_1, ..., X_N]`` (each ``(..., n, r_i)``), in float64, symmetric.

    Float32 and half entries multiply exactly in float64; only the sums round. Cost n m^2 for
    m = sum_i r_i (the lower triangle, :func:`~glora_math.linalg.gram_lower`, mirrored). A
    stack is done a few modules at a time, so the float64 copy of the factors stays below
    :data:`RAW_GRAM_CHUNK_BYTES`.
    """
    x0 = Xs[0]
    batch = tuple(x0.shape[:-2])
    n, m = int(x0.shape[-2]), sum(int(x.shape[-1]) for x in Xs)
    count = math.prod(batch)
    step = max(1, RAW_GRAM_CHUNK_BYTES // max(1, 8 * n * m))
    if count <= step:
        return _raw_gram(Xs)
    flat = [x.reshape(count, n, int(x.shape[-1])) for x in Xs]
    out = torch.empty((count, m, m), dtype=torch.float64, device=x0.device)
    for i in range(0, count, step):
        out[i : i + step] = _raw_gram([x[i : i + step] for x in flat])
    return out.reshape(*batch, m, m)


#: The largest float64 copy of a stack's factors :func:`raw_gram` makes at once (256 MiB).
RAW_GRAM_CHUNK_BYTES = 256 * 2**20


def _raw_gram(Xs: Sequence[Tensor]) -> Tensor:
    X = torch.cat([x.to(torch.float64) for x in Xs], dim=-1)
    G = gram_lower(X)
    return G.tril() + G.tril(-1).mT


def sandwich(G: Tensor, left: Sequence[Tensor], right: Sequence[Tensor]) -> Tensor:
    """``L^T G R`` for block-diagonal ``L = diag(left_i)`` and ``R = diag(right_i)``, batched.

    ``left_i`` is ``(..., r_i, c_i)``, ``right_i`` ``(..., r_i, e_i)`` and ``G`` ``(..., m, m)``
    with m = sum_i r_i: block (i, j) of the result is ``left_i^T G_ij right_j``. Cost
    O(m^2 max(c, e)) when all blocks share one shape (two batched products over the blocks),
    else two dense products.
    """
    shapes = {tuple(x.shape[-2:]) for x in left}
    rshapes = {tuple(x.shape[-2:]) for x in right}
    if len(shapes) == 1 and len(rshapes) == 1:
        (r, c), (_, e) = next(iter(shapes)), next(iter(rshapes))
        n = len(left)
        batch = tuple(G.shape[:-2])
        G4 = G.reshape(*batch, n, r, n, r)
        Ls, Rs = torch.stack(list(left), dim=-3), torch.stack(list(right), dim=-3)
        T = torch.einsum("...iac,...iajb->...icjb", Ls, G4)
        return torch.einsum("...icjb,...jbe->...icje", T, Rs).reshape(*batch, n * c, n * e)
    return block_diagonal(left).mT @ G @ block_diagonal(right)


def block_diagonal(blocks: Sequence[Tensor]) -> Tensor:
    """``diag(blocks_i)``, batched over shared leading dimensions."""
    b0 = blocks[0]
    rows = sum(int(b.shape[-2]) for b in blocks)
    cols = sum(int(b.shape[-1]) for b in blocks)
    out = b0.new_zeros((*b0.shape[:-2], rows, cols))
    r = c = 0
    for b in blocks:
        out[..., r : r + b.shape[-2], c : c + b.shape[-1]] = b
        r, c = r + int(b.shape[-2]), c + int(b.shape[-1])
    return out


def gram_consensus(
    Bs: Sequence[Tensor], maps: Sequence[Tensor], gam: Tensor, R: int, wd: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """The exact consensus from the raw float64 Gram ``gam`` of the B's, batched.

    ``G = D^T gam D`` (D = diag of the float64 ``maps``) is the Gram matrix of the stacked
    bases ``M = [B_i] D``, formed without M and accurate to float64 rounding (the route
    through M rounds M to ``wd`` first); its eigenvectors ``V`` (eigensolver in ``wd``, as on
    the route through M) give the top-R basis ``U = orthonormalised(B Y)``, ``Y = D V_R
    Lambda_R^{-1/2}``: one thin QR of a d-by-R matrix whose columns are orthonormal up to
    rounding already, so its leading columns span the leading eigenvectors (nested). Returns
    ``(U, lam, ok)``: ``lam`` descending, and ``ok`` where ``lambda_R`` lies above ``wd``'s
    eigenvalue rounding level (as on the route through M,
    :func:`~glora_math.linalg.gram_top_left_svd`); where it does not, U is meaningless and
    callers take the accurate route. Cost: ``gam`` (by the caller, d m^2),
    ``O(m^2 r)`` for G, one m-by-m eigensolver, ``O(d m R)`` for U.
    """
    G = sandwich(gam, maps, maps)
    lam, V = torch.linalg.eigh(G.to(wd))
    lam, V = lam.flip(-1), V.flip(-1)
    m = int(G.shape[-1])
    d = int(Bs[0].shape[-2])
    Rb = min(R, m)
    scale = lam[..., :Rb].clamp_min(torch.finfo(wd).tiny).rsqrt()
    Y = block_times(maps, V[..., :Rb].to(torch.float64)) * scale.to(torch.float64).unsqueeze(-2)
    U = torch.linalg.qr(torch.cat(list(Bs), dim=-1) @ Y.to(wd)).Q
    noise = eigenvalue_error(lam[..., 0], d + m, wd)
    ok = lam[..., Rb - 1] > noise if R <= m else torch.zeros_like(noise, dtype=torch.bool)
    return U, lam, ok


def block_times(blocks: Sequence[Tensor], X: Tensor) -> Tensor:
    """``diag(blocks_i) @ X``, batched: block i (``r_i`` by ``c_i``) times rows of X.

    One batched product when all blocks share one shape, else a dense product.
    """
    shapes = {tuple(b.shape[-2:]) for b in blocks}
    if len(shapes) == 1:
        r, c = next(iter(shapes))
        n = len(blocks)
        X3 = X.reshape(*X.shape[:-2], n, c, int(X.shape[-1]))
        out = torch.stack(list(blocks), dim=-3) @ X3
        return out.reshape(*X.shape[:-2], n * r, int(X.shape[-1]))
    return block_diagonal(blocks) @ X


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
    *,
    certify: bool = False,
    grams: GramCache | None = None,
) -> tuple[Tensor, Tensor, Tensor, float, GramParts | None] | None:
    """``(U, S, eigvals, gap, parts)`` of the GLoRA state (qr gauge), or ``None`` (general route).

    ``factors`` are validated clients, ``p`` their normalised weights (``info.work_dtype``);
    ``sketch`` is ``None`` for the exact consensus. ``parts`` is the certificate from the
    route's Gram matrices (:func:`~glora_math.certificate.gram_parts`, P16) where ``certify``
    is set and the exact consensus came from the raw Gram matrix (d at least the clients'
    total rank), else ``None``. ``grams`` shares the raw Gram matrices with the other side's
    call. Warnings (rank clamped, zero eigengap) point at the caller of
    the caller.
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
    d, widths = info.d, [c.rank for c in cs]
    p_cols = torch.cat([p[i].expand(c.rank) for i, c in zip(live, cs, strict=True)])
    if sketch is None and d >= sum(widths):
        return _raw_gram_state(cs, live, Bs, [pl[i] for i in live], p_cols, R, info,
                               certify=certify, grams=grams or GramCache())  # fmt: skip
    found = gram_basis_maps(Bs, [pl[i] for i in live], wd)
    D, ranks = found if found is not None else (Bs[0], [0])
    m = sum(ranks)
    if m == 0:  # not accurate, or all updates zero (the general route warns, returns empty)
        return None
    if sketch is None:
        Uall, eigvals = exact_top(implicit_bases(Bs, map_blocks(D, widths, ranks)), R)
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
    return U, _coordinates(coef, cs, U, info.k, wd), basis.eigvals, basis.gap, None


def _raw_gram_state(  # noqa: PLR0917 - the prelude's results, handed on once
    cs: Sequence[LoRAFactors],
    live: Sequence[int],
    Bs: Sequence[Tensor],
    pl: Sequence[float],
    p_cols: Tensor,
    R: int,
    info: ClientsInfo,
    *,
    certify: bool,
    grams: GramCache,
) -> tuple[Tensor, Tensor, Tensor, float, GramParts | None] | None:
    """The exact consensus from the raw float64 Gram of the B's (d at least sum r_i)."""
    wd, d = info.work_dtype, info.d
    widths = [c.rank for c in cs]
    gam = grams.get("B", live, Bs)
    got = client_maps(diagonal_blocks(gam, widths), d, pl, wd)
    if got is None:
        return None
    maps, ranks = got
    m = sum(ranks)
    if m == 0:  # all updates zero: the general route warns and returns the empty state
        return None
    Q, lam, ok = gram_consensus(Bs, maps, gam, R, wd)
    if bool(ok):
        lam_kept = lam[:m]
    else:  # R near the numerical rank: the clamp decision needs the accurate route
        Q, s = tall_left_svd(
            implicit_bases(Bs, [mp[:, :r].to(wd) for mp, r in zip(maps, ranks, strict=True)])
        )
        lam_kept = s.pow(2)
    basis = finish_basis(Q, lam_kept, (d, m), R, stacklevel=5)
    U = basis.U
    coef = torch.cat([B.mT @ U for B in Bs]).mul_(p_cols[:, None]).mT
    S = _coordinates(coef, cs, U, info.k, wd)
    parts = None
    if certify and bool(ok):
        parts = route_certificate(gam, grams, live, Bs, [c.A.to(wd) for c in cs], p_cols, U)
    return U, S, basis.eigvals, basis.gap, parts


def route_certificate(  # noqa: PLR0917 - the route's matrices, handed on once
    gam: Tensor,
    grams: GramCache,
    live: Sequence[int],
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    p_cols: Tensor,
    U: Tensor,
) -> GramParts:
    """P16's parts for the stored basis ``U`` of the raw-Gram route (one module or a stack).

    ``gam`` is the raw Gram of the B's, ``As`` the live clients' A's (shape ``(..., r_i,
    k)``), ``p_cols`` each column's weight; the A side's raw Gram comes through ``grams``
    (the other side's consensus Gram under ``side="auto"``).
    """
    n = int(Bs[0].shape[-2]) + int(As[0].shape[-1]) + sum(int(B.shape[-1]) for B in Bs)
    XtB, XtX = stored_basis_products(U, Bs)
    gam_a = grams.get("A", live, [A.mT for A in As])
    return gram_parts(gam, gam_a, p_cols.to(torch.float64), XtB, XtX, n)


def _coordinates(
    coef: Tensor, cs: Sequence[LoRAFactors], U: Tensor, k: int, wd: torch.dtype
) -> Tensor:
    """``S = sum_i coef_i A_i``: one pass over the A's, without stacking them."""
    S = U.new_zeros((int(U.shape[1]), k))
    col = 0
    for c in cs:
        S.addmm_(coef[:, col : col + c.rank], c.A.to(wd))
        col += c.rank
    return S


def diagonal_blocks(gam: Tensor, widths: Sequence[int]) -> list[Tensor]:
    """The diagonal blocks of ``gam`` for blocks of the given widths (views)."""
    out, col = [], 0
    for w in widths:
        out.append(gam[..., col : col + w, col : col + w])
        col += w
    return out


__all__ = [
    "GramCache",
    "block_diagonal",
    "block_times",
    "client_maps",
    "diagonal_blocks",
    "gram_basis_maps",
    "gram_consensus",
    "implicit_bases",
    "implicit_state",
    "map_blocks",
    "maps_from_gram",
    "raw_gram",
    "route_certificate",
    "sandwich",
]
