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

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from torch import Tensor

from glora_math.certificate import combined_certificate, warn_residual
from glora_math.errors import (
    GloraError,
    GloraWarning,
    NonFiniteError,
    ResidualWarning,
)
from glora_math.implicit import GramCache
from glora_math.scaling import module_shifts as _module_shifts
from glora_math.scaling import shift as _shift
from glora_math.scaling import times_pow2 as _times_pow2
from glora_math.scaling import times_pow2_modules as _pow2_modules
from glora_math.scaling import unscaled as _unscaled
from glora_math.scaling import unscaled_stack as _unscaled_stack
from glora_math.sides import Route, side_state, stacked_state
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
_T = TypeVar("_T")
#: Errors that mean the working dtype overflowed on validated (finite) input.
_OVERFLOWS: tuple[type[Exception], ...] = (*KERNEL_ERRORS, NonFiniteError)


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
        Compute the certificate (default). On the Gram route's exact consensus it costs the
        float64 Gram matrix of the stacked A's (P16, ``certificate.method == "gram"``);
        elsewhere one QR of the stacked weighted left factors (d by sum r_i + R, ``"qr"``);
        ``False`` skips it for speed-critical calls (``relative_residual``
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
    ``side="auto"`` (whose two sides share their two Gram matrices on the Gram route); the
    certificate adds the A side's Gram matrix there, else one QR of the stacked weighted B's.

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
    p, given, factors, shift = _prepared(factors, weights, info)
    if info.batch_shape:
        if auto or side == "auto":
            raise GloraError(
                "side='auto' and rank='auto' choose per module, which gives modules states of "
                "different shapes: glora_aggregate_stack gives each module its own state "
                "(side='auto' in batched kernels); rank='auto' takes the modules one by one"
            )
        try:
            stacked = stacked_state(
                factors, info, p, R, gauge, sketch, side, certify=certify, route=route
            )
        except _OVERFLOWS as err:
            raise _overflow(err, factors) from None
        check_finite_output([stacked.U, stacked.S], factors, "glora_aggregate")
        stacked = _unscaled_stack(stacked, shift, _combiner(sketch))
        check_finite_output([stacked.S], given, "glora_aggregate")
        for j, ct in enumerate(stacked.module_certificates or ()):  # as scaled back
            where = f"side={side}, R={stacked.rank}"
            warn_residual(ct.relative_residual, limit, where, stacklevel=2, modules=[j])
        return stacked
    sides: tuple[Literal["left", "right"], ...] = ("left", "right") if side == "auto" else (side,)
    grams = GramCache()  # side="auto": each side's raw Gram matrices are the other's too
    found = _each_side(
        sides,
        lambda sd: side_state(factors, info, p, R, gauge, sketch, sd, target, certify=certify,
                              route=route, grams=grams),
        factors,
        "glora_aggregate",
    )  # fmt: skip
    # Each side scaled back before the choice: rounding to subnormals can change certificates.
    found = [_unscaled_noting(st, notes, shift[0]) for st, notes in found]
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
                f"residual is {best.relative_residual:.3e} at R={best.rank} "
                f"(side={best.side}; rounding in {info.work_dtype} limits it)"
            ),
            stacklevel=2,
        )
    check_finite_output([best.S], given, "glora_aggregate")
    warn_residual(best.relative_residual, limit, f"side={best.side}, R={best.rank}", stacklevel=2)
    return best


def _prepared(
    factors: Sequence[LoRAFactors], weights: WeightsLike, info: ClientsInfo
) -> tuple[Tensor, list[LoRAFactors], list[LoRAFactors], list[int]]:
    """``(p, given, scaled, shifts)`` of checked clients, for the operator's entry points.

    The normalised weights, the clients as given (detached) and at unit scale, and the
    power of 2 of each module's update between them (0 inside the dtype's comfortable band;
    one entry for one module, one per module of a stack in flattened batch order: each
    module of a stack is brought to its own unit scale).
    """
    p = normalize_weights(weights, len(factors), dtype=info.work_dtype, device=info.device)
    # Detached views: the math is not differentiable, and autograd would refuse its out= kernels.
    given = [_detached(as_factors(f, i)) for i, f in enumerate(factors)]
    if not info.batch_shape:
        kb, ka = _shift(given, info.work_dtype)
        if (kb, ka) == (0, 0):
            return p, given, given, [0]
        # near the ends of the dtype's range: compute at unit scale
        scaled = [LoRAFactors(_times_pow2(f.B, -kb), _times_pow2(f.A, -ka)) for f in given]
        return p, given, scaled, [kb + ka]
    each = _module_shifts(given, info.work_dtype, math.prod(info.batch_shape))
    if not any(kb or ka for kb, ka in each):
        return p, given, given, [0] * len(each)
    kbs, kas = [-kb for kb, _ in each], [-ka for _, ka in each]
    scaled = [LoRAFactors(_pow2_modules(f.B, kbs), _pow2_modules(f.A, kas)) for f in given]
    return p, given, scaled, [kb + ka for kb, ka in each]


def _recorded(call: Callable[[], _T]) -> tuple[_T, list[Warning]]:
    """``call()`` and the warnings it raised, held back for the caller to emit or drop."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [w.message for w in caught if isinstance(w.message, Warning)]


def _unscaled_noting(
    state: ServerState, notes: list[Warning], k: int
) -> tuple[ServerState, list[Warning]]:
    """:func:`~glora_math.scaling.unscaled`, its warnings added to the side's held-back notes."""
    back, more = _recorded(functools.partial(_unscaled, state, k))
    return back, [*notes, *more]


def _combiner(sketch: Sketch | None) -> Callable[[Sequence[Certificate]], Certificate]:
    """How a stack's certificate combines its modules' (with the sketch's probes)."""
    if sketch is None or sketch.certificate != "estimate":
        return combined_certificate
    return functools.partial(
        combined_certificate, probes=sketch.probes, confidence=sketch.confidence
    )


def _each_side(
    sides: Sequence[Literal["left", "right"]],
    run: Callable[[Literal["left", "right"]], ServerState],
    factors: Sequence[LoRAFactors],
    name: str,
) -> list[tuple[ServerState, list[Warning]]]:
    """Each side's state (``run(side)``, checked finite) with the warnings it raised, held back.

    The caller emits the warnings of the side it keeps; an overflow inside becomes a typed
    error naming a client.
    """
    found: list[tuple[ServerState, list[Warning]]] = []
    try:
        for sd in sides:
            st, notes = _recorded(functools.partial(run, sd))
            check_finite_output([st.U, st.S], factors, name)
            found.append((st, notes))
    except _OVERFLOWS as err:
        raise _overflow(err, factors) from None
    return found


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


def glora_aggregate_stack(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    rank: int,
    side: Side = "auto",
    gauge: GaugeMode = "qr",
    sketch: Sketch | None = None,
    max_residual: float | None = None,
    route: Route = "auto",
) -> list[ServerState]:
    """Aggregate a stack of same-shape modules; one state per module, each on its best side.

    ``factors`` carry leading batch dimensions, as for a stack in :func:`glora_aggregate`
    (B_i ``(L, d, r_i)``, A_i ``(L, r_i, k)``); the result is one
    :class:`~glora_math.types.ServerState` per module, in flattened batch order. With
    ``side="auto"`` (the default) both sides are computed in batched kernels that share each
    module's two raw Gram matrices (the stacked B's and the stacked A's: both consensuses and
    both certificates, P16), and each module keeps the side with the smaller certified residual
    (ties go left): module by module, what ``glora_aggregate(side="auto")`` returns. A fixed
    side gives the modules of ``glora_aggregate``'s stacked state. ``rank`` is an integer (the
    auto-rank rule is per module: pass the modules one by one); the other parameters are
    :func:`glora_aggregate`'s, and ``max_residual`` warns per module on the kept side.
    Warnings of a side that no module keeps are dropped; those of a side that some module
    keeps are emitted whole (they name their modules).

    Raises
    ------
    GloraError
        For factors without a batch dimension (use :func:`glora_aggregate`), and
        :func:`glora_aggregate`'s errors.
    """
    info = validate_clients(factors, stack=True)
    if not info.batch_shape:
        raise GloraError(
            "glora_aggregate_stack takes stacked modules (factors with a leading batch "
            "dimension); aggregate one module with glora_aggregate"
        )
    R = validate_rank(rank)
    _check_modes(side, auto=False, certify=True, max_residual=max_residual)
    _check_route(route, gauge)
    limit = None if max_residual is None else _check_fraction(max_residual, "max_residual", 1e300)
    p, given, factors, shift = _prepared(factors, weights, info)
    sides: tuple[Literal["left", "right"], ...] = ("left", "right") if side == "auto" else (side,)
    grams = GramCache()
    found = _each_side(
        sides,
        lambda sd: stacked_state(factors, info, p, R, gauge, sketch, sd, certify=True,
                                 route=route, grams=grams),
        factors,
        "glora_aggregate_stack",
    )  # fmt: skip
    # A module lost on a side it does not keep is not reported.
    combine = _combiner(sketch)
    scaled_back = [_recorded(functools.partial(_unscaled_stack, st, shift, combine))
                   for st, _ in found]  # fmt: skip
    states, lost = [st for st, _ in scaled_back], [notes for _, notes in scaled_back]
    for st in states:
        check_finite_output([st.S], given, "glora_aggregate_stack")
    out = []
    for j in range(math.prod(info.batch_shape)):
        best = min((st.module(j) for st in states), key=lambda s: s.relative_residual)
        out.append(best)
        where = f"side={best.side}, R={best.rank}"
        warn_residual(best.relative_residual, limit, where, stacklevel=2, modules=[j])
    kept = {st.side for st in out}
    said: set[tuple[type, str]] = set()  # both sides clamp R alike: say it once
    for (st, notes), gone in zip(found, lost, strict=True):
        mine = [n for n in gone if isinstance(n, GloraWarning) and all(
            isinstance(j, int) and out[j].side == st.side for j in n.modules)]  # fmt: skip
        for note in [*(notes if st.side in kept else ()), *mine]:
            if (type(note), str(note)) not in said:
                said.add((type(note), str(note)))
                warnings.warn(note, stacklevel=2)
    return out


__all__ = ["glora_aggregate", "glora_aggregate_stack"]
