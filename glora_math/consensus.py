"""The consensus subspace of the clients (SPEC, GLoRA step 2).

``K = sum_i p_i U_i U_i^T`` is not formed while d > m: its top-R eigenvectors are the top-R
left singular vectors of the stacked, scaled bases ``M = [sqrt(p_1) U_1, ..., sqrt(p_N) U_N]``
(d by m = ``sum_i rho_i``). They come from the smaller Gram matrix, ``M^T M`` (m by m), or
``M M^T = K`` itself when d < m, where it is smaller than ``M`` (one matrix product and a
symmetric eigensolver, :func:`~glora_math.linalg.gram_top_left_svd`), wherever lambda_R lies
above the Gram's rounding level; otherwise (R at or above the numerical rank, where the clamp
decision needs full accuracy) from the thin QR of ``M`` followed by the SVD of its small
triangular factor (or the SVD of a wide ``M``). Cost O(d m min(d, m)); memory O(d m).

With a :class:`~glora_math.types.Sketch` the top-R eigenvectors come instead from randomized
subspace iteration on K (arXiv 0909.4061): cost O(d (sum_i rho_i) (R + oversample)) per pass,
linear in the number of clients rather than quadratic.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.errors import (
    DeviceMismatchError,
    EmptyClientsError,
    GaugeError,
    NonFiniteError,
    RankClampedWarning,
    ShapeMismatchError,
    ZeroEigengapWarning,
)
from glora_math.linalg import (
    column_signs,
    gram_top_left_svd,
    numerical_rank,
    randomized_left_svd,
    tall_left_svd,
)
from glora_math.tolerances import orthonormality_tol, storage_tol, working_dtype, zero_gap_tol
from glora_math.types import ConsensusBasis, GaugeFixed, Sketch
from glora_math.validation import WeightsLike, all_finite, normalize_weights, validate_rank


def live_clients(fixed: Sequence[GaugeFixed], p: Tensor) -> list[int]:
    """Indices of the clients that enter K: positive weight and rank > 0."""
    return [i for i, (pi, f) in enumerate(zip(p.tolist(), fixed, strict=True)) if pi > 0 and f.rank]


def stacked_bases(fixed: Sequence[GaugeFixed], p: Tensor) -> Tensor:
    """``M = [sqrt(p_1) U_1, ..., sqrt(p_N) U_N]``, skipping zero-weight and rank-0 clients."""
    live = live_clients(fixed, p)
    if not live:
        U0 = fixed[0].U
        return U0.new_zeros((U0.shape[0], 0))
    M = torch.cat([fixed[i].U for i in live], dim=1)
    return M * stacked_weights(fixed, p, live)


def stacked_weights(fixed: Sequence[GaugeFixed], p: Tensor, live: Sequence[int]) -> Tensor:
    """``sqrt(p_i)`` repeated once per column of client i (i in ``live``): the scales in ``M``."""
    idx = torch.tensor(live, device=p.device)
    reps = torch.tensor([fixed[i].rank for i in live], device=p.device)
    return p[idx].sqrt().repeat_interleave(reps)


def _check_fixed(fixed: Sequence[GaugeFixed]) -> None:
    """Public-boundary checks of gauge-fixed clients: type, shapes, device, finite, orthonormal."""
    if len(fixed) == 0:
        raise EmptyClientsError("no gauge-fixed clients were given")
    for i, f in enumerate(fixed):
        if not isinstance(f, GaugeFixed):
            raise ShapeMismatchError(
                f"expected GaugeFixed(U, C) (see gauge_fix), got {type(f).__name__}", client=i
            )
    d = fixed[0].U.shape[0]
    dev = fixed[0].U.device
    for i, f in enumerate(fixed):
        if f.U.shape[0] != d:
            raise ShapeMismatchError(f"basis has {f.U.shape[0]} rows, client 0 has {d}", client=i)
        if f.U.device != dev:
            raise DeviceMismatchError(f"basis is on {f.U.device}, client 0 on {dev}", client=i)
        if not (all_finite(f.U) and all_finite(f.C)):
            raise NonFiniteError("basis or coordinates have NaN/Inf entries", client=i)
        wd = working_dtype(f.U.dtype)
        U = f.U.detach().to(wd)
        gap = float(
            torch.linalg.matrix_norm(U.mT @ U - torch.eye(U.shape[1], dtype=wd, device=dev))
        )
        # A basis stored in half precision is orthonormal to that precision only.
        tol = max(
            orthonormality_tol(wd, n=int(U.shape[0] + U.shape[1])),
            storage_tol(f.U.dtype, scale=2.0 * int(U.shape[1])),
        )
        if gap > tol:
            raise GaugeError(
                f"basis columns are not orthonormal (||U^T U - I|| = {gap:.1e}); gauge-fix the "
                "client with gauge_fix",
                client=i,
            )


def consensus_basis(
    fixed: Sequence[GaugeFixed],
    weights: WeightsLike = None,
    *,
    rank: int,
    sketch: Sketch | None = None,
) -> ConsensusBasis:
    """Top-R eigenvectors of ``K = sum_i p_i U_i U_i^T``, computed from the factors.

    Parameters
    ----------
    fixed
        Gauge-fixed clients (:func:`~glora_math.gauge.gauge_fix`), bases of shape ``(d, rho_i)``.
    weights
        Non-negative client weights (renormalised); ``None`` for equal weights.
    rank
        The server rank R.
    sketch
        ``None`` (default) for the exact eigenvectors; a :class:`Sketch` for randomized
        subspace iteration. Then ``eigvals`` holds the ``R + oversample`` Ritz values (lower
        bounds of K's top eigenvalues) and the gap is estimated from them.

    Returns
    -------
    ConsensusBasis
        ``U`` of shape ``(d, R)``, the spectrum of K and the eigengap at R.

    Warns
    -----
    RankClampedWarning
        If R exceeds the numerical rank of ``M`` (the dimension of the union of the client
        subspaces): R is clamped to it. This is the documented choice: LoRA's first round
        (all ``B = 0``) must not be an error.
    ZeroEigengapWarning
        If ``lambda_R - lambda_{R+1}`` is numerically zero (U_ref not unique).
    """
    R = validate_rank(rank)
    _check_fixed(fixed)
    # Half-precision bases are computed in float32 (eigh has no half kernels), and the math
    # is not differentiable: detached copies in the working dtype.
    fixed = [
        GaugeFixed(
            f.U.detach().to(working_dtype(f.U.dtype)), f.C.detach().to(working_dtype(f.C.dtype))
        )
        for f in fixed
    ]
    U0 = fixed[0].U
    p = normalize_weights(weights, len(fixed), dtype=U0.dtype, device=U0.device)
    return consensus(fixed, p, R, sketch, stacklevel=3)[0]


def consensus(
    fixed: Sequence[GaugeFixed], p: Tensor, R: int, sketch: Sketch | None, *, stacklevel: int
) -> tuple[ConsensusBasis, Tensor]:
    """:func:`consensus_basis` on checked inputs (normalised ``p``); also returns ``M``.

    ``stacklevel`` makes the warnings point at the public caller.
    """
    U0 = fixed[0].U
    d = int(U0.shape[0])
    M = stacked_bases(fixed, p)
    m = int(M.shape[1])
    if m == 0:
        warnings.warn(
            RankClampedWarning(f"all client updates are zero; server rank clamped from {R} to 0"),
            stacklevel=stacklevel,
        )
        return ConsensusBasis(U0.new_zeros((d, 0)), U0.new_zeros((0,)), 0.0), M
    if sketch is not None:
        gen = torch.Generator().manual_seed(sketch.seed)
        Uall, s = randomized_left_svd(
            M, R + sketch.oversample, power_iters=sketch.power_iters, generator=gen
        )
        eigvals = s.pow(2)
    else:
        Uall, eigvals = exact_top(M, R)
    return finish_basis(Uall, eigvals, (d, m), R, stacklevel=stacklevel + 1), M


def exact_top(M: Tensor, R: int) -> tuple[Tensor, Tensor]:
    """Left singular vectors of ``M`` (at least the top R, descending) and K's spectrum.

    The Gram route (:func:`~glora_math.linalg.gram_top_left_svd`) where lambda_R lies above the
    Gram's rounding level; otherwise (R near or above the numerical rank, where the clamp
    decision needs full accuracy) the thin QR of ``M`` and the SVD of its triangular factor.
    """
    Uall, eigvals, ok = gram_top_left_svd(M, R)
    if not bool(ok):
        Uall, s = tall_left_svd(M)
        eigvals = s.pow(2)
    return Uall, eigvals


def finish_basis(
    Uall: Tensor, eigvals: Tensor, shape: tuple[int, int], R: int, *, stacklevel: int
) -> ConsensusBasis:
    """The common end of every consensus route: clamp R, fix signs, compute and check the gap.

    ``Uall`` (d by at least R columns, descending) and ``eigvals`` (descending) describe the top
    of K's spectrum; ``shape`` is that of the stacked bases ``M`` (d by m), whose numerical rank
    (by the LAPACK rule on ``sqrt(eigvals)``) caps R.
    """
    d, m = shape
    dt = Uall.dtype
    # Numerical rank from the singular values (sqrt of the eigenvalues) by the LAPACK rule.
    avail = numerical_rank(eigvals.sqrt(), (d, m), dt)
    if avail < R:
        warnings.warn(
            RankClampedWarning(
                f"server rank {R} exceeds the dimension {avail} spanned by the clients; "
                f"clamped to {avail}"
            ),
            stacklevel=stacklevel,
        )
        R = avail
    U = Uall[:, :R]
    U = U * column_signs(U)
    return ConsensusBasis(U, eigvals, eigengap(eigvals, R, n=d + m, stacklevel=stacklevel + 1))


def eigengap(eigvals: Tensor, R: int, *, n: int, stacklevel: int) -> float:
    """``lambda_R - lambda_{R+1}`` of a descending spectrum (0.0 for R = 0), checked.

    Warns with :class:`ZeroEigengapWarning` when the gap is within the eigenvalues' rounding
    (:func:`~glora_math.tolerances.zero_gap_tol` over ``n`` terms).
    """
    lam_next = float(eigvals[R]) if eigvals.numel() > R else 0.0
    gap = float(eigvals[R - 1]) - lam_next if R > 0 else 0.0
    if R > 0 and gap <= zero_gap_tol(float(eigvals[0]), n, eigvals.dtype):
        warnings.warn(
            ZeroEigengapWarning(
                f"consensus eigengap at R={R} is numerically zero "
                f"(lambda_R={float(eigvals[R - 1]):.3e}, lambda_R+1={lam_next:.3e}): "
                "the server subspace is not unique"
            ),
            stacklevel=stacklevel,
        )
    return gap


__all__ = [
    "consensus",
    "consensus_basis",
    "eigengap",
    "exact_top",
    "finish_basis",
    "live_clients",
    "stacked_bases",
    "stacked_weights",
]
