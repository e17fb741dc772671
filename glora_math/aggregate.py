"""The GLoRA aggregation operator (SPEC, GLoRA steps 1-3; arXiv 2605.06733, reconstructed).

Per client: gauge-fix ``B_i A_i = U_i C_i``. Consensus: ``U_ref = TopEig_R(sum_i p_i U_i U_i^T)``.
Shared coordinates: ``S = sum_i p_i (U_ref^T U_i) C_i``. The state ``(U_ref, S)`` represents
``U_ref S = U_ref U_ref^T W_bar``, the projection of the mean update onto the consensus subspace
(P1), and is gauge invariant (P3). Everything is low-rank: nothing d-by-k is formed, and a
d-by-d matrix only when d is below the total client rank (then it is smaller than the factors).

Extensions beyond the paper (ours, SPEC "Extensions"): the consensus of the clients' row
spaces (``side="right"``, the transpose problem: ``W_bar V_ref V_ref^T``), the better of the two
sides by their certified residuals (``side="auto"``), a certificate of the exact error on every
state, and the smallest server rank that meets a certified tolerance (``rank="auto"``).
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
    as_certificate,
    certify_norms,
    estimate_norms,
    estimated_certificate,
    residual_curve,
    warn_residual,
)
from glora_math.certificate import certify as certificate_of
from glora_math.consensus import consensus, eigengap, live_clients, stacked_weights
from glora_math.errors import (
    GloraError,
    GloraWarning,
    NonFiniteError,
    RankClampedWarning,
    ResidualWarning,
    ZeroEigengapWarning,
)
from glora_math.gauge import gauge_fix_all
from glora_math.implicit import implicit_state
from glora_math.scaling import shift as _shift
from glora_math.scaling import times_pow2 as _times_pow2
from glora_math.scaling import unscaled as _unscaled
from glora_math.tolerances import zero_gap_tol
from glora_math.types import Certificate, GaugeMode, LoRAFactors, ServerState, Side, Sketch
from glora_math.validation import (
    KERNEL_ERRORS,
    ClientsInfo,
    WeightsLike,
    as_factors,
    check_finite_output,
    normalize_weights,
    overflow_error,
    validate_clients,
    validate_rank,
)

RankLike = int | Literal["auto"]
#: Errors that mean the working dtype overflowed on validated (finite) input.
_OVERFLOWS: tuple[type[Exception], ...] = (*KERNEL_ERRORS, NonFiniteError)
#: How client bases are computed: the rule (``"auto"``), or one route forced.
Route = Literal["auto", "gram", "householder"]


def glora_aggregate(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    rank: RankLike,
    gauge: GaugeMode = "qr",
    sketch: Sketch | None = None,
    side: Side = "left",
    tol: float | None = None,
    max_residual: float | None = None,
    certify: bool = True,
    route: Route = "auto",
) -> ServerState:
    """Aggregate client LoRA updates into a gauge-invariant low-rank server state.

    Parameters
    ----------
    factors
        N clients' ``LoRAFactors(B_i, A_i)``, B_i ``(d, r_i)``, A_i ``(r_i, k)``; ranks may
        differ. Scales must already be folded into the factors. A stack of same-shape modules
        (B_i ``(L, d, r_i)``, A_i ``(L, r_i, k)``, any leading batch dimensions shared by all
        clients) is aggregated module by module in batched kernels and gives a state with the
        same batch dimensions (see :class:`~glora_math.types.ServerState`); it needs a fixed
        ``side`` and an integer ``rank``.
    weights
        Non-negative weights ``(N,)`` (e.g. sample counts), renormalised to sum 1;
        ``None`` for equal weights. Zero-weight clients drop out.
    rank
        Server rank R (clamped, with a ``RankClampedWarning``, to the dimension spanned by the
        clients), or ``"auto"``: the smallest R whose certified relative residual is at most
        ``tol`` (capped by the clients' total rank, where the residual is zero, P2).
    gauge
        ``"qr"`` or ``"svd"``: see :func:`glora_math.gauge_fix`.
    sketch
        ``None`` for the exact consensus subspace; a :class:`~glora_math.types.Sketch` for the
        randomized one (see :func:`glora_math.consensus_basis`). P1 then holds for the
        subspace the sketch found: the state is still the exact projection of the mean update
        onto its own ``U``. Not with ``rank="auto"``.
    side
        ``"left"`` (the paper's): consensus of the column spaces of the B_i, update
        ``U U^T W_bar``. ``"right"`` (ours): consensus of the row spaces of the A_i, update
        ``W_bar V V^T``. ``"auto"`` (ours): both, keeping the one with the smaller certified
        residual (with ``rank="auto"``: the smaller R, then the smaller residual); ties go
        left. Only the kept side's warnings are emitted.
    tol
        Relative residual target of ``rank="auto"`` (a float in (0, 1)); only with it.
    max_residual
        If given, a :class:`~glora_math.errors.ResidualWarning` is emitted when the certified
        relative residual exceeds it.
    route
        How the client bases are computed (qr gauge): ``"auto"`` (default) takes the Gram
        route (float64 Gram matrices of the raw factors, :mod:`glora_math.implicit`) for
        float32 and half clients where it is accurate, else the Householder route (explicit
        gauge-fixed clients); ``"gram"`` or ``"householder"`` force one (``"gram"`` raises a
        :class:`~glora_math.errors.GloraError` saying why where it is not accurate). The
        route taken is recorded in ``state.route``.
    certify
        Compute the certificate (default). It costs one QR of the stacked weighted left factors
        (d by sum r_i + R); ``False`` skips it for speed-critical calls (``relative_residual``
        is then NaN), and is refused with ``side="auto"``, ``rank="auto"`` or ``max_residual``,
        which decide by it.

    Returns
    -------
    ServerState
        ``U`` ``(d, R)``, ``S`` ``(R, k)`` (right side: ``(k, R)`` and ``(R, d)``), spectrum,
        eigengap and the certificate ``state.relative_residual`` =
        ``||W_bar - update||_F / ||W_bar||_F``; on the left ``U @ S`` equals
        ``U U^T sum_i p_i B_i A_i``.

    Raises
    ------
    EmptyClientsError, ShapeMismatchError, NonFiniteError, DeviceMismatchError, DtypeError,
    WeightError, RankError, GloraError (bad ``side``, ``tol`` or ``max_residual``)

    Cost O(sum_i r_i^2 (d + k) + d (sum_i r_i)^2 + R (d + k) sum_i r_i), twice for
    ``side="auto"``; the certificate adds one QR of the stacked weighted B's.

    For float32 (and half) clients with the ``qr`` gauge, both consensus modes run on the raw
    factors (:mod:`glora_math.implicit`): the client bases come from float64 Gram matrices,
    and neither the Householder QR of each client nor its coordinates ``C_i`` are computed.
    The result is the general route's to rounding (the same subspace; for a sketch, from the
    same test matrix).
    """
    info = validate_clients(factors, stack=True)
    auto, R, target = _rank_rule(rank, tol, sketch, factors)
    _check_modes(side, auto=auto, certify=certify, max_residual=max_residual)
    _check_route(route, gauge)
    limit = None if max_residual is None else _check_fraction(max_residual, "max_residual", 1e300)
    p = normalize_weights(weights, len(factors), dtype=info.work_dtype, device=info.device)
    # Detached views: the math is not differentiable, and autograd would refuse its out= kernels.
    factors = [_detached(as_factors(f, i)) for i, f in enumerate(factors)]
    given = factors
    shift = _shift(factors, info.work_dtype)
    if shift != (0, 0):  # near the ends of the dtype's range: compute at unit scale
        factors = [LoRAFactors(_times_pow2(f.B, -shift[0]), _times_pow2(f.A, -shift[1]))
                   for f in factors]  # fmt: skip
    if info.batch_shape:
        if auto or side == "auto":
            raise GloraError(
                "side='auto' and rank='auto' choose per module, which gives modules states of "
                "different shapes: aggregate a stack with a fixed side and rank, or pass the "
                "modules one by one"
            )
        try:
            stacked = _stacked_state(
                factors, info, p, R, gauge, sketch, side, certify=certify, limit=limit, route=route
            )
        except _OVERFLOWS as err:
            raise _overflow(err, factors) from None
        check_finite_output([stacked.U, stacked.S], factors, "glora_aggregate")
        stacked = _unscaled(stacked, sum(shift))
        check_finite_output([stacked.S], given, "glora_aggregate")
        return stacked
    sides: tuple[Literal["left", "right"], ...] = ("left", "right") if side == "auto" else (side,)
    found: list[tuple[ServerState, list[Warning]]] = []
    try:
        for sd in sides:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                st = _side_state(
                    factors, info, p, R, gauge, sketch, sd, target, certify=certify, route=route
                )
            check_finite_output([st.U, st.S], factors, "glora_aggregate")
            found.append((st, [w.message for w in caught if isinstance(w.message, Warning)]))
    except _OVERFLOWS as err:
        raise _overflow(err, factors) from None
    if auto:  # a side that meets tol first, then the smaller rank, then the smaller residual
        best, notes = min(
            found,
            key=lambda c: (c[0].relative_residual > (target or 0.0), c[0].rank,
                           c[0].relative_residual),
        )  # fmt: skip
    else:
        best, notes = min(found, key=lambda c: c[0].relative_residual)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if auto and best.relative_residual > (target or 0.0):
        warnings.warn(
            ResidualWarning(
                f"rank='auto' could not meet tol={target:.3e}: the certified relative "
                f"residual is {best.relative_residual:.3e} at the largest rank R={best.rank} "
                f"(side={best.side}; rounding in {info.work_dtype} limits it)"
            ),
            stacklevel=2,
        )
    warn_residual(best.relative_residual, limit, f"side={best.side}, R={best.rank}", stacklevel=2)
    best = _unscaled(best, sum(shift))
    check_finite_output([best.S], given, "glora_aggregate")
    return best


def _rank_rule(
    rank: object, tol: object, sketch: Sketch | None, factors: Sequence[LoRAFactors]
) -> tuple[bool, int, float | None]:
    """``(auto, R, tol)``: the auto-rank rule's cap and target, or the fixed rank."""
    if isinstance(rank, str) and rank == "auto":
        target = _check_fraction(tol, "tol")
        if sketch is not None:
            raise GloraError("rank='auto' needs the exact consensus (sketch=None)")
        return True, max(1, sum(as_factors(f, i).rank for i, f in enumerate(factors))), target
    if tol is not None:
        raise GloraError("tol is only used with rank='auto'")
    return False, validate_rank(rank), None


def _detached(f: LoRAFactors) -> LoRAFactors:
    """``f`` without autograd history (views; a copy of nothing)."""
    if not (f.B.requires_grad or f.A.requires_grad):
        return f
    return LoRAFactors(f.B.detach(), f.A.detach())


def _overflow(err: Exception, factors: Sequence[LoRAFactors]) -> NonFiniteError:
    """A typed error naming a client for an overflow inside the operator.

    Inputs are validated finite, so a failed kernel or a non-finite certificate means the
    working dtype overflowed; the client with the largest update is named.
    """
    if isinstance(err, NonFiniteError) and err.client is not None:
        return err
    text = err.message if isinstance(err, NonFiniteError) else f"a kernel failed ({err})"
    return overflow_error(text, factors)


def _check_modes(side: object, *, auto: bool, certify: bool, max_residual: object) -> None:
    """``side`` is known, and the certificate is on wherever a decision depends on it."""
    if not certify and (auto or side == "auto" or max_residual is not None):
        raise GloraError("side='auto', rank='auto' and max_residual decide by the certificate")
    if side not in ("left", "right", "auto"):
        raise GloraError(f"side must be 'left', 'right' or 'auto', got {side!r}")


def _check_route(route: object, gauge: object) -> None:
    """``route`` is known and fits the gauge."""
    if route not in ("auto", "gram", "householder"):
        raise GloraError(f"route must be 'auto', 'gram' or 'householder', got {route!r}")
    if route == "gram" and gauge != "qr":
        raise GloraError("route='gram' computes qr-gauge bases; it needs gauge='qr'")


def _check_fraction(value: object, name: str, upper: float = 1.0) -> float:
    """A float in (0, upper) (tolerances and thresholds), else a typed error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GloraError(f"{name} must be a float in (0, {upper:g}), got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and 0.0 < v < upper):
        raise GloraError(f"{name} must be a float in (0, {upper:g}), got {value!r}")
    return v


def _transposed(factors: Sequence[LoRAFactors]) -> list[LoRAFactors]:
    """The transpose problem: ``(A_i^T, B_i^T)``, whose update is ``W_bar^T``."""
    out = []
    for i, f in enumerate(factors):
        c = as_factors(f, i)
        out.append(LoRAFactors(c.A.mT, c.B.mT))
    return out


def _probe_generator(sketch: Sketch) -> torch.Generator:
    """The probes' generator: seeded by the sketch's seed, apart from its test matrix's."""
    return torch.Generator().manual_seed(sketch.seed + 1)


def _certificate(
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


def _stack_certificates(
    stacked: Sequence[LoRAFactors],
    p: Tensor,
    U: Tensor,
    S: Tensor,
    wd: torch.dtype,
    *,
    sketch: Sketch | None,
) -> tuple[tuple[Certificate, ...], Certificate]:
    """Each module's certificate and the stack's total, exact or (sketch) estimated."""
    if sketch is not None and sketch.certificate == "estimate":
        # the same probes for every module: their sum estimates the stack's total
        xs, s2s = estimate_norms(stacked, p, U, S, wd, probes=sketch.probes,
                                 generator=_probe_generator(sketch))  # fmt: skip
        certs = tuple(estimated_certificate(x, s2, sketch.probes, sketch.confidence)
                      for x, s2 in zip(xs.tolist(), s2s.tolist(), strict=True))  # fmt: skip
        total = estimated_certificate(float(xs.sum()), float(s2s.sum()), sketch.probes,
                                      sketch.confidence)  # fmt: skip
        return certs, total
    nums, means = certify_norms(stacked, p, U, S, wd)  # one batched QR for all modules
    certs = tuple(as_certificate(a, b) for a, b in zip(nums.tolist(), means.tolist(), strict=True))
    sq = sum(ct.mean_norm**2 for ct in certs)
    res = sum(ct.residual**2 for ct in certs)
    return certs, Certificate(math.sqrt(res / sq) if sq > 0 else 0.0, math.sqrt(sq))


def _side_state(  # noqa: PLR0917 - private, called once with every setting of the public call
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
) -> ServerState:
    """The certified state of one side; ``tol`` set means the auto-rank rule with cap R."""
    fs = [as_factors(f, i) for i, f in enumerate(factors)] if side == "left" else None
    if fs is None:
        fs = _transposed(factors)
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
        fast = implicit_state(fs, info, p_side, R, sketch) if try_gram else None
        if fast is None and route == "gram":
            raise GloraError(
                f"route='gram' is not accurate for these clients ({info.work_dtype}: it needs "
                "float32 or half factors, every client's kept part conditioned within "
                "gram_basis_accurate, a non-zero update, and a sketch narrower than the clients' "
                "span); use route='auto'"
            )
        U, S, eigvals, gap = fast or _general_state(fs, info, p_side, R, gauge=gauge, sketch=sketch)
    cert = _certificate(fs, p, U, S, wd, sketch=sketch) if certify else None
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


def _general_state(
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


def _stacked_state(  # noqa: PLR0917 - private, called once by the public operator
    factors: Sequence[LoRAFactors],
    info: ClientsInfo,
    p: Tensor,
    R: int,
    gauge: GaugeMode,
    sketch: Sketch | None,
    side: Literal["left", "right"],
    *,
    certify: bool,
    limit: float | None,
    route: Route = "auto",
) -> ServerState:
    """The state of a stack of same-shape modules: batched kernels, odd modules redone.

    The qr gauge goes through :func:`glora_math.batched.stacked_route`; modules it cannot
    treat uniformly, modules where some client's other factor is exactly zero (their own
    consensus weights, see :func:`_side_state`) and every module of the svd gauge are
    computed by :func:`_side_state`, the per-module operator, so each module equals
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
    # Per module, clients whose other factor is exactly zero (see _side_state).
    other = [a for _, a in flat] if side == "left" else [b for b, _ in flat]
    zero = torch.stack([~(x.flatten(1) != 0).any(-1) for x in other], dim=1)  # (L, N); rank 0 too
    own_weights = zero.any(-1) & ~zero.all(-1)
    device = p.device
    if gauge == "qr":
        U, S, eig, uniform, m, taken = stacked_route(
            Bs, As, p, R=R, sketch=sketch, wd=wd, gram=route != "householder"
        )
        if route == "gram" and taken != "gram":
            raise GloraError(
                f"route='gram' is not available for these stacked clients ({wd}); use route='auto'"
            )
        uniform = uniform & ~own_weights.to(uniform.device)
    else:
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
                f"consensus eigengap at R={R} is numerically zero in modules "
                f"{torch.nonzero(zero_gap & uniform).flatten().tolist()}: the server subspace "
                "is not unique"
            ),
            stacklevel=3,
        )
    redo = torch.nonzero(~uniform).flatten().tolist()
    eig = _redo_modules(flat, redo, ClientsInfo(d, k, info.dtype, wd, info.device), p, R,
                        gauge, sketch, side, U=U, S=S, gaps=gaps, eig=eig,
                        route=route)  # fmt: skip
    certs: tuple[Certificate, ...] | None = None
    total: Certificate | None = None
    if certify:
        stacked = [LoRAFactors(B, A) for B, A in zip(Bs, As, strict=True)]
        certs, total = _stack_certificates(stacked, p, U, S, wd, sketch=sketch)
        for layer, ct in enumerate(certs):
            where = f"module {layer}, side={side}, R={R}"
            warn_residual(ct.relative_residual, limit, where, stacklevel=3)
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


def _redo_modules(  # noqa: PLR0917 - private, called once by _stacked_state
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
            st = _side_state(
                mods, single, p, R, gauge, sketch, side, None, certify=False, route=route
            )
        for w in caught:
            msg = w.message
            if isinstance(msg, GloraWarning):
                # From here: _stacked_state, glora_aggregate, then the caller.
                warnings.warn(type(msg)(f"module {layer}: {msg}"), stacklevel=4)
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


__all__ = ["glora_aggregate"]
