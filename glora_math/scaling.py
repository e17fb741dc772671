"""Exact rescaling by powers of 2 for clients near the ends of a dtype's range.

GLoRA's state, its coordinates and its certificate are homogeneous in the factors, and a
power of 2 scales a floating-point number exactly. :func:`shift` finds the powers that bring
the clients to unit scale where they lie outside the dtype's comfortable band (and none inside
it: those results stay bit for bit), :func:`unscaled` scales a state back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from glora_math.errors import GloraError, UnderflowWarning
from glora_math.tolerances import certificate_tol, comfortable_band
from glora_math.types import Certificate, LoRAFactors, ServerState


def times_pow2(x: Tensor, k: int) -> Tensor:
    """``x * 2**k`` exactly (in steps a float32 can hold), for results in the normal range."""
    while k != 0:
        step = max(-100, min(100, k))
        x = x * 2.0**step
        k -= step
    return x


def exponent(x: Tensor) -> int:
    """``e`` with ``max |x|`` in ``[2^(e-1), 2^e)`` (0 for an all-zero or empty ``x``)."""
    top = float(x.abs().max()) if x.numel() else 0.0
    return math.frexp(top)[1]


def balanced_power(B: Tensor, A: Tensor, t: int) -> int:
    """The part ``x`` of ``2**t`` for ``B`` (``2**(t - x)`` for ``A``), balanced.

    It leaves the binary exponents of the largest entries of ``B 2^x`` and ``A 2^(t - x)`` at
    most 1 apart: a factorisation scaled back from unit scale that neither under- nor
    overflows where its product fits.
    """
    return (exponent(A) - exponent(B) + t) // 2


def shift(factors: Sequence[LoRAFactors], dtype: torch.dtype) -> tuple[int, int]:
    """Powers of 2 that bring the largest entries of the B_i and A_i to unit scale, or (0, 0).

    The state, its coordinates and its certificate are homogeneous in the factors, and scaling
    by a power of 2 is exact: clients whose norms lie in the dtype's comfortable band
    ``[sqrt(tiny) / eps, sqrt(max) * eps]`` (where no square or product of the certificate
    under- or overflows) are left alone, bit for bit; the others are computed at unit scale.
    """
    return module_shifts(factors, dtype, 1)[0]


def module_shifts(
    factors: Sequence[LoRAFactors], dtype: torch.dtype, count: int
) -> list[tuple[int, int]]:
    """:func:`shift` of each module of a stack of ``count`` modules (flattened batch order).

    Each module is brought to its own unit scale: one shift for a whole stack would leave a
    module far smaller than the others outside the band, to under- or overflow as if it had
    not been rescaled.
    """
    lo, hi = comfortable_band(dtype)
    # The largest entries (a norm of tiny entries would underflow while it is measured).
    nb = torch.zeros(count, dtype=torch.float64)
    na = torch.zeros(count, dtype=torch.float64)
    for f in factors:
        if f.B.numel() and f.A.numel():
            nb = torch.maximum(nb, f.B.detach().reshape(count, -1).abs().amax(-1).cpu().double())
            na = torch.maximum(na, f.A.detach().reshape(count, -1).abs().amax(-1).cpu().double())
    return [
        (0, 0) if b == 0.0 or a == 0.0 or (lo <= b <= hi and lo <= a <= hi)
        else (math.frexp(b)[1], math.frexp(a)[1])
        for b, a in zip(nb.tolist(), na.tolist(), strict=True)
    ]  # fmt: skip


def times_pow2_modules(x: Tensor, ks: Sequence[int]) -> Tensor:
    """Module ``j`` of the stack ``x`` (flattened batch order) times ``2**ks[j]``, exactly."""
    if len(set(ks)) == 1:
        return times_pow2(x, ks[0])
    flat = x.reshape(len(ks), *x.shape[-2:])
    return torch.stack([times_pow2(flat[j], k) for j, k in enumerate(ks)]).reshape(x.shape)


def ldexp_or_inf(x: float, k: int) -> float:
    """``x * 2**k`` as a float, ``inf`` beyond float64 (never an ``OverflowError``)."""
    try:
        return math.ldexp(x, k)
    except OverflowError:
        return math.copysign(math.inf, x)


def warn_lost_update(
    dtype: torch.dtype,
    norm: str,
    *,
    stacklevel: int,
    modules: Sequence[int] = (),
    what: str = "the mean update",
) -> None:
    """The :class:`~glora_math.errors.UnderflowWarning` of a server update returned as zero.

    ``norm`` is the norm of ``what`` as text, ``modules`` the stack positions it concerns
    (none for one module); ``stacklevel`` counts from the caller of this function, as
    :func:`warnings.warn` does.
    """
    hint = "rescale the factors" + (" or aggregate in float64" if dtype != torch.float64 else "")
    warnings.warn(
        UnderflowWarning(
            f"the server update underflows {dtype}: it is returned as zero ({what} "
            f"has norm {norm}); {hint}",
            modules=modules,
        ),
        stacklevel=stacklevel + 1,
    )


def _corrected(c: Certificate | None, lost: bool, rounding: float) -> Certificate | None:
    """A certificate of a state at unit scale, for its ``S`` as scaled back (still at unit scale).

    ``rounding`` is what scaling ``S`` back lost (:func:`_rounding`, at unit scale). The
    update's residual is orthogonal to the basis and the lost part ``U dS`` lies in it, so
    the residual becomes ``hypot(residual, ||dS||)`` (Pythagoras); all of ``S`` lost is a
    relative residual of 1.
    """
    if c is None:
        return None
    rho, bound = c.relative_residual, c.bound
    if lost:
        rho, bound = 1.0, (None if bound is None else 1.0)
    elif rounding > 0.0 and c.mean_norm > 0.0:
        rho = min(1.0, math.hypot(rho, rounding / c.mean_norm))
        bound = None if bound is None else min(1.0, math.hypot(bound, rounding / c.mean_norm))
    return dataclasses.replace(c, relative_residual=rho, bound=bound)


def _scaled(c: Certificate | None, k: int) -> Certificate | None:
    """``c`` with its mean norm times ``2**k`` (infinite beyond float64)."""
    return None if c is None else dataclasses.replace(c, mean_norm=ldexp_or_inf(c.mean_norm, k))


def _lost(before: Tensor, after: Tensor) -> bool:
    """Whether a nonzero ``before`` became all zero when scaled."""
    return bool(before.numel()) and bool(before.abs().max() > 0) and not bool(after.abs().max() > 0)


def _rounding(before: Tensor, after: Tensor, k: int) -> float:
    """``||before - after * 2**-k||_F`` in float64: what ``after = before * 2**k`` lost.

    Zero wherever ``after`` is in the dtype's normal range (a power of 2 scales exactly);
    positive where entries became subnormal or zero. (Entries that overflowed are refused
    by the caller's finiteness check.)
    """
    if not before.numel():
        return 0.0
    diff = before.to(torch.float64) - times_pow2(after.to(torch.float64), -k)
    return float(torch.linalg.vector_norm(diff)) if bool(torch.isfinite(diff).all()) else 0.0


def _warn_rounding(
    before: Tensor,
    c: Certificate | None,
    lost: bool,
    rounding: float,
    k: int,
    *,
    stacklevel: int,
    modules: Sequence[int] = (),
) -> None:
    """The :class:`~glora_math.errors.UnderflowWarning` of an update lost, or partly lost.

    ``before`` is ``S`` at unit scale. Partly: where rounding ``S`` to the dtype's subnormals
    costs more of the mean (of ``S`` without a certificate) than the certificate's own
    tolerance (:func:`~glora_math.tolerances.certificate_tol`): less is within the error
    of any certificate in that dtype.
    """
    if not lost and rounding == 0.0:  # scaled back exactly: nothing to say
        return
    mean = c.mean_norm if c is not None else float(torch.linalg.vector_norm(before.double()))
    what = "the mean update" if c is not None else "the update"
    if lost:
        warn_lost_update(
            before.dtype, f"{mean:.3e} x 2^{k}", stacklevel=stacklevel + 1, modules=modules,
            what=what,
        )  # fmt: skip
        return
    n = int(before.shape[-2]) + int(before.shape[-1])
    if mean > 0.0 and rounding > certificate_tol(before.dtype, n=n, scale=1.0) * mean:
        warnings.warn(
            UnderflowWarning(
                f"the server update is partly below {before.dtype}'s normal range: rounding "
                f"it costs {rounding / mean:.3e} of {what}"
                + (" (its certificate includes this)" if c is not None else ""),
                modules=modules,
            ),
            stacklevel=stacklevel + 1,
        )


def unscaled(state: ServerState, k: int) -> ServerState:
    """The state of the original factors from the state of factors scaled by ``2**-k``.

    ``S`` and the norms of the mean scale back by ``2**k``; relative residuals do not, unless
    entries of ``S`` become subnormal or zero: the certificate then includes what rounding
    lost (an :class:`~glora_math.errors.UnderflowWarning` where that is more of the mean than
    the certificate's own tolerance). Where ``S`` underflows the dtype entirely, the update
    is zero: its certificate says so (relative residual 1), and the warning too.
    """
    if k == 0:
        return state
    if state.batch_shape:
        raise GloraError("unscaled takes one module's state; a stack's is unscaled_stack's")
    S = times_pow2(state.S, k)
    lost, rounding = _lost(state.S, S), _rounding(state.S, S, k)
    _warn_rounding(state.S, state.certificate, lost, rounding, k, stacklevel=3)
    cert = _scaled(_corrected(state.certificate, lost, rounding), k)
    return dataclasses.replace(state, S=S, certificate=cert)


def unscaled_stack(
    state: ServerState,
    ks: Sequence[int],
    combine: Callable[[Sequence[Certificate]], Certificate],
) -> ServerState:
    """The state of a stack whose module ``j`` was computed from factors scaled by ``2**-ks[j]``.

    As :func:`unscaled`, module by module (warnings name the stack position). The stack's
    own certificate is then ``combine`` of the modules' at unit scale, each mean norm
    weighed by its module's power of 2 relative to the largest, and scaled back once (its
    modules' scaled-back norms may be subnormal, with few digits); it is rescaled as it is
    where every module had the same shift and rounding lost nothing.
    """
    if not any(ks):
        return state
    flat = state.S.reshape(len(ks), *state.S.shape[-2:])
    S = times_pow2_modules(state.S, ks)
    parts = S.reshape(flat.shape)
    lost = [_lost(flat[j], parts[j]) for j in range(len(ks))]
    rounding = [_rounding(flat[j], parts[j], k) for j, k in enumerate(ks)]
    mods = state.module_certificates
    for j, k in enumerate(ks):
        c = None if mods is None else mods[j]
        _warn_rounding(flat[j], c, lost[j], rounding[j], k, stacklevel=3, modules=[j])
    fixed = (
        None if mods is None else [_corrected(*a) for a in zip(mods, lost, rounding, strict=True)]
    )
    if len(set(ks)) == 1 and not any(lost) and not any(rounding):
        total = _scaled(state.certificate, ks[0])
    elif fixed is None:
        total = None
    else:
        top = max(ks)
        weighed = [_scaled(c, k - top) for c, k in zip(fixed, ks, strict=True)]
        total = _scaled(combine([c for c in weighed if c is not None]), top)
    backs = None if fixed is None else [_scaled(c, k) for c, k in zip(fixed, ks, strict=True)]
    return dataclasses.replace(
        state,
        S=S,
        certificate=total,
        module_certificates=None if backs is None else tuple(c for c in backs if c is not None),
    )


__all__ = [
    "balanced_power",
    "exponent",
    "ldexp_or_inf",
    "module_shifts",
    "shift",
    "times_pow2",
    "times_pow2_modules",
    "unscaled",
    "unscaled_stack",
    "warn_lost_update",
]
