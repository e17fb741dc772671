"""Dense float64 references and tolerance plumbing for property tests (ours and users').

The references form d-by-d and d-by-k matrices on purpose: they are the independent,
obviously-correct computations the low-rank operators are checked against.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from hypothesis import assume
from torch import Tensor

from glora_math import GaugeFixed, LoRAFactors, ZeroEigengapWarning
from glora_math.linalg import condition_number
from glora_math.tolerances import aggregate_tol

T = TypeVar("T")


def f64(x: Tensor) -> Tensor:
    """``x`` detached, in float64."""
    return x.detach().to(torch.float64)


def cond(x: Tensor) -> float:
    """2-norm condition number on the numerical range (1.0 for a zero matrix)."""
    return condition_number(x)


def orth(X: Tensor) -> Tensor:
    """Orthonormal basis of range(X) from a dense SVD (a different algorithm than the core's)."""
    U, s, _ = torch.linalg.svd(f64(X), full_matrices=False)
    rank = 0
    if s.numel() and float(s[0]) > 0.0:
        rank = int((s > s[0] * max(X.shape) * torch.finfo(torch.float64).eps).sum())
    basis: Tensor = U[:, :rank]
    return basis


def projector(U: Tensor) -> Tensor:
    """The dense orthogonal projector ``U U^T`` (float64)."""
    return f64(U) @ f64(U).mT


def dense_K(fixed: Sequence[GaugeFixed], p: Tensor) -> Tensor:  # noqa: N802 - K is the math name
    """The dense consensus matrix ``K = sum_i p_i U_i U_i^T`` (float64, d by d)."""
    d = fixed[0].U.shape[0]
    K = torch.zeros(d, d, dtype=torch.float64)
    for i, f in enumerate(fixed):
        K += float(p[i]) * projector(f.U)
    return K


def top_eigenspace(K: Tensor, R: int) -> tuple[Tensor, Tensor]:
    """Top-R eigenvectors and all eigenvalues (descending) of a symmetric matrix."""
    lam, V = torch.linalg.eigh(K)
    lam, V = lam.flip(0), V.flip(1)
    return V[:, :R], lam


def best_rank_error(X: Tensor, r: int) -> float:
    """Frobenius error of the best rank-r approximation of ``X`` (dense SVD)."""
    s = torch.linalg.svdvals(f64(X))
    return float(s[r:].pow(2).sum().sqrt())


def unique_or_reject(fn: Callable[[], T]) -> T:
    """Run ``fn``; reject the example if the consensus subspace is not unique (zero gap).

    Propositions about U_ref presuppose a unique top-R eigenspace; a zero gap is reported by
    a typed warning, and such draws are outside the statement.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    assume(not any(issubclass(w.category, ZeroEigengapWarning) for w in caught))
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def n_dims(d: int, k: int, ranks: Sequence[int]) -> int:
    """The dimension count used in every tolerance: d + k + sum of ranks."""
    return d + k + sum(ranks)


def state_tol(
    dtype: torch.dtype,
    *,
    d: int,
    k: int,
    ranks: Sequence[int],
    kappa: float,
    gap: float,
    scale: float,
) -> float:
    """:func:`~glora_math.tolerances.aggregate_tol` for a problem of these dimensions."""
    return aggregate_tol(dtype, n=n_dims(d, k, ranks), kappa=kappa, gap=gap, scale=scale)


def factors_f64(fs: Sequence[LoRAFactors]) -> list[LoRAFactors]:
    """The clients' factors in float64."""
    return [LoRAFactors(f64(f.B), f64(f.A)) for f in fs]


__all__ = [
    "best_rank_error",
    "cond",
    "dense_K",
    "f64",
    "factors_f64",
    "n_dims",
    "orth",
    "projector",
    "state_tol",
    "top_eigenspace",
    "unique_or_reject",
]
