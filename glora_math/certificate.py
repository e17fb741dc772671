"""Certified error of a projected server update, from factors (SPEC, extensions: certificate).

For an orthogonal projector ``P`` and the mean update ``W_bar = sum_i p_i B_i A_i``,

    ||W_bar - P W_bar||_F^2 = ||W_bar||_F^2 - ||P W_bar||_F^2          (L1, Pythagoras)

and a GLoRA state stores the coordinates of ``P W_bar`` in an orthonormal basis (P1:
``U S = U U^T W_bar``), so ``||P W_bar||_F = ||S||_F``. The residual curve of nested bases
therefore comes from the row norms of S (:func:`residual_curve`, used by the auto-rank rule).

The subtraction loses digits when the residual is small (a relative error of about
``n eps / rho^2``: in float32 at LoRA sizes, most residuals), so the certificate itself is
computed directly, as the norm of the stacked difference
``[p_1 B_1, ..., p_N B_N, -U] [A_1; ...; A_N; S]``, with one QR of the stacked left factors
that also gives ``||W_bar||``: never a d-by-k matrix, and no cancellation.

Where the consensus came from the raw Gram matrix of the B's (:mod:`glora_math.implicit`),
the same numbers come from that matrix, the raw Gram matrix of the A's and the stored basis's
products with the B's, without the QR (:func:`gram_parts`, proposition P16): both norms are
quadratic forms in them, evaluated in float64 (exact products of float32 entries) with a
bound on their error; where the bound is wider than the QR certificate's own tolerance, the QR
certificate is computed instead (:func:`gram_certificates`).

Everything here works on one orientation: a right-side state is certified on the transposed
clients ``(A_i^T, B_i^T)``, which have the same residual norms.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glora_math.errors import GloraError, NonFiniteError, ResidualWarning
from glora_math.linalg import lowrank_fro_norm, scaled_fro_norm
from glora_math.scaling import ldexp_or_inf, times_pow2
from glora_math.tolerances import SAFETY, certificate_tol
from glora_math.types import Certificate, LoRAFactors
from glora_math.validation import all_finite


def _stacked_mean(
    factors: Sequence[LoRAFactors], p: Tensor, wd: torch.dtype, extra: int
) -> tuple[Tensor, Tensor, int]:
    """``[p_i B_i ..., 0]`` (with ``extra`` free columns) and ``[A_i; ...]`` over live clients.

    Leading batch dimensions of the factors (stacked modules) are kept.
    """
    pl = p.tolist()
    live = [i for i, pi in enumerate(pl) if pi > 0]
    f0 = factors[0]
    batch = tuple(f0.B.shape[:-2])
    m = sum(int(factors[i].B.shape[-1]) for i in live)
    Bc = f0.B.new_empty((*batch, int(f0.B.shape[-2]), m + extra), dtype=wd)
    Ac = f0.A.new_empty((*batch, m, int(f0.A.shape[-1])), dtype=wd)
    col = 0
    for i in live:
        r = int(factors[i].B.shape[-1])
        Bc[..., col : col + r].copy_(factors[i].B.detach()).mul_(p[i])
        Ac[..., col : col + r, :].copy_(factors[i].A.detach())
        col += r
    return Bc, Ac, m


def certify_norms(
    factors: Sequence[LoRAFactors], p: Tensor, U: Tensor, S: Tensor, wd: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(||W_bar - U S||_F, ||W_bar||_F)`` per module, for one module or a stack of them.

    ``factors`` are validated clients in the state's orientation (B ``(..., d, r_i)``, A
    ``(..., r_i, k)`` with the batch dimensions of ``U`` ``(..., d, R)`` and ``S`` ``(..., R,
    k)``), ``p`` their normalised weights. One triangular factor serves both norms: with
    ``[p_1 B_1, ..., p_N B_N, -U] = Q T`` (QR, Q never formed, batched over the modules),
    ``||W_bar|| = ||T_11 A||`` and ``||W_bar - U S|| = ||T [A; S]||``, both without
    cancellation. Cost O(d (m + R)^2 + (m + R)^2 k) per module.

    Raises
    ------
    NonFiniteError
        If a norm overflows the working dtype.
    """
    R = int(U.shape[-1])
    Bc, Ac, m = _stacked_mean(factors, p, wd, R)
    batch = tuple(U.shape[:-2])
    if m == 0:  # no live client: W_bar = 0, hence U S = U U^T W_bar = 0 as well
        zero = U.new_zeros(batch, dtype=wd)
        return zero, zero
    Bc[..., m:].copy_(U.detach()).neg_()
    # With fewer rows than columns the stacked factor is already small: use it as it is.
    T = torch.linalg.qr(Bc, mode="r")[1] if Bc.shape[-2] > Bc.shape[-1] else Bc
    head = T[..., :m] @ Ac
    mean = scaled_fro_norm(head)
    num = scaled_fro_norm(head + T[..., m:] @ S.to(wd))
    if not (all_finite(mean) and all_finite(num)):
        raise NonFiniteError(
            f"the certificate overflowed {wd}: the mean update's norm is beyond its range "
            "(rescale the clients' factors)"
        )
    return num, mean


def estimate_norms(
    factors: Sequence[LoRAFactors],
    p: Tensor,
    U: Tensor,
    S: Tensor,
    wd: torch.dtype,
    *,
    probes: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``(mean_j ||(W_bar - U S) g_j||^2, ||S||_F^2)`` per module, from Gaussian probes ``g_j``.

    The first is Hutchinson's estimator of ``||W_bar - U S||_F^2 = tr(E^T E)`` with
    ``E = W_bar - U S``: unbiased, and for ``s`` probes and any ``eps`` in (0, 1)

        P( mean_j ||E g_j||^2 <= (1 - eps) ||E||_F^2 ) <= exp(-s eps^2 / 4)

    (Chernoff on ``sum_i lambda_i Z_i^2`` with ``log(1 + x) >= x - x^2 / 2``; proof in
    ``proofs/symbolic.py``, P15). The probes are the same for every module of a stack, so the
    sum over modules is the same estimator of the stack's total. Cost
    O(s (k + d) (sum_i r_i + R)) per module: linear in the number of clients, never d-by-k.
    """
    R = int(U.shape[-1])
    k = int(S.shape[-1])
    G = torch.randn((k, probes), generator=generator, dtype=wd).to(S.device)
    Y = -(U.detach().to(wd) @ (S.detach().to(wd) @ G))
    for f, pi in zip(factors, p.tolist(), strict=True):
        if pi > 0:
            Y += pi * (f.B.detach().to(wd) @ (f.A.detach().to(wd) @ G))
    x = scaled_fro_norm(Y).pow(2) / probes
    s2 = scaled_fro_norm(S.detach().to(wd)).pow(2) if R > 0 else x.new_zeros(x.shape)
    if not (all_finite(x) and all_finite(s2)):
        raise NonFiniteError(
            f"the certificate estimate overflowed {wd}: the mean update's norm is beyond its "
            "range (rescale the clients' factors)"
        )
    return x, s2


def estimated_certificate(x: float, s2: float, probes: int, confidence: float) -> Certificate:
    """The :class:`Certificate` of :func:`estimate_norms`' ``(x, ||S||^2)`` for one module.

    With ``eps = 2 sqrt(ln(1 / (1 - confidence)) / probes)``, ``||E||^2 <= x / (1 - eps)``
    with probability at least ``confidence``; since ``||W_bar||^2 = ||S||^2 + ||E||^2``
    (Pythagoras, L1, to rounding) and ``e / sqrt(a + e^2)`` increases with ``e``, the relative
    residual is at most ``sqrt(e_up^2 / (||S||^2 + e_up^2))`` with the same probability.
    """
    eps = 2.0 * math.sqrt(math.log(1.0 / (1.0 - confidence)) / probes)
    up = x / (1.0 - eps)
    mean2 = s2 + x
    if mean2 <= 0.0:
        return Certificate(
            0.0, 0.0, estimated=True, bound=0.0, confidence=confidence, method="estimate"
        )
    return Certificate(
        math.sqrt(x / mean2),
        math.sqrt(mean2),
        estimated=True,
        bound=math.sqrt(up / (s2 + up)),
        confidence=confidence,
        method="estimate",
    )


def combined_certificate(
    certs: Sequence[Certificate], *, probes: int | None = None, confidence: float | None = None
) -> Certificate:
    """The certificate of a stack of modules (all of them together) from its modules'.

    Exact certificates combine as ``sqrt(sum_l ||E_l||^2 / sum_l ||W_bar_l||^2)``; estimated
    ones (``probes`` and ``confidence`` of the sketch that estimated every one of them) as
    :func:`estimated_certificate` of the summed estimates, which is what one estimate of the
    whole stack with the same probes gives. The sums run at the scale of the largest mean
    norm (a power of 2: the same bits as unscaled where nothing under- or overflows), so
    modules of any magnitude combine.
    """
    top = max((c.mean_norm for c in certs), default=0.0)
    estimated = any(c.estimated for c in certs)
    if top == 0.0 or not math.isfinite(top):
        # No module's mean norm weighs (all zero or below float64's range: a lost module is
        # certified 1 with norm 0), or one is beyond float64: the largest module residual
        # bounds the stack's.
        worst = max((c.relative_residual for c in certs), default=0.0)
        if not estimated:
            return Certificate(worst, top)
        bound = max((c.bound if c.bound is not None else worst for c in certs), default=0.0)
        return Certificate(worst, top, estimated=True, bound=bound, confidence=confidence,
                           method="estimate")  # fmt: skip
    e = math.frexp(top)[1]
    norms = [math.ldexp(c.mean_norm, -e) for c in certs]
    if estimated:
        if probes is None or confidence is None:
            raise GloraError("combining estimated certificates needs the sketch's probes")
        xs = [(c.relative_residual * n) ** 2 for c, n in zip(certs, norms, strict=True)]
        s2 = sum(n * n - x for n, x in zip(norms, xs, strict=True))
        est = estimated_certificate(sum(xs), s2, probes, confidence)
        return dataclasses.replace(est, mean_norm=ldexp_or_inf(est.mean_norm, e))
    sq = sum(n * n for n in norms)
    res = sum((c.relative_residual * n) ** 2 for c, n in zip(certs, norms, strict=True))
    return Certificate(math.sqrt(res / sq), ldexp_or_inf(math.sqrt(sq), e))


_EPS64 = float(torch.finfo(torch.float64).eps)


@dataclass(frozen=True, slots=True)
class GramParts:
    """The Gram route's certificate before its acceptance test (float64, one value per module).

    ``res2`` and ``mean2`` are ``||W_bar - P W_bar||_F^2`` and ``||W_bar||_F^2`` as computed,
    ``beta`` bounds the error of each, and ``size`` is ``sum_i p_i ||B_i||_F ||A_i||_F`` (the
    scale of the QR certificate's tolerance).
    """

    res2: Tensor
    mean2: Tensor
    beta: Tensor
    size: Tensor


def stored_basis_products(U: Tensor, Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(U^T B, U^T U)`` in float64 for a stored basis ``U`` (..., n, R) and the stacked B's.

    The products of stored float32 or half entries are exact in float64; only the sums round.
    Cost O(n m R): small beside the Gram matrices.
    """
    U64 = U.to(torch.float64)
    XtB = torch.cat([U64.mT @ B.to(torch.float64) for B in Bs], dim=-1)
    return XtB, U64.mT @ U64


def gram_parts(  # noqa: PLR0917 - the quantities of one proposition (P16)
    gam_b: Tensor, gam_a: Tensor, pw: Tensor, XtB: Tensor, XtX: Tensor, n: int
) -> GramParts:
    """The certificate of ``span(X)`` from the raw Gram matrices of both sides (P16), batched.

    ``B = [B_1, ..., B_N]`` and ``A = [A_1; ...; A_N]`` are the stacked raw factors (m columns
    and rows), ``gam_b = B^T B`` and ``gam_a = A A^T`` their float64 Gram matrices, ``pw`` the
    weight of each column (``p_i`` repeated ``r_i`` times), and ``XtB = X^T B``, ``XtX = X^T
    X`` (:func:`stored_basis_products`) for the state's stored basis X (full column rank:
    the certificate is of the subspace the state stores, not of an ideal one). With ``W_bar =
    B diag(pw) A`` and ``Pa = diag(pw) gam_a diag(pw)``, Pythagoras and the projector onto
    ``span(X)`` give

        ||W_bar||^2           = <Pa, gam_b>
        ||P W_bar||^2         = tr((X^T X)^{-1} (X^T B) Pa (X^T B)^T)
        ||W_bar - P W_bar||^2 = the difference,

    exact identities (P16: sympy, 50 digits, and Coq). Cost O(m^2 R): the Gram matrices are
    what the Gram route has anyway. The difference cancels, so it is evaluated in float64:
    every term is within ``size^2`` (Cauchy-Schwarz on the Gram entries, ``||X^T B|| <=
    ||X|| ||B||``), so the error of each is at most ``beta = 2 SAFETY n eps64 size^2 (1 +
    cond(X^T X))`` over ``n`` terms (``X^T X`` is the identity to the working precision). For
    float32 and half inputs that is far inside the QR certificate's tolerance (``sqrt(n eps64)
    <= n eps32``); the test stays, in :func:`gram_certificates`.
    """
    Pa = pw.unsqueeze(-1) * gam_a * pw.unsqueeze(-2)
    mean2 = (Pa * gam_b).sum((-2, -1))
    T = XtB @ Pa @ XtB.mT
    L, info = torch.linalg.cholesky_ex(XtX)
    bad = info != 0
    Lsafe = torch.where(bad.unsqueeze(-1).unsqueeze(-1), torch.eye(int(XtX.shape[-1]),
                        dtype=XtX.dtype, device=XtX.device), L)  # fmt: skip
    Xs = torch.linalg.solve_triangular(Lsafe, T, upper=False)
    Xs = torch.linalg.solve_triangular(Lsafe, Xs.mT, upper=False)
    proj2 = Xs.diagonal(dim1=-2, dim2=-1).sum(-1)
    ev = torch.linalg.eigvalsh(XtX)
    cond = ev[..., -1] / ev[..., 0].clamp_min(torch.finfo(torch.float64).tiny)
    size = (pw * (gam_a.diagonal(dim1=-2, dim2=-1) * gam_b.diagonal(dim1=-2, dim2=-1)).sqrt()
            ).sum(-1)  # fmt: skip
    beta = 2.0 * SAFETY * n * _EPS64 * size.pow(2) * (1.0 + cond)
    beta = torch.where(bad | (ev[..., 0] <= 0), torch.full_like(beta, math.inf), beta)
    return GramParts((mean2 - proj2).clamp_min(0.0), mean2.clamp_min(0.0), beta, size)


def gram_certificates(
    parts: GramParts, s_norm: Tensor, wd: torch.dtype, n: int
) -> list[Certificate | None]:
    """Each module's Gram certificate, or ``None`` where its error bound is too wide.

    From ``beta`` of :func:`gram_parts`, an interval for the relative residual; the certificate
    is taken where its half-width is at most half of
    :func:`~glora_math.tolerances.certificate_tol` for ``wd`` over ``n`` terms (the QR
    certificate is within the other half), so the two agree within that tolerance. ``s_norm``
    is ``||S||_F`` per module. ``size`` of the parts is by column, at most ``sum_i p_i
    ||B_i||_F ||A_i||_F``.
    """
    out: list[Certificate | None] = []
    rows = zip(parts.res2.reshape(-1).tolist(), parts.mean2.reshape(-1).tolist(),
               parts.beta.reshape(-1).tolist(), parts.size.reshape(-1).tolist(),
               s_norm.reshape(-1).tolist(), strict=True)  # fmt: skip
    for c2, w2, beta, size, sn in rows:
        if not all(math.isfinite(x) for x in (c2, w2, beta, size, sn)) or w2 <= beta:
            out.append(None)
            continue
        mean = math.sqrt(w2)
        rho = min(1.0, math.sqrt(c2) / mean)
        hi = min(1.0, math.sqrt(c2 + beta) / math.sqrt(w2 - beta))
        lo = math.sqrt(max(c2 - beta, 0.0)) / math.sqrt(w2 + beta)
        tol = certificate_tol(wd, n=n, scale=(size + sn) / mean)
        out.append(Certificate(rho, mean, method="gram") if max(hi - rho, rho - lo) <= tol / 2
                   else None)  # fmt: skip
    return out


def as_certificate(num: float, mean: float) -> Certificate:
    """The :class:`Certificate` of a residual norm and a mean norm (0 for a zero mean)."""
    if mean == 0.0:
        return Certificate(0.0, 0.0)
    return Certificate(num / mean, mean)


def truncation_certificate(s: Tensor, rank: int) -> Certificate:
    """The certificate of the best rank-``rank`` approximation of a matrix with spectrum ``s``.

    Eckart-Young (Frobenius norm): ``||W - W_R||_F = ||s[R:]||`` and ``||W||_F = ||s||``, for
    ``s`` the whole spectrum of ``W``. Both norms are taken directly from the singular values
    (in float64), so a small residual loses no digits to a subtraction; each computed singular
    value is within the backward error of the SVD route that produced it (about
    ``n eps sum_i p_i ||B_i|| ||A_i||`` for the factor route of
    :func:`~glora_math.baselines.spectrum_of_mean`: column-wise stable QRs and a small SVD).
    ``method == "svd"``. FlexLoRA and ``svd_mean`` carry it: their update is that truncation.
    """
    sd = s.detach().to(torch.float64)
    tail = float(torch.linalg.vector_norm(sd[rank:])) if rank < sd.numel() else 0.0
    cert = as_certificate(tail, float(torch.linalg.vector_norm(sd)))
    return Certificate(cert.relative_residual, cert.mean_norm, method="svd")


def _exponent(x: Tensor) -> int | None:
    """``e`` with ``max |x|`` in ``[2^(e-1), 2^e)``; ``None`` for an all-zero ``x``."""
    top = float(x.abs().max()) if x.numel() else 0.0
    return math.frexp(top)[1] if top > 0.0 else None


def _at_unit_scale(f: LoRAFactors, k: int) -> LoRAFactors | None:
    """``f``'s product times ``2**-k`` as float64 factors of balanced magnitude (``None``: 0).

    Powers of 2 only: exact wherever the results are normal float64 numbers, which holds for
    every factorisation whose own product is within ``2**±1000`` of ``2**k``.
    """
    eb, ea = _exponent(f.B), _exponent(f.A)
    if eb is None or ea is None:
        return None
    # B 2^-tb and A 2^-ta both near 2^((eb + ea - k) / 2): the product is scaled by 2^-k.
    half = (eb + ea - k) // 2
    tb, ta = eb - half, k - (eb - half)
    return LoRAFactors(times_pow2(f.B.double(), -tb), times_pow2(f.A.double(), -ta))


def measured_certificate(
    factors: Sequence[LoRAFactors], p: Tensor, update: LoRAFactors
) -> Certificate:
    """The exact relative error of any low-rank ``update`` against the mean, measured.

    From factors (one QR of the stacked difference), in float64 and at unit scale whatever
    the clients' dtype and range: each factorisation (every client's, and the update's) is
    rebalanced by powers of 2, which leave its product unchanged, and all products are
    scaled by one power of 2 that brings the largest weighted product near 1. For operators
    whose update is not a projection this module can certify from a state (FlexLoRA's
    truncation rounded to half precision; clients near the ends of their dtype's range).
    ``method == "qr"``.
    """
    pl = [float(x) for x in p]
    tops = [
        e_b + e_a + math.frexp(pi)[1]
        for pi, f in zip(pl, factors, strict=True)
        if pi > 0 and (e_b := _exponent(f.B)) is not None and (e_a := _exponent(f.A)) is not None
    ]
    if not tops:  # a zero mean
        return as_certificate(0.0, 0.0)
    k = max(tops)
    live = [(pi, g) for pi, f in zip(pl, factors, strict=True)
            if pi > 0 and (g := _at_unit_scale(f, k)) is not None]  # fmt: skip
    B = torch.cat([pi * g.B for pi, g in live], dim=1)
    A = torch.cat([g.A for _, g in live], dim=0)
    mean_norm = lowrank_fro_norm(B, A)
    mine = _at_unit_scale(update, k)
    if mine is None:
        num = mean_norm
    else:
        num = lowrank_fro_norm(torch.cat([B, -mine.B], dim=1), torch.cat([A, mine.A], dim=0))
    cert = as_certificate(num, mean_norm)
    return Certificate(cert.relative_residual, ldexp_or_inf(cert.mean_norm, k), method="qr")


def certify(
    factors: Sequence[LoRAFactors], p: Tensor, U: Tensor, S: Tensor, wd: torch.dtype
) -> Certificate:
    """The certificate of the update ``U S`` (``U`` orthonormal, ``S = U^T W_bar``).

    One module; see :func:`certify_norms` (which also takes stacks) for the method and cost.
    """
    num, mean = certify_norms(factors, p, U, S, wd)
    return as_certificate(float(num), float(mean))


def residual_curve(S: Tensor, mean_norm: float) -> Tensor:
    """``rho(R)^2`` for R = 0, ..., rows of S, by the difference formula (float64, ``(R+1,)``).

    For nested bases (the first R columns of one ordered basis), ``||P_R W_bar||^2`` is the
    sum of the first R squared row norms of ``S``, so one pass gives the whole curve; it is
    non-increasing in R (auto-rank rule, SPEC extensions).
    """
    rows = S.to(torch.float64).pow(2).sum(dim=1)
    kept = torch.cat([rows.new_zeros(1), torch.cumsum(rows, dim=0)])
    if mean_norm == 0.0:
        return torch.zeros_like(kept)
    return (1.0 - kept / (mean_norm * mean_norm)).clamp_(min=0.0)


def warn_residual(
    rho: float,
    limit: float | None,
    where: str,
    *,
    stacklevel: int,
    modules: Sequence[str | int] = (),
) -> None:
    """A :class:`~glora_math.errors.ResidualWarning` when ``rho`` exceeds ``limit`` (> 0).

    ``where`` says what the residual belongs to (side, rank; empty for nothing more),
    ``modules`` which modules (names, or positions in a stack); ``stacklevel`` counts from the
    caller of this function, as :func:`warnings.warn` does.
    """
    if limit is not None and limit > 0 and rho > limit:
        what = f"certified relative residual {rho:.3e} exceeds {limit:.3e}"
        warnings.warn(
            ResidualWarning(f"{where}: {what}" if where else what, modules=modules),
            stacklevel=stacklevel + 1,
        )


__all__ = [
    "GramParts",
    "as_certificate",
    "certify",
    "certify_norms",
    "combined_certificate",
    "gram_certificates",
    "gram_parts",
    "measured_certificate",
    "residual_curve",
    "stored_basis_products",
    "truncation_certificate",
    "warn_residual",
]
