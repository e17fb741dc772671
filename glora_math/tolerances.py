"""All numerical tolerances of glora-math, derived from dtype, dimension and conditioning.

No other module (library or tests) may invent a tolerance: it calls one of these.

The bounds follow the standard normwise forward/backward error analysis of Householder QR,
the SVD and matrix products (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
ch. 3, 19, 20): a backward-stable factorisation of an m-by-n matrix ``X`` returns the exact
factorisation of ``X + dX`` with ``||dX|| <= c * n * eps * ||X||`` for a modest constant ``c``
that the theory leaves unspecified. We fix that constant once, as :data:`SAFETY`.
Forward errors then scale with the condition number ``kappa`` of the problem, and errors in an
invariant subspace scale with ``1 / gap`` (Davis-Kahan sin-theta theorem).

Everything is computed in the *working* dtype returned by :func:`working_dtype`; half-precision
inputs are computed in float32.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

from glora_math.errors import DtypeError

Num = TypeVar("Num", float, torch.Tensor)

#: The unspecified constant in the ``c * n * eps`` normwise error bounds (see module docstring).
SAFETY: float = 10.0

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype in which factors of ``dtype`` are computed.

    float16 and bfloat16 are computed in float32; float32 and float64 in themselves.

    Raises
    ------
    DtypeError
        If ``dtype`` is not one of float16, bfloat16, float32, float64.
    """
    if dtype not in _SUPPORTED:
        raise DtypeError(f"unsupported dtype {dtype}; expected one of {_SUPPORTED}")
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the working dtype for ``dtype``."""
    return float(torch.finfo(working_dtype(dtype)).eps)


def rank_tol(sigma_max: float, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Singular values at or below this are treated as zero (numerical rank).

    ``max(m, n) * eps * sigma_max``: the LAPACK / ``numpy.linalg.matrix_rank`` convention, the
    size of the backward error of the SVD of an m-by-n matrix.
    """
    return max(shape) * eps(dtype) * sigma_max


def eigenvalue_error(lambda_max: Num, n: int, dtype: torch.dtype) -> Num:
    """Absolute error of computed eigenvalues of a symmetric PSD matrix of norm ``lambda_max``.

    ``SAFETY * n * eps * lambda_max``: the normwise backward error of a symmetric eigensolver,
    and of forming the matrix as a Gram product ``M^T M`` over n terms; eigenvalues at or below
    it cannot be told from zero. ``lambda_max`` may be a float or a tensor (batched).
    """
    return SAFETY * n * eps(dtype) * lambda_max


def zero_gap_tol(lambda_max: float, n: int, dtype: torch.dtype) -> float:
    """An eigengap at or below this is numerically zero.

    The computed eigenvalues of ``K`` (spectral norm ``lambda_max``) carry absolute errors up to
    :func:`eigenvalue_error`; a gap smaller than that cannot be told from zero.
    """
    return eigenvalue_error(lambda_max, n, dtype)


def product_tol(dtype: torch.dtype, *, n: int, scale: float, kappa: float = 1.0) -> float:
    """Absolute Frobenius-norm tolerance for a matrix reached by stable factorisations.

    Parameters
    ----------
    dtype
        dtype of the inputs (the working dtype's epsilon is used).
    n
        Sum of the dimensions the computation runs over (e.g. ``d + k + sum(r_i)``).
    scale
        Norm of the quantity, e.g. ``sum_i p_i ||B_i|| ||A_i||``.
    kappa
        Condition number of the worst factor involved (1 for orthonormal inputs).
    """
    return SAFETY * n * eps(dtype) * kappa * scale


def subspace_tol(dtype: torch.dtype, *, n: int, kappa: float, gap: float) -> float:
    """Tolerance on ``sin`` of the largest principal angle of a computed invariant subspace.

    Davis-Kahan: a perturbation of size ``delta`` moves an invariant subspace separated by
    ``gap`` by at most ``delta / gap``; the perturbation here is the backward error of the
    factorisations, ``SAFETY * n * eps * kappa``. Capped at 1 (the largest possible sine).
    """
    if gap <= 0.0:
        return 1.0
    return min(1.0, SAFETY * n * eps(dtype) * kappa / gap)


def aggregate_tol(dtype: torch.dtype, *, n: int, kappa: float, gap: float, scale: float) -> float:
    """Tolerance for comparing two server updates ``U_ref S`` that should agree exactly.

    Error of the products (:func:`product_tol`) plus the error from the consensus subspace
    moving within :func:`subspace_tol`, times the size of what it projects (``scale``).
    """
    return product_tol(dtype, n=n, scale=scale, kappa=kappa) + 2.0 * scale * subspace_tol(
        dtype, n=n, kappa=kappa, gap=gap
    )


def storage_tol(dtype: torch.dtype, *, scale: float, kappa: float = 1.0) -> float:
    """Tolerance for results *stored* in ``dtype`` (e.g. bfloat16 factors).

    Rounding a computed result to the storage dtype costs ``eps(storage)`` relative per entry,
    amplified by the conditioning of the factors being rounded: ``SAFETY * eps * kappa * scale``
    with the storage dtype's own epsilon (not the working dtype's).
    """
    return SAFETY * float(torch.finfo(dtype).eps) * kappa * scale


def orthonormality_tol(dtype: torch.dtype, *, n: int) -> float:
    """Tolerance on ``||U^T U - I||_F`` for a basis from Householder QR (n = rows + columns)."""
    return SAFETY * n * eps(dtype)


def gram_basis_accurate(kappa: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether a basis from a float64 Gram matrix is as accurate as a Householder QR in ``dtype``.

    ``U = B V S^{-1}`` from the eigendecomposition ``B^T B = V S^2 V^T`` computed in float64
    (exact products of the stored entries) deviates from orthonormality by the Gram's error
    relative to its smallest kept eigenvalue, ``SAFETY * n * eps64 * kappa^2`` for the
    condition number ``kappa`` of the kept part of ``B``. That is within
    :func:`orthonormality_tol` of ``dtype``, ``SAFETY * n * eps``, exactly when
    ``kappa^2 * eps64 <= eps``: ``kappa`` up to about 23000 for float32 (half inputs too), and
    only ``kappa = 1`` for float64. Batched: ``kappa`` is a tensor, the result a bool tensor.
    """
    return kappa * kappa * float(torch.finfo(torch.float64).eps) <= eps(dtype)


def gram_route_possible(dtype: torch.dtype) -> bool:
    """Whether any client with a condition number above 1 can pass :func:`gram_basis_accurate`.

    True when float64 is more precise than the working dtype of ``dtype`` (float32 and the half
    types); for float64 itself the routes that rely on it are skipped.
    """
    return float(torch.finfo(torch.float64).eps) < eps(dtype)


def certificate_tol(dtype: torch.dtype, *, n: int, scale: float) -> float:
    """Absolute tolerance when comparing a certified relative residual with a measured one.

    Both are norms of the same stacked difference computed by stable QR and products over n
    terms, each within ``SAFETY * n * eps * scale`` relative to ``||W_bar||``, where
    ``scale = (sum_i p_i ||B_i|| ||A_i|| + ||S||) / ||W_bar||`` >= 1 measures cancellation.
    """
    return 2.0 * SAFETY * n * eps(dtype) * scale


def comfortable_band(dtype: torch.dtype) -> tuple[float, float]:
    """Magnitudes ``[sqrt(tiny) / eps, sqrt(max) * eps]`` of the working dtype for ``dtype``.

    Entries in this band can be squared and multiplied by one another (as Gram matrices and
    certificates do) with neither underflow nor overflow; outside it, exact rescaling by a
    power of 2 is needed first.
    """
    fi = torch.finfo(working_dtype(dtype))
    return math.sqrt(fi.tiny) / fi.eps, math.sqrt(fi.max) * fi.eps


__all__ = [
    "SAFETY",
    "aggregate_tol",
    "certificate_tol",
    "comfortable_band",
    "eigenvalue_error",
    "eps",
    "gram_basis_accurate",
    "gram_route_possible",
    "orthonormality_tol",
    "product_tol",
    "rank_tol",
    "storage_tol",
    "subspace_tol",
    "working_dtype",
    "zero_gap_tol",
]
