"""One side's GLoRA state, and a stack's (internal; the public entries are in aggregate.py).

:func:`side_state` computes the certified state of one side (left: the B's column spaces;
right: the transpose problem) of one module by the Gram route where it applies, else the
general route; :func:`stacked_state` does the same for a stack of same-shape modules in
batched kernels, redoing odd modules one by one. Both take checked inputs from
:func:`glora_math.glora_aggregate` and :func:`glora_math.glora_aggregate_stack`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from glora_math.batched import stacked_route
from glora_math.certificate import (
    GramParts,
    as_certificate,
    certify_norms,
    combined_certificate,
    estimate_norms,
    estimated_certificate,
    gram_certificates,
    residual_curve,
)
from glora_math.certificate import certify as certificate_of
from glora_math.consensus import consensus, eigengap, live_clients, stacked_weights
from glora_math.errors import (
    GloraError,
    GloraWarning,
    RankClampedWarning,
    ZeroEigengapWarning,
)
from glora_math.gauge import gauge_fix_all
from glora_math.implicit import GramCache, implicit_state
from glora_math.linalg import scaled_fro_norm
from glora_math.tolerances import zero_gap_tol
from glora_math.types import Certificate, GaugeMode, LoRAFactors, ServerState, Sketch
from glora_math.validation import (
    ClientsInfo,
    as_factors,
)

#: How client bases are computed: the rule (``"auto"``), or one route forced.
Route = Literal["auto", "gram", "householder"]


def transposed(factors: Sequence[LoRAFactors]) -> list[LoRAFactors]:
    """The transpose problem: ``(A_i^T, B_i^T)``, whose update is ``W_bar^T``."""
    out = []
    for i, f in enumerate(factors):
        c = as_factors(f, i)
        out.append(LoRAFactors(c.A.mT, c.B.mT))
    return out


def _probe_generator(sketch: Sketch) -> torch.Generator:
    """The probes' generator: seeded by the sketch's seed, apart from its test matrix's."""
    return torch.Generator().manual_seed(sketch.seed + 1)


def side_certificate(
    fs: Sequence[LoRAFactors],
    p: Tensor,
    U: Tensor,
    S: Tensor,
    wd: torch.dtype,
    *,
    sketch: Sketch | None,
) -> Certificate:
    """The exact certificate, or the sketch's randomized estimate where it asks for one."""
    if sketch is None or sketch.certificate == "exact":
        return certificate_of(fs, p, U, S, wd)
    x, s2 = estimate_norms(fs, p, U, S, wd, probes=sketch.probes,
                           generator=_probe_generator(sketch))  # fmt: skip
    return estimated_certificate(float(x), float(s2), sketch.probes, sketch.confidence)


def stack_certificates(
    stacked: Sequence[LoRAFactors],
    p: Tensor,
    U: Tensor,
    S: Tensor,
    wd: torch.dtype,
    *,
    sketch: Sketch | None,
    gram: tuple[GramParts | None, Tensor, int] | None = None,
) -> tuple[tuple[Certificate, ...], Certificate]:
    """Each module's certificate and the stack's total, exact or (sketch) estimated.

    ``gram`` is the batched Gram route's certificate parts (P16), which modules they are valid
    for (the uniform ones) and the term count of the tolerance; modules without an accepted
    Gram certificate get the QR certificate, in one batched QR over those modules.
    """
    if sketch is not None and sketch.certificate == "estimate":
        # the same probes for every module: their sum estimates the stack's total
        xs, s2s = estimate_norms(stacked, p, U, S, wd, probes=sketch.probes,
                                 generator=_probe_generator(sketch))  # fmt: skip
        certs = tuple(estimated_certificate(x, s2, sketch.probes, sketch.confidence)
                      for x, s2 in zip(xs.tolist(), s2s.tolist(), strict=True))  # fmt: skip
        total = estimated_certificate(float(xs.sum()), float(s2s.sum()), sketch.probes,
                                      sketch.confidence)  # fmt: skip
        return certs, total
    found: list[Certificate | None] = [None] * int(U.shape[0])
    parts = None if gram is None else gram[0]
    if gram is not None and parts is not None:
        _, valid, n = gram
        got = gram_certificates(parts, scaled_fro_norm(S.to(torch.float64)), wd, n)
        found = [ct if ok else None for ct, ok in zip(got, valid.tolist(), strict=True)]
    todo = [i for i, ct in enumerate(found) if ct is None]
    if todo:
        idx = torch.tensor(todo, device=U.device)
        sub = [LoRAFactors(f.B[idx], f.A[idx]) for f in stacked]
        nums, means = certify_norms(sub, p, U[idx], S[idx], wd)  # one batched QR
        for i, a, b in zip(todo, nums.tolist(), means.tolist(), strict=True):
            found[i] = as_certificate(a, b)
    certs = tuple(ct for ct in found if ct is not None)
    return certs, combined_certificate(certs)


def side_state(  # noqa: PLR0917 - private, called once with every setting of the public call
    factors: Sequence[LoRAFactors],
    info: ClientsInfo,
    p: Tensor,
    R: int,
    gauge: GaugeMode,
    sketch: Sketch | None,
    side: Literal["left", "right"],
    tol: float | None,
    *,
    certify: bool,
    route: Route = "auto",
    grams: GramCache | None = None,
) -> ServerState:
    """The certified state of one side; ``tol`` set means the auto-rank rule with cap R.

    ``grams`` holds the raw Gram matrices in the left orientation, shared between the sides.
    """
    fs = [as_factors(f, i) for i, f in enumerate(factors)] if side == "left" else None
    if fs is None:
        fs = transposed(factors)
        info = ClientsInfo(info.k, info.d, info.dtype, info.work_dtype, info.device)
    wd = info.work_dtype
    # A client whose other factor is exactly zero (LoRA's B = 0 start, seen from the right)
    # has a zero update: its basis carries nothing and would only dilute the consensus. The
    # left side's svd gauge drops such clients by construction; this does it for every route.
    zero = torch.tensor([not bool(f.A.any()) for f in fs], device=p.device)
    p_side = p.masked_fill(zero, 0.0) if bool(zero.any()) and not bool(zero.all()) else p
    with warnings.catch_warnings():
        if tol is not None:  # the cap is reached through the clamp by design; its gap is moot
            warnings.simplefilter("ignore", GloraWarning)
        try_gram = gauge == "qr" and route != "householder"
        view = grams if grams is None or side == "left" else grams.flipped()
        fast = None
        if try_gram:
            fast = implicit_state(fs, info, p_side, R, sketch, certify=certify and tol is None,
                                  grams=view)  # fmt: skip
        if fast is None and route == "gram":
            raise GloraError(
                f"route='gram' is not accurate for these clients ({info.work_dtype}: it needs "
                "float32 or half factors, every client's kept part conditioned within "
                "gram_basis_accurate, a non-zero update, and a sketch narrower than the clients' "
                "span); use route='auto'"
            )
        U, S, eigvals, gap, parts = fast or (
            *general_state(fs, info, p_side, R, gauge=gauge, sketch=sketch),
            None,
        )
    cert = None
    if parts is not None:  # the Gram route's certificate, where its bound is tight enough (P16)
        n = info.d + info.k + sum(f.rank for f in fs)
        cert = gram_certificates(parts, scaled_fro_norm(S.to(torch.float64)), wd, n)[0]
    if certify and cert is None:
        cert = side_certificate(fs, p, U, S, wd, sketch=sketch)
    if tol is not None:
        assert cert is not None  # checked at the boundary: rank="auto" needs the certificate
        meets = torch.nonzero(residual_curve(S, cert.mean_norm) <= tol * tol)
        chosen = int(meets[0]) if meets.numel() else int(U.shape[1])
        # The curve subtracts squared norms; confirm with the certificate (direct where the
        # difference loses digits) and step up while it misses the target.
        while True:
            cert = certificate_of(fs, p, U[:, :chosen], S[:chosen], wd)
            if cert.relative_residual <= tol or chosen >= int(U.shape[1]):
                break
            chosen += 1
        U, S = U[:, :chosen], S[:chosen]
        gap = eigengap(eigvals, chosen, n=info.d + sum(f.rank for f in fs), stacklevel=2)
    return ServerState(
        U=U,
        S=S,
        eigvals=eigvals,
        gap=gap,
        requested_rank=R,
        weights=p,
        gauge=gauge,
        dtype=info.dtype,
        side=side,
        certificate=cert,
        rank_rule="fixed" if tol is None else "auto",
        tol=tol,
        route="gram" if fast is not None else "householder",
    )


def general_state(
    factors: Sequence[LoRAFactors],
    info: ClientsInfo,
    p: Tensor,
    R: int,
    *,
    gauge: GaugeMode,
    sketch: Sketch | None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(U, S, eigvals, gap)`` through explicit gauge-fixed clients (every mode and dtype)."""
    fixed = gauge_fix_all(factors, info, gauge)
    basis, M = consensus(fixed, p, R, sketch, stacklevel=4)
    U = basis.U
    # S = sum_i p_i (U^T U_i) C_i = (U^T M) [sqrt(p_1) C_1; ...; sqrt(p_N) C_N]: two products.
    live = live_clients(fixed, p)
    if live and U.shape[1] > 0:
        C = torch.cat([fixed[i].C for i in live], dim=0)
        S = (U.mT @ M) @ (C * stacked_weights(fixed, p, live).unsqueeze(-1))
    else:
        S = U.new_zeros((U.shape[1], info.k))
    return U, S, basis.eigvals, basis.gap


def stacked_state(  # noqa: PLR0917 - private, called once by the public operator
    factors: Sequence[LoRAFactors],
    info: ClientsInfo,
    p: Tensor,
    R: int,
    gauge: GaugeMode,
    sketch: Sketch | None,
    side: Literal["left", "right"],
    *,
    certify: bool,
    route: Route = "auto",
    grams: GramCache | None = None,
) -> ServerState:
    """The state of a stack of same-shape modules: batched kernels, odd modules redone.

    ``grams`` shares the raw Gram matrices (left orientation) with the other side's call.

    The qr gauge goes through :func:`glora_math.batched.stacked_route`; modules it cannot
    treat uniformly, modules where some client's other factor is exactly zero (their own
    consensus weights, see :func:`side_state`) and every module of the svd gauge are
    computed by :func:`side_state`, the per-module operator, so each module equals
    ``glora_aggregate`` on its own clients. Warnings of a redone module name it.
    """
    batch = info.batch_shape
    L = math.prod(batch)
    fs = [as_factors(f, i) for i, f in enumerate(factors)]
    d, k, wd = info.d, info.k, info.work_dtype
    cap = max(1, min(d if side == "left" else k, sum(f.rank for f in fs)))
    requested = R
    if R > cap:  # no module can span more: never allocate beyond it
        warnings.warn(
            RankClampedWarning(
                f"server rank R={R} exceeds what the clients can span ({cap}): clamped to {cap}"
            ),
            stacklevel=3,
        )
        R = cap
    flat = [(f.B.reshape(L, d, f.rank), f.A.reshape(L, f.rank, k)) for f in fs]
    n, c = (d, k) if side == "left" else (k, d)
    if side == "left":
        Bs, As = [b for b, _ in flat], [a for _, a in flat]
    else:  # the transpose problem
        Bs, As = [a.mT for _, a in flat], [b.mT for b, _ in flat]
    # Per module, clients whose other factor is exactly zero (see side_state).
    other = [a for _, a in flat] if side == "left" else [b for b, _ in flat]
    zero = torch.stack([~(x.flatten(1) != 0).any(-1) for x in other], dim=1)  # (L, N); rank 0 too
    own_weights = zero.any(-1) & ~zero.all(-1)
    device = p.device
    if gauge == "qr":
        view = grams if grams is None or side == "left" else grams.flipped()
        U, S, eig, uniform, m, taken, parts = stacked_route(
            Bs, As, p, R=R, sketch=sketch, wd=wd, gram=route != "householder", certify=certify,
            grams=view,
        )  # fmt: skip
        if route == "gram" and taken != "gram":
            raise GloraError(
                f"route='gram' is not available for these stacked clients ({wd}); use route='auto'"
            )
        uniform = uniform & ~own_weights.to(uniform.device)
    else:
        parts = None
        m = sum(f.rank for f in fs)
        U = torch.zeros(L, n, R, dtype=wd, device=device)
        S = torch.zeros(L, R, c, dtype=wd, device=device)
        eig = torch.zeros(L, 0, dtype=wd, device=device)
        uniform = torch.zeros(L, dtype=torch.bool, device=device)
        taken = "householder"
    nxt = eig[..., R] if R < eig.shape[-1] else torch.zeros(L, dtype=wd, device=device)
    gaps = eig[..., R - 1] - nxt if R <= eig.shape[-1] else torch.zeros(L, dtype=wd, device=device)
    zero_gap = gaps <= torch.tensor(
        [zero_gap_tol(float(e), n + m, wd) for e in eig[..., 0]] if eig.shape[-1] else [0.0] * L,
        dtype=wd,
        device=device,
    )
    if bool((zero_gap & uniform).any()):
        warnings.warn(
            ZeroEigengapWarning(
                f"consensus eigengap at R={R} is numerically zero: the server subspace is not "
                "unique",
                modules=torch.nonzero(zero_gap & uniform).flatten().tolist(),
            ),
            stacklevel=3,
        )
    redo = torch.nonzero(~uniform).flatten().tolist()
    eig = redo_modules(flat, redo, ClientsInfo(d, k, info.dtype, wd, info.device), p, R,
                        gauge, sketch, side, U=U, S=S, gaps=gaps, eig=eig,
                        route=route)  # fmt: skip
    certs: tuple[Certificate, ...] | None = None
    total: Certificate | None = None
    if certify:
        stacked = [LoRAFactors(B, A) for B, A in zip(Bs, As, strict=True)]
        certs, total = stack_certificates(stacked, p, U, S, wd, sketch=sketch,
                                           gram=(parts, uniform, n + c + m))  # fmt: skip
    return ServerState(
        U=U.reshape(*batch, n, R),
        S=S.reshape(*batch, R, c),
        eigvals=eig.reshape(*batch, eig.shape[-1]),
        gap=float(gaps.min()),
        requested_rank=requested,
        weights=p,
        gauge=gauge,
        dtype=info.dtype,
        side=side,
        certificate=total,
        module_gaps=gaps.reshape(batch),
        module_certificates=certs,
        route=f"stacked-{taken}",
    )


def redo_modules(  # noqa: PLR0917 - private, called once by stacked_state
    flat: Sequence[tuple[Tensor, Tensor]],
    redo: Sequence[int],
    single: ClientsInfo,
    p: Tensor,
    R: int,
    gauge: GaugeMode,
    sketch: Sketch | None,
    side: Literal["left", "right"],
    *,
    U: Tensor,
    S: Tensor,
    gaps: Tensor,
    eig: Tensor,
    route: Route = "auto",
) -> Tensor:
    """Recompute the listed modules with the per-module operator, in place; the spectra.

    Writes each redone module's basis, coordinates (zero beyond its rank) and gap into
    ``U``, ``S`` and ``gaps``; returns the spectra, zero-padded to one width. Warnings of a
    redone module are re-emitted naming it.
    """
    eig_rows: dict[int, Tensor] = {}
    for layer in redo:
        mods = [LoRAFactors(b[layer], a[layer]) for b, a in flat]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            st = side_state(
                mods, single, p, R, gauge, sketch, side, None, certify=False, route=route
            )
        for w in caught:
            msg = w.message
            if isinstance(msg, GloraWarning):
                # From here: stacked_state, glora_aggregate, then the caller.
                warnings.warn(msg.located([layer]), stacklevel=4)
            elif isinstance(msg, Warning):
                warnings.warn(msg, stacklevel=4)
        U[layer] = 0.0
        S[layer] = 0.0
        U[layer, :, : st.rank] = st.U
        S[layer, : st.rank] = st.S
        gaps[layer] = st.gap
        eig_rows[layer] = st.eigvals
    if not eig_rows:
        return eig
    width = max([int(eig.shape[-1])] + [int(e.numel()) for e in eig_rows.values()])
    padded = eig.new_zeros((int(eig.shape[0]), width))
    padded[:, : eig.shape[-1]] = eig
    for layer, e in eig_rows.items():
        padded[layer] = 0.0
        padded[layer, : e.numel()] = e
    return padded


__all__ = ["Route", "side_state", "stack_certificates", "stacked_state", "transposed"]
