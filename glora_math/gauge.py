"""Gauge fixing and gauge transformations of LoRA factors.

A gauge change of a client is ``(B, A) -> (B G, G^{-1} A)`` for ``G`` in GL(r); it leaves the
update ``B A`` unchanged. :func:`gauge_fix` maps every factorisation of an update to one
canonical form ``U C`` with orthonormal ``U`` (SPEC, GLoRA step 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from glora_math.errors import GaugeError, NonFiniteError, OptionError, RankError
from glora_math.linalg import (
    column_signs,
    full_rank_qr,
    numerical_rank,
    sign_fixed_qr,
    sign_fixed_svd,
)
from glora_math.tolerances import working_dtype
from glora_math.types import GaugeFixed, GaugeMode, LoRAFactors
from glora_math.validation import ClientsInfo, all_finite, as_factors, validate_clients


def _fix_qr(B: Tensor, A: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    Q, T = sign_fixed_qr(B)
    s = torch.linalg.svdvals(T)
    rho = numerical_rank(s, (int(B.shape[0]), int(B.shape[1])), dtype)
    if rho == T.shape[0]:
        # Full column rank (the generic case): U = Q, C = T A; unique by diag(T) > 0.
        return Q, T @ A
    # Rank-deficient B (e.g. LoRA's zero-initialised B): keep only the numerical range of B,
    # found from the small SVD of T, so that U spans col(B) and carries no arbitrary columns.
    Ut, st, Vth = sign_fixed_svd(T)
    U = Q @ Ut[:, :rho]
    C = (st[:rho, None] * Vth[:rho]) @ A
    sg = column_signs(U)
    return U * sg, C * sg[:, None]


def _fix_svd(B: Tensor, A: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    Q, T = sign_fixed_qr(B)
    Ux, sx, Vxh = torch.linalg.svd(T @ A, full_matrices=False)
    rho = numerical_rank(sx, (int(B.shape[0]), int(A.shape[1])), dtype)
    U = Q @ Ux[:, :rho]
    C = sx[:rho, None] * Vxh[:rho]
    sg = column_signs(U)
    return U * sg, C * sg[:, None]


def gauge_fix(factors: LoRAFactors, mode: GaugeMode = "qr") -> GaugeFixed:
    """Canonical form ``dW = U C`` of one client update, with orthonormal ``U``.

    Parameters
    ----------
    factors
        ``LoRAFactors(B, A)`` with B ``(d, r)`` and A ``(r, k)``.
    mode
        ``"qr"`` (the paper's): ``B = Q T`` thin QR with ``diag(T) > 0``; ``U = Q``,
        ``C = T A``. ``U`` spans ``col(B)``; the projector ``U U^T`` is invariant under any
        gauge in GL(r). ``"svd"`` (canonical, stronger): ``U diag(s) V^T`` = compact SVD of
        ``B A`` computed from the QR of ``B`` and the small SVD of ``T A`` (never the d-by-k
        product), ``C = diag(s) V^T``. ``U`` spans ``col(B A)`` and ``(U, C)`` depends on
        ``B A`` alone (up to signs for repeated singular values), even across factorisations
        of different rank.

    Returns
    -------
    GaugeFixed
        ``U`` of shape ``(d, rho)`` and ``C`` of shape ``(rho, k)`` with ``U C = B A`` to working
        precision, where ``rho`` is the numerical rank of B (qr) or of B A (svd): rank-deficient
        and all-zero factors give fewer (possibly zero) columns. Tensors are in the working
        dtype (float32 for half-precision inputs).

    Cost O((d + k) r^2).
    """
    fixed = gauge_fix_all([factors], validate_clients([factors]), mode)[0]
    if not (all_finite(fixed.U) and all_finite(fixed.C)):
        # Finite factors whose product is beyond the working dtype: no finite answer exists.
        wider = "" if fixed.C.dtype == torch.float64 else " or gauge-fix in float64"
        raise NonFiniteError(
            f"gauge_fix: the coordinates C = T A overflow {fixed.C.dtype} (the update B A is "
            f"beyond its range); rescale the factors{wider}"
        )
    return fixed


def gauge_fix_all(
    factors: Sequence[LoRAFactors], info: ClientsInfo, mode: GaugeMode
) -> list[GaugeFixed]:
    """Gauge-fix clients already checked by :func:`validate_clients`, in ``info.work_dtype``."""
    if mode not in ("qr", "svd"):
        raise OptionError(f"unknown gauge mode {mode!r}; expected 'qr' or 'svd'")
    wd = info.work_dtype
    cs = [as_factors(f, i) for i, f in enumerate(factors)]
    out: list[GaugeFixed | None] = [None] * len(cs)
    if mode == "qr":
        # Clients of one rank share one batched QR; those whose B is numerically
        # rank-deficient are redone one by one below.
        by_rank: dict[int, list[int]] = {}
        for i, c in enumerate(cs):
            if 0 < c.rank <= info.d:
                by_rank.setdefault(c.rank, []).append(i)
        for idx in by_rank.values():
            if len(idx) < 2:
                continue
            Q, T, ok = full_rank_qr(torch.stack([cs[i].B.to(wd) for i in idx]))
            full = ok.tolist()
            C = T @ torch.stack([cs[i].A.to(wd) for i in idx])
            for j, i in enumerate(idx):
                if full[j]:
                    out[i] = GaugeFixed(Q[j], C[j])
    fix = _fix_qr if mode == "qr" else _fix_svd
    for i, c in enumerate(cs):
        if out[i] is None:
            out[i] = GaugeFixed(*fix(c.B.to(wd), c.A.to(wd), wd))
    return [f for f in out if f is not None]


def apply_gauge(factors: LoRAFactors, G: Float[Tensor, "r r"]) -> LoRAFactors:
    """Return ``(B G, G^{-1} A)``: the same update in another gauge.

    ``G^{-1} A`` is computed by a linear solve, not an explicit inverse.

    Raises
    ------
    GaugeError
        If ``G`` is not ``r``-by-``r`` or is singular.
    """
    r = factors.rank
    if G.ndim != 2 or G.shape != (r, r):
        raise GaugeError(f"gauge must be {r}x{r} for rank-{r} factors, got {tuple(G.shape)}")
    G = G.to(dtype=factors.B.dtype, device=factors.B.device)
    dt = working_dtype(factors.B.dtype)
    solved, info = torch.linalg.solve_ex(G.to(dt), factors.A.to(dt))
    if int(info) != 0 or not bool(torch.isfinite(solved).all()):
        raise GaugeError("gauge matrix is singular")
    return LoRAFactors(factors.B @ G, solved.to(factors.A.dtype))


def _check_gauge_args(r: int, cond: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise RankError(f"gauge size must be a positive int, got {r!r}")
    if not (math.isfinite(cond) and cond >= 1.0):
        raise GaugeError(f"condition number must be a finite number >= 1, got {cond}")


def random_orthogonal(
    r: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Float[Tensor, "r r"]:
    """A Haar-distributed matrix of O(r) (QR of a Gaussian matrix with ``diag(R) > 0``)."""
    _check_gauge_args(r, 1.0)
    X = torch.randn(r, r, generator=generator, dtype=dtype, device=device)
    Q, _ = sign_fixed_qr(X)
    return Q


def random_special_orthogonal(
    r: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Float[Tensor, "r r"]:
    """A Haar-distributed matrix of SO(r) (a random orthogonal matrix with det = +1)."""
    Q = random_orthogonal(r, generator=generator, dtype=dtype, device=device)
    if float(torch.linalg.det(Q)) < 0:
        Q = Q.clone()
        Q[:, 0] = -Q[:, 0]
    return Q


def random_invertible(
    r: int,
    *,
    cond: float = 10.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Float[Tensor, "r r"]:
    """A random matrix of GL(r) with 2-norm condition number exactly ``cond``.

    ``G = P diag(sigma) Q^T`` with Haar-random ``P, Q`` and ``sigma`` geometric from 1 down to
    ``1 / cond`` (so ``||G||_2 = 1``); det(G) may have either sign.
    """
    _check_gauge_args(r, cond)
    P = random_orthogonal(r, generator=generator, dtype=dtype, device=device)
    Q = random_orthogonal(r, generator=generator, dtype=dtype, device=device)
    if r == 1:
        sigma = torch.ones(1, dtype=dtype, device=device)
    else:
        t = torch.linspace(0.0, 1.0, r, dtype=torch.float64)
        sigma = torch.pow(torch.tensor(cond, dtype=torch.float64), -t).to(
            dtype=dtype, device=device
        )
    return (P * sigma) @ Q.mT


__all__ = [
    "apply_gauge",
    "gauge_fix",
    "gauge_fix_all",
    "random_invertible",
    "random_orthogonal",
    "random_special_orthogonal",
]
