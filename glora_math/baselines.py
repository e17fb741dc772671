"""Baseline federated-LoRA aggregation rules as pure functions of client factors.

Each function takes client factors (scale folded in) and weights, and returns factors (and,
where the method is dense by definition, a dense residual). The registry
(:mod:`glora_math.operators`) wraps them behind one interface with declared guarantees.
Weights are renormalised as everywhere (:func:`glora_math.validation.normalize_weights`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from glora_math.errors import OptionError, ProtocolError, ShapeMismatchError
from glora_math.linalg import lowrank_fro_norm, lowrank_svd, sign_fixed_svd
from glora_math.metrics import mean_update
from glora_math.scaling import balanced_power, shift, times_pow2
from glora_math.tolerances import comfortable_band
from glora_math.types import LoRAFactors, Split
from glora_math.validation import (
    ClientsInfo,
    ValidatedClients,
    WeightsLike,
    normalize_weights,
    permuted,
    validate_clients,
    validate_rank,
)

Layout = Literal["out_in", "in_out"]


def _prepare(
    factors: Sequence[LoRAFactors], weights: WeightsLike
) -> tuple[ClientsInfo, Tensor, ValidatedClients]:
    """Validate once; the weights normalised; the factors in the working dtype (still valid)."""
    info = validate_clients(factors)
    p = normalize_weights(weights, len(factors), dtype=info.work_dtype, device=info.device)
    wd = info.work_dtype
    work = [LoRAFactors(f.B.to(wd), f.A.to(wd)) for f in factors]
    return info, p, ValidatedClients(work, dataclasses.replace(info, dtype=wd))


def _require_equal_ranks(factors: Sequence[LoRAFactors], method: str) -> int:
    r0 = factors[0].rank
    for i, f in enumerate(factors):
        if f.rank != r0:
            raise ShapeMismatchError(
                f"{method} needs equal ranks: rank {f.rank} differs from client 0's {r0}", client=i
            )
    return r0


def _weighted_sum(p: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """``sum_i p_i x_i``, accumulated in place: one read of each x_i, one output written.

    (Stacking the x's first would write a copy of all of them: N times the output's memory.)
    """
    w: list[float] = p.tolist()
    out = xs[0] * w[0]
    for wi, x in zip(w[1:], xs[1:], strict=True):
        out.add_(x, alpha=wi)
    return out


def _cast(f: LoRAFactors, dtype: torch.dtype) -> LoRAFactors:
    return LoRAFactors(f.B.to(dtype), f.A.to(dtype))


def fedit(factors: Sequence[LoRAFactors], weights: WeightsLike = None) -> LoRAFactors:
    """FedIT (arXiv 2305.05644): ``(sum_i p_i B_i, sum_i p_i A_i)``, in the clients' dtype.

    Its product is not the mean update (SPEC P7) and it is not invariant under per-client
    gauges; it is equivariant under a gauge common to all clients.

    Raises
    ------
    ShapeMismatchError
        If client ranks differ (FedIT has no rule for heterogeneous ranks).
    """
    info, p, fs = _prepare(factors, weights)
    _require_equal_ranks(fs, "FedIT")
    out = LoRAFactors(_weighted_sum(p, [f.B for f in fs]), _weighted_sum(p, [f.A for f in fs]))
    return _cast(out, info.dtype)


def ffa_lora(factors: Sequence[LoRAFactors], weights: WeightsLike = None) -> LoRAFactors:
    """FFA-LoRA (arXiv 2403.12313): A is frozen and shared; average B only. Exact.

    ``sum_i p_i B_i A = (sum_i p_i B_i) A``.

    Raises
    ------
    ProtocolError
        If a client's A differs from client 0's (A must be the shared, frozen matrix).
    """
    info, p, fs = _prepare(factors, weights)
    _require_equal_ranks(fs, "FFA-LoRA")
    A0 = fs[0].A
    for i, f in enumerate(fs):
        if not torch.equal(f.A, A0):
            raise ProtocolError(
                "A differs from client 0's; FFA-LoRA requires the frozen, shared A", client=i
            )
    return _cast(LoRAFactors(_weighted_sum(p, [f.B for f in fs]), A0), info.dtype)


def rolora(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    trained: Literal["A", "B"],
) -> LoRAFactors:
    """RoLoRA (arXiv 2409.02346): average the factor the clients trained this round. Exact.

    RoLoRA alternates: in one round every client keeps A frozen at the shared value and trains
    B, in the next it keeps B frozen and trains A. With the frozen factor shared, averaging
    the trained one is the exact mean: ``sum_i p_i B_i A = (sum_i p_i B_i) A`` (and the same
    for A).

    Raises
    ------
    ProtocolError
        If a client's frozen factor differs from client 0's.
    """
    info, p, fs = _prepare(factors, weights)
    _require_equal_ranks(fs, "RoLoRA")
    if trained not in ("A", "B"):
        raise OptionError(f"trained must be 'A' or 'B', got {trained!r}")
    frozen = "A" if trained == "B" else "B"
    # Training A with B frozen is training B with A frozen on the transposed problem.
    sides = [(f.B, f.A) if trained == "B" else (f.A.mT, f.B.mT) for f in fs]
    shared = sides[0][1]
    for i, (_, fixed) in enumerate(sides):
        if not torch.equal(fixed, shared):
            raise ProtocolError(
                f"{frozen} differs from client 0's; this RoLoRA round freezes {frozen}", client=i
            )
    avg = _weighted_sum(p, [t for t, _ in sides])
    out = LoRAFactors(avg, shared) if trained == "B" else LoRAFactors(shared.mT, avg.mT)
    return _cast(out, info.dtype)


def fedsa_lora(
    factors: Sequence[LoRAFactors], weights: WeightsLike = None
) -> tuple[Float[Tensor, "r k"], list[LoRAFactors]]:
    """FedSA-LoRA (arXiv 2410.01463): share the average of A, keep each client's B personal.

    Returns the shared ``A_bar = sum_i p_i A_i`` and each client's next factors ``(B_i, A_bar)``.
    """
    info, p, fs = _prepare(factors, weights)
    _require_equal_ranks(fs, "FedSA-LoRA")
    A_bar = _weighted_sum(p, [f.A for f in fs])
    per_client = [_cast(LoRAFactors(f.B, A_bar), info.dtype) for f in fs]
    return A_bar.to(info.dtype), per_client


def fedex_lora(
    factors: Sequence[LoRAFactors], weights: WeightsLike = None, *, layout: Layout = "out_in"
) -> tuple[LoRAFactors, Tensor]:
    """FedEx-LoRA (arXiv 2410.09432): FedIT factors plus the exact residual, folded into W0.

    The residual ``W_bar - B_bar A_bar`` is dense (d-by-k) by definition. It is returned in the
    **base weight's own layout**: ``"out_in"`` for ``torch.nn.Linear`` (weight ``(d, k)`` =
    ``(out_features, in_features)``, update ``B A``), ``"in_out"`` for transposed layers such as
    GPT-2's ``Conv1D`` (peft's ``fan_in_fan_out=True``; weight ``(k, d)``). FedEx's public code
    adds the transposed residual, which is wrong for ``nn.Linear``.

    Returns
    -------
    (factors, residual)
        ``(B_bar, A_bar)`` in the clients' dtype and the residual in the working dtype.
    """
    info, p, fs = _prepare(factors, weights)
    _require_equal_ranks(fs, "FedEx-LoRA")
    avg = LoRAFactors(_weighted_sum(p, [f.B for f in fs]), _weighted_sum(p, [f.A for f in fs]))
    mean = mean_update(fs, p)
    residual = mean.B @ mean.A - avg.B @ avg.A
    if layout == "in_out":
        residual = residual.mT.contiguous()
    elif layout != "out_in":
        raise OptionError(f"unknown layout {layout!r}; expected 'out_in' or 'in_out'")
    return _cast(avg, info.dtype), residual


def flora_stack(factors: Sequence[LoRAFactors], weights: WeightsLike = None) -> LoRAFactors:
    """FLoRA (arXiv 2409.05976): stack ``[B_1 ... B_N]`` and ``[p_1 A_1; ...; p_N A_N]``.

    The product is exactly the mean update, of rank up to ``sum_i r_i``; the server merges it
    into the base weight and clients re-initialise their adapters. Ranks may differ.
    """
    info, p, fs = _prepare(factors, weights)
    B = torch.cat([f.B for f in fs], dim=1)
    A = torch.cat([p[i] * f.A for i, f in enumerate(fs)], dim=0)
    return _cast(LoRAFactors(B, A), info.dtype)


def svd_of_mean(
    factors: Sequence[LoRAFactors], weights: WeightsLike = None, *, rank: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets of the mean update, from the factors (working dtype).

    ``W_bar = [p_i B_i] [A_i]``: thin QR of the stacked left factor, SVD of the small
    ``(sum r_i)``-by-k core. Never forms ``W_bar``: O(d (sum r_i)^2 + (sum r_i)^2 k).
    """
    R = validate_rank(rank)
    U, s, Vh = spectrum_of_mean(factors, weights)
    return U[:, :R], s[:R], Vh[:R]


def spectrum_of_mean(
    factors: Sequence[LoRAFactors], weights: WeightsLike = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Every singular triplet of the mean update (``p = min(d, sum r_i, k)`` of them).

    The route of :func:`svd_of_mean`, untruncated: ``s`` holds the whole spectrum of
    ``W_bar`` (its rank is at most ``p``), so ``||s|| = ||W_bar||_F`` and the error of the
    rank-R truncation is ``||s[R:]||`` (Eckart-Young, :func:`~glora_math.certificate.
    truncation_certificate`).
    """
    _, p, fs = _prepare(factors, weights)
    mean = mean_update(fs, p)
    return lowrank_svd(mean.B, mean.A)


def truncate_svd(
    U: Tensor,
    s: Tensor,
    Vh: Tensor,
    rank: int,
    dtype: torch.dtype,
    *,
    split: Split = "balanced",
) -> LoRAFactors:
    """Rank-``rank`` factors of ``U diag(s) Vh``, zero-padded if short.

    ``split="balanced"``: ``(U_r sqrt(s_r), sqrt(s_r) Vh_r)``; ``"left"``: ``(U_r s_r, Vh_r)``
    (all singular values in B, A with orthonormal rows: FlexLoRA's published code);
    ``"right"``: ``(U_r, s_r Vh_r)`` (B with orthonormal columns). The three have one product.
    """
    r = validate_rank(rank)
    rr = min(r, int(s.numel()))
    if split == "balanced":
        root = s[:rr].sqrt()
        B = U[:, :rr] * root
        A = Vh[:rr] * root[:, None]
    elif split == "left":
        B = U[:, :rr] * s[:rr]
        A = Vh[:rr]
    elif split == "right":
        B = U[:, :rr]
        A = Vh[:rr] * s[:rr, None]
    else:
        raise OptionError(f"split must be 'balanced', 'left' or 'right', got {split!r}")
    if rr < r:
        B = torch.cat([B, B.new_zeros((B.shape[0], r - rr))], dim=1)
        A = torch.cat([A, A.new_zeros((r - rr, A.shape[1]))], dim=0)
    return LoRAFactors(B.to(dtype), A.to(dtype))


def flexlora(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    client_ranks: Sequence[int] | None = None,
    split: Literal["balanced", "left"] = "left",
) -> list[LoRAFactors]:
    """FlexLoRA (arXiv 2402.11505): each client gets the best rank-r_i approximation of W_bar.

    Computed from the factors (QR of the stacked factors + small SVD); equal to the dense
    truncated SVD of ``W_bar`` that FlexLoRA's public code computes, without forming it. The
    published code (``fed_utils`` of the FlexLoRA repository: ``torch.svd`` of the aggregated
    dense update, then ``lora_B = U_r S_r / scaling``, ``lora_A = V_r^T``) puts every singular
    value into B: that is ``split="left"``, the default (our factors hold the scale folded
    into B, so the division by ``alpha / r`` is implicit). ``split="balanced"`` shares
    ``sqrt(s)`` between the factors; the products are the same.
    """
    info = validate_clients(factors)
    ranks = [f.rank for f in factors] if client_ranks is None else list(client_ranks)
    U, s, Vh = svd_of_mean(factors, weights, rank=max(validate_rank(r) for r in ranks))
    return [truncate_svd(U, s, Vh, r, info.dtype, split=split) for r in ranks]


def hetlora(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    client_ranks: Sequence[int] | None = None,
    norm_weighted: bool = False,
) -> tuple[LoRAFactors, list[LoRAFactors]]:
    """HetLoRA (arXiv 2401.06432): zero-pad to the largest rank, average, truncate.

    The public zero-padding codes average the padded factors with the plain client weights
    ``p_i`` (the default). ``norm_weighted=True`` uses the paper's sparsity-weighted rule,
    ``p_i ||B_i A_i||_F`` renormalised (with equal ``p`` the update norms). Client i receives
    the first ``r_i`` columns of B and rows of A.

    Returns
    -------
    (global, per_client)
        The padded global factors (rank ``max r_i``) and each client's truncation.
    """
    info, p, fs = _prepare(factors, weights)
    rmax = max(f.rank for f in fs)
    w = p
    if norm_weighted:
        norms = torch.tensor(
            [lowrank_fro_norm(f.B, f.A) for f in fs], dtype=p.dtype, device=p.device
        )  # ||B_i A_i||_F from the factors
        w = p * norms
        if float(w.sum()) == 0.0:  # every update is zero: fall back to the plain weights
            w = p
        w = w / w.sum()
    Bs = [torch.cat([f.B, f.B.new_zeros((f.B.shape[0], rmax - f.rank))], 1) for f in fs]
    As = [torch.cat([f.A, f.A.new_zeros((rmax - f.rank, f.A.shape[1]))], 0) for f in fs]
    glob = LoRAFactors(_weighted_sum(w, Bs), _weighted_sum(w, As))
    ranks = [f.rank for f in fs] if client_ranks is None else list(client_ranks)
    per = []
    for i, want in enumerate(ranks):
        r = validate_rank(want)
        if r > rmax:
            raise ShapeMismatchError(f"requested rank {r} exceeds the padded rank {rmax}", client=i)
        per.append(_cast(LoRAFactors(glob.B[:, :r], glob.A[:r]), info.dtype))
    return _cast(glob, info.dtype), per


def procrustes(X: Float[Tensor, "r r"], *, special: bool = False) -> Float[Tensor, "r r"]:
    """Orthogonal polar factor ``U V^T`` of ``X = U diag(s) V^T``.

    It maximises ``tr(R^T X)`` over O(r) (orthogonal Procrustes). With ``special=True`` the
    maximiser over SO(r) is returned (Kabsch: flip the last singular direction if
    ``det(U V^T) < 0``).
    """
    U, _, Vh = sign_fixed_svd(X)
    R = U @ Vh
    if special and float(torch.linalg.det(R)) < 0:
        U = U.clone()
        U[:, -1] = -U[:, -1]
        R = U @ Vh
    return R


def fedrot_rotation(
    client: LoRAFactors, reference: LoRAFactors, *, align: Literal["A", "B"], lam: float = 1.0
) -> Tensor:
    """FedRot-LoRA's rotation for one client (arXiv 2602.23638).

    ``align="A"``: ``R* = polar(A_i A_ref^T)`` minimises ``||R^T A_i - A_ref||_F`` over O(r);
    ``align="B"``: ``R* = polar(B_i^T B_ref)`` minimises ``||B_i R - B_ref||_F``. Soft alignment
    ``lam < 1``: ``R = polar((1 - lam) I + lam R*)`` with ``R*`` restricted to SO(r), which
    satisfies ``||R - I||_F <= 2 lam ||R* - I||_F`` (SPEC P9). ``lam = 1`` returns ``R*`` in O(r).
    """
    if not 0.0 <= lam <= 1.0:
        raise OptionError(f"alignment strength must be in [0, 1], got {lam}")
    if align == "A":
        M = client.A @ reference.A.mT
    elif align == "B":
        M = client.B.mT @ reference.B
    else:
        raise OptionError(f"align must be 'A' or 'B', got {align!r}")
    if lam == 1.0:
        return procrustes(M)
    Rstar = procrustes(M, special=True)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return procrustes((1.0 - lam) * eye + lam * Rstar, special=True)


def fedrot_lora(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    reference: LoRAFactors | None,
    round_index: int,
    lam: float = 1.0,
    first: Literal["A", "B"] = "A",
) -> tuple[LoRAFactors, list[LoRAFactors]]:
    """FedRot-LoRA: rotate each client towards the reference factors, then average (FedIT).

    ``reference`` is the previous round's global factors; ``None`` (round 1) means no
    alignment. The aligned side alternates, starting with ``first`` in the first aligned round
    (``round_index`` 2, counted from 1): the published code and its GLUE config
    (``initialshare: "A"``) align A first, the default; ``first="B"`` is the other order.
    Each rotation preserves the client's product ``B_i A_i`` exactly.

    Returns
    -------
    (global, aligned)
        The averaged factors and the aligned client factors (working dtype).
    """
    info, p, fs = _prepare(factors, weights)
    r = _require_equal_ranks(fs, "FedRot-LoRA")
    aligned: list[LoRAFactors] = list(fs)
    if reference is not None:
        if reference.rank != r or reference.shape != (info.d, info.k):
            raise ShapeMismatchError(
                f"reference factors {tuple(reference.B.shape)}x{tuple(reference.A.shape)} do not "
                f"match the clients' rank {r} and shape {(info.d, info.k)}"
            )
        ref = LoRAFactors(reference.B.to(info.work_dtype), reference.A.to(info.work_dtype))
        side = aligned_side(round_index, first)
        aligned = []
        for f in fs:
            R = fedrot_rotation(f, ref, align=side, lam=lam)
            aligned.append(LoRAFactors(f.B @ R, R.mT @ f.A))
    glob = LoRAFactors(
        _weighted_sum(p, [f.B for f in aligned]), _weighted_sum(p, [f.A for f in aligned])
    )
    return _cast(glob, info.dtype), aligned


def aligned_side(round_index: int, first: Literal["A", "B"] = "A") -> Literal["A", "B"]:
    """FedRot-LoRA's aligned factor in round ``round_index`` (from 1; round 2 aligns ``first``)."""
    if first not in ("A", "B"):
        raise OptionError(f"first must be 'A' or 'B', got {first!r}")
    other: Literal["A", "B"] = "B" if first == "A" else "A"
    return first if round_index % 2 == 0 else other


def _content_key(p: Tensor, fs: Sequence[LoRAFactors], i: int) -> tuple[float, ...]:
    """A key that orders clients by weight and content, not by their position."""
    f = fs[i]
    return (
        float(p[i]),
        float(f.B.sum()),
        float(f.A.sum()),
        float((f.B * f.B).sum()),
        float((f.A * f.A).sum()),
    )


@dataclass(frozen=True)
class FairProblem:
    """LoRA-FAIR's discrepancy as functions of the correction ``dB``, from factors only.

    With ``W_bar = sum_i p_i B_i A_i``, FedIT's ``(B_bar, A_bar)`` and ``B' = B_bar + dB``:

        f(dB) = 1 - <W_bar, B' A_bar> / (||W_bar|| ||B' A_bar||) + lam ||dB||^2 / ||B_bar||^2

    Everything needs ``M = W_bar A_bar^T`` (d by r, once), ``G = A_bar A_bar^T`` (r by r, once)
    and ``||W_bar||``: ``<W_bar, B' A_bar> = <B', M>``, ``||B' A_bar||^2 = tr(B'^T B' G)``.
    """

    M: Tensor
    G: Tensor
    B_bar: Tensor
    w_norm: float
    lam: float

    def value_and_grad(self, dB: Tensor) -> tuple[float, Tensor]:
        """``f(dB)`` and its gradient, O(d r^2)."""
        Bp = self.B_bar + dB
        BG = Bp @ self.G
        y2 = float((Bp * BG).sum())  # ||B' A_bar||^2
        inner = float((Bp * self.M).sum())  # <W_bar, B' A_bar>
        scale = float((self.B_bar * self.B_bar).sum()) or 1.0
        if y2 <= 0.0 or self.w_norm == 0.0:
            return 1.0 + self.lam * float((dB * dB).sum()) / scale, 2 * self.lam * dB / scale
        y = math.sqrt(y2)
        cos = inner / (self.w_norm * y)
        grad_cos = self.M / (self.w_norm * y) - (inner / (self.w_norm * y**3)) * BG
        value = 1.0 - cos + self.lam * float((dB * dB).sum()) / scale
        return value, -grad_cos + 2 * self.lam * dB / scale


def lora_fair(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    lam: float = 0.01,
    steps: int = 50,
) -> tuple[LoRAFactors, float, float]:
    """LoRA-FAIR (arXiv 2411.14961), **labelled reconstruction**: FedIT plus a correction of B.

    The server averages the factors (FedIT) and refines ``B_bar`` by a correction ``dB`` that
    minimises a similarity discrepancy to the exact mean update, regularised towards FedIT:
    ``1 - cos(W_bar, (B_bar + dB) A_bar) + lam ||dB||^2 / ||B_bar||^2`` (:class:`FairProblem`).
    Clients start the next round from ``(B_bar + dB, A_bar)``. The paper's similarity
    ``S`` is a cosine-type similarity of the two updates with ``lam = 0.01``; we use the
    Frobenius cosine (scale-free, like the paper's) and normalise the penalty by
    ``||B_bar||^2`` so that ``lam`` means the same for any scale of the factors.
    Minimised by ``steps`` gradient steps with Armijo backtracking (the objective never
    increases): the first trial step is 1; a step ``t`` is accepted when the value falls by at
    least ``1e-4 t ||grad||^2``, halved until it is (the search stops below ``1e-12``), and
    doubled after each accepted step. Everything is computed from the factors: O(N r^2 (d + k))
    once, then O(d r^2) per step; the published code forms the d-by-k updates (O(T d^2 r)).

    Returns
    -------
    (factors, before, after)
        ``(B_bar + dB, A_bar)`` and the discrepancy at ``dB = 0`` and at the solution.
    """
    info, p, fs = _prepare(factors, weights)
    _require_equal_ranks(fs, "LoRA-FAIR")
    if not (math.isfinite(lam) and lam >= 0.0) or steps < 0:
        raise OptionError(f"lam must be >= 0 and steps >= 0, got {lam}, {steps}")
    # The line search branches on comparisons, so rounding differences from the order of the
    # sums could change its path: sum the clients in a canonical order (by weight and
    # content), which makes the result exactly invariant to the clients' order.
    order = sorted(range(len(fs)), key=lambda i: _content_key(p, fs, i))
    fs, p = permuted(fs, p, order)
    B_bar = _weighted_sum(p, [f.B for f in fs])
    A_bar = _weighted_sum(p, [f.A for f in fs])
    # M = W_bar A_bar^T = sum_i p_i B_i (A_i A_bar^T): one small product per client.
    M = _weighted_sum(p, [f.B @ (f.A @ A_bar.mT) for f in fs])
    mean = mean_update(fs, p)
    problem = FairProblem(M, A_bar @ A_bar.mT, B_bar, lowrank_fro_norm(mean.B, mean.A), lam)
    dB = torch.zeros_like(B_bar)
    value, grad = problem.value_and_grad(dB)
    before = value
    step = 1.0
    for _ in range(steps):
        g2 = float((grad * grad).sum())
        if g2 == 0.0:
            break
        while step > 1e-12:  # Armijo backtracking: a sufficient decrease, never an increase
            trial = dB - step * grad
            new_value, new_grad = problem.value_and_grad(trial)
            if new_value <= value - 1e-4 * step * g2:
                break
            step *= 0.5
        else:
            break
        dB, value, grad = trial, new_value, new_grad
        step *= 2.0
    return _cast(LoRAFactors(B_bar + dB, A_bar), info.dtype), before, value


def _balanced(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """``(B 2^k, A 2^-k)``, the same product with both factors' largest entries near each other.

    Only where one of them lies outside the dtype's comfortable band (where ``B^T B`` or
    ``A A^T`` would under- or overflow); otherwise ``(B, A)`` unchanged, bit for bit. A scalar
    gauge: ALS from it gives the same products (each step is equivariant under it).
    """
    lo, hi = comfortable_band(B.dtype)
    b = float(B.abs().max()) if B.numel() else 0.0
    a = float(A.abs().max()) if A.numel() else 0.0
    if b == 0.0 or a == 0.0 or (lo <= b <= hi and lo <= a <= hi):
        return B, A
    k = (math.frexp(a)[1] - math.frexp(b)[1]) // 2
    return torch.ldexp(B, torch.tensor(float(k), dtype=B.dtype)), torch.ldexp(
        A, torch.tensor(float(-k), dtype=A.dtype)
    )


def flora_na(
    factors: Sequence[LoRAFactors], weights: WeightsLike = None, *, steps: int = 3
) -> LoRAFactors:
    """FLoRA-NA (arXiv 2509.26399), **reconstruction**: server-side estimate of (B_hat, A_hat).

    The paper's estimator is not public. This labelled reconstruction starts from FedIT's
    ``(B_bar, A_bar)`` and takes ``steps`` alternating least-squares steps on
    ``||W_bar - B_hat A_hat||_F``, each computed from factor products only:
    ``A_hat = (B_hat^T B_hat)^+ sum_i p_i (B_hat^T B_i) A_i`` and
    ``B_hat = sum_i p_i B_i (A_i A_hat^T) (A_hat A_hat^T)^+``. Clients receive factors of the
    usual size (vanilla communication). The error never exceeds FedIT's (ALS is monotone).
    """
    info, p, fs = _prepare(factors, weights)
    _require_equal_ranks(fs, "FLoRA-NA")
    if steps < 0:
        raise OptionError(f"steps must be >= 0, got {steps}")
    # Every step is homogeneous in the B_i and in the A_i: near the ends of the dtype's range
    # (where B^T B would under- or overflow) it runs at unit scale, exactly rescaled.
    kb, ka = shift(fs, info.work_dtype)
    units = [LoRAFactors(times_pow2(f.B, -kb), times_pow2(f.A, -ka)) for f in fs]
    B = _weighted_sum(p, [f.B for f in units])
    A = _weighted_sum(p, [f.A for f in units])
    B, A = _balanced(B, A)
    for _ in range(steps):
        rhs = sum((p[i] * ((B.mT @ f.B) @ f.A) for i, f in enumerate(units)), torch.zeros_like(A))
        A = torch.linalg.pinv(B.mT @ B, hermitian=True) @ rhs
        rhs_b = sum((p[i] * (f.B @ (f.A @ A.mT)) for i, f in enumerate(units)), torch.zeros_like(B))
        B = rhs_b @ torch.linalg.pinv(A @ A.mT, hermitian=True)
    # Back to the clients' scale, the power of 2 split so that B and A end balanced (the
    # binary exponents of their largest entries at most 1 apart): the product is exact, and
    # neither factor over- or underflows where the update fits (ALS can end far from the
    # clients' split).
    t, x = kb + ka, 0
    if (kb, ka) != (0, 0):
        x = balanced_power(B, A, t)
    return _cast(LoRAFactors(times_pow2(B, x), times_pow2(A, t - x)), info.dtype)


__all__ = [
    "Layout",
    "aligned_side",
    "fedex_lora",
    "fedit",
    "fedrot_lora",
    "fedrot_rotation",
    "fedsa_lora",
    "ffa_lora",
    "flexlora",
    "flora_na",
    "flora_stack",
    "hetlora",
    "lora_fair",
    "procrustes",
    "rolora",
    "spectrum_of_mean",
    "svd_of_mean",
    "truncate_svd",
]
