"""Small, canonical linear-algebra kernels (pure functions of torch tensors).

Every decomposition here is sign-fixed so that its output is unique wherever the mathematics
allows it (pymanopt's ``multiqr`` convention for QR, scikit-learn's ``svd_flip`` convention for
the SVD). Nothing here forms a d-by-k matrix, nor a d-by-d one unless it is smaller than the
input (:func:`gram_top_left_svd` of a wide matrix).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from glora_math.tolerances import eigenvalue_error, rank_tol


def sign_fixed_qr(X: Float[Tensor, "m n"]) -> tuple[Float[Tensor, "m p"], Float[Tensor, "p n"]]:
    """Thin Householder QR ``X = Q T`` with ``diag(T) >= 0`` (p = min(m, n)).

    For X of full column rank the result is unique. Zero diagonal entries keep sign +1.
    """
    Q, T = torch.linalg.qr(X, mode="reduced")
    d = torch.diagonal(T, dim1=-2, dim2=-1)
    s = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return Q * s.unsqueeze(-2), T * s.unsqueeze(-1)


def column_signs(U: Float[Tensor, "... m p"]) -> Float[Tensor, "... p"]:
    """Signs that make the entry of largest magnitude of each column of ``U`` positive, batched.

    This is scikit-learn's ``svd_flip`` rule; a zero column gets sign +1.
    """
    if U.shape[-1] == 0 or U.shape[-2] == 0:
        return torch.ones((*U.shape[:-2], U.shape[-1]), dtype=U.dtype, device=U.device)
    idx = torch.argmax(U.abs(), dim=-2, keepdim=True)
    picked = torch.gather(U, -2, idx).squeeze(-2)
    return torch.where(picked < 0, -torch.ones_like(picked), torch.ones_like(picked))


def sign_fixed_svd(
    X: Float[Tensor, "m n"],
) -> tuple[Float[Tensor, "m p"], Float[Tensor, " p"], Float[Tensor, "p n"]]:
    """Thin SVD ``X = U diag(s) Vh`` with descending ``s`` and canonical column signs of ``U``.

    Unique when the singular values are distinct and non-zero.
    """
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    sg = column_signs(U)
    return U * sg.unsqueeze(-2), s, Vh * sg.unsqueeze(-1)


def condition_number(x: Tensor) -> float:
    """2-norm condition number of ``x`` on its numerical range (1.0 for a zero matrix).

    Singular values below :func:`~glora_math.tolerances.rank_tol` (float64) are not counted.
    """
    s = torch.linalg.svdvals(x.detach().to(torch.float64))
    if not s.numel() or float(s[0]) == 0.0:
        return 1.0
    kept = s[s > rank_tol(float(s[0]), (int(x.shape[-2]), int(x.shape[-1])), torch.float64)]
    return float(kept[0] / kept[-1])


def numerical_rank(s: Float[Tensor, " p"], shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Number of singular values ``s`` (descending) above :func:`rank_tol`."""
    if s.numel() == 0:
        return 0
    smax = float(s[0])
    if smax == 0.0:
        return 0
    return int((s > rank_tol(smax, shape, dtype)).sum())


def full_column_rank(
    s: Float[Tensor, "... p"], shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """Batched: whether descending singular values ``s`` of ``shape`` matrices have rank ``p``.

    The rule of :func:`numerical_rank` (every value above :func:`rank_tol`), vectorised over the
    leading dimensions; an all-zero matrix is rank-deficient.
    """
    return s[..., -1] > rank_tol(1.0, shape, dtype) * s[..., 0]


def full_rank_qr(
    X: Float[Tensor, "... m n"],
) -> tuple[Float[Tensor, "... m p"], Float[Tensor, "... p n"], Tensor]:
    """Batched :func:`sign_fixed_qr` and whether each ``X`` has full numerical column rank.

    The rank rule is :func:`full_column_rank` on the singular values of ``T``; a wide ``X``
    (n > m) never has full column rank.
    """
    Q, T = sign_fixed_qr(X)
    m, n = int(X.shape[-2]), int(X.shape[-1])
    if n > m:
        return Q, T, torch.zeros(X.shape[:-2], dtype=torch.bool, device=X.device)
    return Q, T, full_column_rank(torch.linalg.svdvals(T), (m, n), X.dtype)


def principal_angles(U1: Float[Tensor, "d p"], U2: Float[Tensor, "d q"]) -> Float[Tensor, " m"]:
    """Principal angles (radians, ascending) between the spans of two orthonormal bases.

    m = min(p, q). Small angles come from the sines (singular values of ``U2 - U1 (U1^T U2)``),
    large ones from the cosines (singular values of ``U1^T U2``), as in Knyazev and Argentati
    (SIAM J. Sci. Comput. 2002), so angles near 0 are accurate to working precision.
    """
    if U1.shape[1] < U2.shape[1]:
        U1, U2 = U2, U1
    if U2.shape[1] == 0:
        return torch.zeros(0, dtype=U1.dtype, device=U1.device)
    cross = U1.mT @ U2
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(U2 - U1 @ cross).clamp(0.0, 1.0).flip(0)  # ascending
    from_cos = torch.arccos(cos)
    from_sin = torch.arcsin(sin)
    return torch.where(sin < 0.5**0.5, from_sin, from_cos)


def projector_distance(U1: Float[Tensor, "d p"], U2: Float[Tensor, "d q"]) -> float:
    """``||U1 U1^T - U2 U2^T||_F`` without forming a d-by-d matrix.

    ``P1 - P2 = P1 (I - P2) - (I - P1) P2`` with orthogonal ranges, hence
    ``||P1 - P2||_F^2 = ||(I - P2) U1||_F^2 + ||(I - P1) U2||_F^2``; cost O(d p q), and no
    cancellation, so distances near 0 are accurate to working precision.
    """
    r1 = U1 - U2 @ (U2.mT @ U1)
    r2 = U2 - U1 @ (U1.mT @ U2)
    total = torch.linalg.matrix_norm(r1).pow(2) + torch.linalg.matrix_norm(r2).pow(2)
    return float(total.sqrt())


def scaled_fro_norm(x: Tensor) -> Tensor:
    """Frobenius norms over the last two dimensions, scaled by a power of 2 first.

    ``torch.linalg.matrix_norm`` squares the entries unscaled, so in float32 it overflows once
    an entry passes about 1.8e19, far below the norms float32 can hold (3.4e38), and the
    squares of entries below about 1e-19 underflow to 0. Dividing by ``2^(e-1)``, the power
    of 2 at or below the largest entry (finite even for the dtype's largest value), is exact:
    where the squares neither overflow nor underflow, the result is the same to the last bit.
    A non-finite entry gives a non-finite norm.
    """
    top = x.abs().amax(dim=(-2, -1)) if x.numel() else x.new_zeros(x.shape[:-2])
    e = torch.frexp(top).exponent  # top in [2^(e-1), 2^e); 0 for 0, inf and NaN
    scale = torch.ldexp(torch.ones_like(top), e - 1)
    norms: Tensor = torch.linalg.matrix_norm(x / scale[..., None, None]) * scale
    return norms


def lowrank_fro_norm(B: Float[Tensor, "d r"], A: Float[Tensor, "r k"]) -> float:
    """``||B @ A||_F`` without forming the product: ``||T A||_F`` where ``B = Q T``.

    Costs O(d r^2 + r^2 k). Accurate to working precision relative to ``||B|| ||A||`` (no
    cancellation of squared norms), so it can measure differences ~1e-16 in float64.
    """
    if B.shape[1] == 0:
        return 0.0
    if B.shape[0] <= B.shape[1]:
        return float(scaled_fro_norm(B @ A))
    _, T = torch.linalg.qr(B, mode="reduced")
    return float(scaled_fro_norm(T @ A))


SvdRoute = Literal["factors", "dense"]


def svd_costs(d: int, k: int, m: int) -> dict[SvdRoute, float]:
    """Predicted flops of the two exact routes to the thin SVD of ``B A`` (B d-by-m, A m-by-k).

    ``"factors"``: thin QR of B and of A^T and the two basis products (about
    ``4 (d + k) m^2``), the SVD of the m-by-m core (about ``12 m^3``). ``"dense"``: the d-by-k
    product (``2 d k m``) and its thin SVD (about ``4 max(d, k) min(d, k)^2 + 8 min(d, k)^3``,
    divide and conquer with both bases). The factor route needs ``m < d``. These are the
    standard operation counts; ``python -m bench.svd_route`` measures the crossover against
    them (docs/benchmarks.md).
    """
    lo, hi = min(d, k), max(d, k)
    dense = 2.0 * d * k * m + 4.0 * hi * lo * lo + 8.0 * lo**3
    factors = 4.0 * (d + k) * m * m + 12.0 * m**3 if m < d else math.inf
    return {"factors": factors, "dense": dense}


def svd_route(d: int, k: int, m: int) -> SvdRoute:
    """The route :func:`svd_costs` predicts is cheaper (ties go to the factors)."""
    cost = svd_costs(d, k, m)
    return "factors" if cost["factors"] <= cost["dense"] else "dense"


def lowrank_svd(
    B: Float[Tensor, "d m"], A: Float[Tensor, "m k"], *, route: SvdRoute | None = None
) -> tuple[Float[Tensor, "d p"], Float[Tensor, " p"], Float[Tensor, "p k"]]:
    """Thin, sign-fixed SVD of ``B @ A`` (p = min(d, m, k)), by the cheaper exact route.

    ``route=None`` lets :func:`svd_route` choose by the cost model. ``"factors"``: ``B = Q T``
    (thin QR), and for a wide ``A`` also ``A^T = P L`` (thin QR), so the core
    ``T A = T L^T P^T`` has a small m-by-m SVD ``T L^T = W diag(s) Zh``; then
    ``B A = (Q W) diag(s) (Zh P^T)``: O((d + k) m^2 + m^3), nothing d-by-k is formed.
    ``"dense"``: the SVD of the d-by-k product, O(d k min(d, k)); cheaper only when the
    stacked rank m is close to min(d, k) (and the only route when ``m >= d``).
    """
    d, m = int(B.shape[-2]), int(B.shape[-1])
    chosen = route or svd_route(d, int(A.shape[-1]), m)
    if chosen == "dense" or d <= m:
        # The product has rank at most m: keep p = min(d, m, k) triplets, as the factor route.
        p = min(d, m, int(A.shape[-1]))
        U, s, Vh = sign_fixed_svd(B @ A)
        return U[..., :p], s[..., :p], Vh[..., :p, :]
    Q, T = torch.linalg.qr(B, mode="reduced")
    if A.shape[1] > A.shape[0]:
        P, L = torch.linalg.qr(A.mT, mode="reduced")
        W, s, Zh = torch.linalg.svd(T @ L.mT, full_matrices=False)
        Vh = Zh @ P.mT
    else:
        W, s, Vh = torch.linalg.svd(T @ A, full_matrices=False)
    U = Q @ W
    sg = column_signs(U)
    return U * sg, s, Vh * sg.unsqueeze(-1)


def tall_left_svd(
    M: Float[Tensor, "... d m"],
) -> tuple[Float[Tensor, "... d p"], Float[Tensor, "... p"]]:
    """Left singular vectors and singular values of ``M`` (p = min(d, m)), batched.

    For a tall ``M`` (d >= m) this is the thin QR ``M = Q T`` followed by the SVD of the small
    triangular ``T``: cost O(d m^2), against O(d m min(d, m)) with a larger constant for a
    direct SVD. Signs are not fixed here (callers fix the columns they keep).
    """
    if M.shape[-2] >= M.shape[-1]:
        Q, T = sign_fixed_qr(M)
        W, s, _ = torch.linalg.svd(T, full_matrices=False)
        return Q @ W, s
    U, s, _ = torch.linalg.svd(M, full_matrices=False)
    return U, s


def gram_top_left_svd(
    M: Float[Tensor, "... d m"], rank: int
) -> tuple[Float[Tensor, "... d R"], Float[Tensor, "... p"], Tensor]:
    """Top-``rank`` left singular vectors of ``M`` through its smaller Gram matrix, batched.

    Tall ``M`` (d >= m): the symmetric eigendecomposition ``M^T M = V diag(lam) V^T`` gives the
    squared singular values ``lam`` (the eigenvalues of ``M M^T``) and the right singular
    vectors; ``M V_R`` spans the top-R left singular subspace, and one Rayleigh-Ritz step (thin
    QR of ``M V_R``, SVD of the small R-by-m ``Q^T M``) turns it into singular vectors
    orthonormal to working precision. Wide ``M`` (d < m): the eigenvectors of the d-by-d
    ``M M^T``, which is then smaller than ``M`` itself, are the left singular vectors. Cost:
    one matrix product of d m p flops, a p-by-p symmetric eigensolver and O(d m R), with
    p = min(d, m), against a Householder QR or an SVD of ``M`` for :func:`tall_left_svd`.

    Forming the Gram matrix squares the singular values: the computed ``lam`` carry absolute
    errors up to :func:`~glora_math.tolerances.eigenvalue_error` of ``lam_1``, so small
    singular values lose half their digits. ``ok`` is true where ``lam_R`` lies above that
    level; there the top-R subspace is as accurate as from :func:`tall_left_svd` (Davis-Kahan:
    both move by at most about ``eps lam_1 / gap``) and nothing needs clamping. Where ``ok`` is
    false (R at or above the numerical rank, or ``rank > p``), callers use
    :func:`tall_left_svd`.

    Returns
    -------
    U, lam, ok
        ``U`` of shape ``(..., d, R)`` (signs not fixed; R = min(rank, p)), ``lam`` of shape
        ``(..., p)`` descending and non-negative, and ``ok`` of shape ``(...)`` (bool).
    """
    d, m = M.shape[-2], M.shape[-1]
    p = min(d, m)
    R = min(rank, p)
    lam, V = torch.linalg.eigh(gram_lower(M if d >= m else M.mT))  # ascending
    lam = lam.flip(-1).clamp_min(0.0)
    top = V[..., p - R :].flip(-1)
    if d >= m:
        Q, _ = torch.linalg.qr(M @ top, mode="reduced")
        W, _, _ = torch.linalg.svd(Q.mT @ M, full_matrices=False)
        top = Q @ W
    noise = eigenvalue_error(lam[..., :1], d + m, M.dtype).squeeze(-1)
    ok = lam[..., R - 1] > noise
    if rank > p:
        ok = torch.zeros_like(ok)
    return top, lam, ok


def gram_lower(X: Float[Tensor, "... n m"]) -> Float[Tensor, "... m m"]:
    """``X^T X`` on and below the diagonal, batched; above it, ``X^T X`` or zero.

    The lower triangle is what a symmetric eigensolver reads (``torch.linalg.eigh`` with its
    default ``UPLO="L"``). It is computed as products of column blocks of X with everything to
    their right, so that about half of the off-diagonal blocks are skipped: a symmetric rank-k
    update in matrix-product kernels. The diagonal blocks are computed whole; the blocks above
    them are left at zero. Blocks of at least 128 columns, at most 8 of them; one block (the
    full product) below 256 columns.
    """
    m = int(X.shape[-1])
    b = m if m < 256 else max(128, -(-m // 8))
    G = X.new_zeros((*X.shape[:-2], m, m))
    for i in range(0, m, b):
        torch.matmul(X[..., :, i:].mT, X[..., :, i : i + b], out=G[..., i:, i : i + b])
    return G


def randomized_left_svd(
    M: Float[Tensor, "... d m"],
    width: int,
    *,
    power_iters: int,
    generator: torch.Generator,
) -> tuple[Float[Tensor, "... d l"], Float[Tensor, "... l"]]:
    """Approximate top-``width`` left singular pairs of ``M`` by randomized subspace iteration.

    Halko, Martinsson and Tropp (arXiv 0909.4061), Algorithms 4.4 and 5.1, applied to
    ``K = M M^T`` without forming it: ``Y = M (M^T Omega)`` for a Gaussian ``Omega`` of shape
    (d, l), then ``power_iters`` re-orthonormalised passes ``Y = M (M^T Q)``, then Rayleigh-Ritz
    (the SVD of the small ``Q^T M``). Because the sketch enters through ``K`` only, the result
    is the same for ``M`` and ``M O`` with O orthogonal (e.g. another gauge of the clients'
    bases) given the same generator state. Cost O(d m l (2 q + 3)) instead of O(d m^2); the
    error of the top-R subspace decays like ``(sigma_{l+1} / sigma_R)^(4 q + 2)``. The values
    returned are Ritz values, lower bounds of the true singular values. ``width`` at least
    ``min(d, m)`` falls back to :func:`tall_left_svd`.
    """
    d, m = M.shape[-2], M.shape[-1]
    if width >= min(d, m):
        return tall_left_svd(M)
    omega = gaussian_sketch(d, width, generator=generator, like=M)
    Q, _ = torch.linalg.qr(M @ (M.mT @ omega), mode="reduced")
    for _ in range(power_iters):
        Q, _ = torch.linalg.qr(M @ (M.mT @ Q), mode="reduced")
    W, s, _ = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    return Q @ W, s


def gaussian_sketch(
    d: int, width: int, *, generator: torch.Generator, like: Tensor
) -> Float[Tensor, "d l"]:
    """The Gaussian test matrix (d by ``width``) of the randomized routes.

    Drawn on the CPU (the same numbers on every device for a given generator state) in
    ``like``'s dtype, then moved to its device.
    """
    return torch.randn((d, width), generator=generator, dtype=like.dtype, device="cpu").to(
        like.device
    )


def randomized_left_svd_factored(
    B: Float[Tensor, "d n"],
    D: Tensor,
    width: int,
    *,
    power_iters: int,
    generator: torch.Generator,
    rank: int | None = None,
) -> tuple[Float[Tensor, "d l"], Float[Tensor, " l"], Float[Tensor, "n l"]]:
    """:func:`randomized_left_svd` of ``M = B D`` without forming ``M``; also ``B^T U``.

    The same algorithm, the same test matrix for the same generator state, with every product
    taken through the factors: ``M^T X = D^T (B^T X)`` and ``M Z = B (D Z)``. This pays off
    when ``B`` is stored (the clients' raw factors) and ``D`` is small (the block-diagonal
    maps that turn them into orthonormal bases): the d-by-m ``M`` is never written. For a
    matrix ``B``, ``D`` is a matrix (n by m) or a stack of N diagonal blocks ``(N, n / N, c)``,
    applied block by block (then m = N c); a batch of L matrices ``B`` (L, d, n) takes a batch
    of matrices ``D`` (L, n, m), with one test matrix shared by the batch. The last product
    ``B^T Q`` serves both the Rayleigh-Ritz step and the returned ``B^T U``. ``rank`` is the
    rank of ``M`` when known to be below m (zero columns); ``width`` must be below
    ``min(d, rank)``.

    Returns
    -------
    U, s, BtU
        Approximate left singular vectors of ``M`` (d by ``width``), its Ritz values
        (descending) and ``B^T U`` (n by ``width``).
    """
    d = int(B.shape[-2])
    if D.ndim == 3 and B.ndim == 2:
        N, c = int(D.shape[0]), int(D.shape[2])
        cols = m = N * c

        def d_times(Z: Tensor) -> Tensor:
            return (D @ Z.reshape(N, c, -1)).reshape(-1, Z.shape[-1])

        def dt_times(X: Tensor) -> Tensor:
            return (D.mT @ X.reshape(N, -1, X.shape[-1])).reshape(cols, -1)
    else:
        m = int(D.shape[1])

        def d_times(Z: Tensor) -> Tensor:
            return D @ Z

        def dt_times(X: Tensor) -> Tensor:
            return D.mT @ X

    m = m if rank is None else min(m, rank)
    if width >= min(d, m):
        raise ValueError(f"sketch width {width} must be below min(d, m) = {min(d, m)}")

    def k_times(X: Tensor) -> Tensor:
        return B @ d_times(dt_times(B.mT @ X))

    Q, _ = torch.linalg.qr(k_times(gaussian_sketch(d, width, generator=generator, like=B)))
    for _ in range(power_iters):
        Q, _ = torch.linalg.qr(k_times(Q))
    BtQ = B.mT @ Q
    W, s, _ = torch.linalg.svd(dt_times(BtQ).mT, full_matrices=False)
    return Q @ W, s, BtQ @ W


__all__ = [
    "SvdRoute",
    "column_signs",
    "full_column_rank",
    "full_rank_qr",
    "gaussian_sketch",
    "gram_lower",
    "gram_top_left_svd",
    "lowrank_fro_norm",
    "lowrank_svd",
    "numerical_rank",
    "principal_angles",
    "projector_distance",
    "randomized_left_svd",
    "randomized_left_svd_factored",
    "scaled_fro_norm",
    "sign_fixed_qr",
    "sign_fixed_svd",
    "svd_costs",
    "svd_route",
    "tall_left_svd",
]
