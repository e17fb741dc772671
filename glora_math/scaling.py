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
from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.errors import UnderflowWarning
from glora_math.tolerances import comfortable_band
from glora_math.types import Certificate, LoRAFactors, ServerState


def times_pow2(x: Tensor, k: int) -> Tensor:
    """``x * 2**k`` exactly (in steps a float32 can hold), for results in the normal range."""
    while k != 0:
        step = max(-100, min(100, k))
        x = x * 2.0**step
        k -= step
    return x


def shift(factors: Sequence[LoRAFactors], dtype: torch.dtype) -> tuple[int, int]:
    """Powers of 2 that bring the largest entries of the B_i and A_i to unit scale, or (0, 0).

    The state, its coordinates and its certificate are homogeneous in the factors, and scaling
    by a power of 2 is exact: clients whose norms lie in the dtype's comfortable band
    ``[sqrt(tiny) / eps, sqrt(max) * eps]`` (where no square or product of the certificate
    under- or overflows) are left alone, bit for bit; the others are computed at unit scale.
    """
    lo, hi = comfortable_band(dtype)
    # The largest entries (a norm of tiny entries would underflow while it is measured).
    nb = max((float(f.B.abs().max()) for f in factors if f.B.numel()), default=0.0)
    na = max((float(f.A.abs().max()) for f in factors if f.A.numel()), default=0.0)
    if nb == 0.0 or na == 0.0 or (lo <= nb <= hi and lo <= na <= hi):
        return 0, 0
    return math.frexp(nb)[1], math.frexp(na)[1]


def warn_lost_update(dtype: torch.dtype, norm: str, *, stacklevel: int) -> None:
    """The :class:`~glora_math.errors.UnderflowWarning` of a server update returned as zero.

    ``norm`` is the mean update's norm as text; ``stacklevel`` counts from the caller of this
    function, as :func:`warnings.warn` does.
    """
    hint = "rescale the factors" + (" or aggregate in float64" if dtype != torch.float64 else "")
    warnings.warn(
        UnderflowWarning(
            f"the server update underflows {dtype}: it is returned as zero (the mean update "
            f"has norm {norm}); {hint}"
        ),
        stacklevel=stacklevel + 1,
    )


def unscaled(state: ServerState, k: int) -> ServerState:
    """The state of the original factors from the state of factors scaled by ``2**-k``.

    ``S`` and the norms of the mean scale back by ``2**k``; relative residuals do not. Where
    ``S`` then underflows the dtype entirely, the update is zero: its certificate says so
    (relative residual 1) and an :class:`~glora_math.errors.UnderflowWarning` is emitted.
    """
    if k == 0:
        return state
    S = times_pow2(state.S, k)
    lost = bool(state.S.abs().max() > 0) and not bool(S.abs().max() > 0)

    def back(c: Certificate | None) -> Certificate | None:
        if c is None:
            return None
        return dataclasses.replace(
            c,
            relative_residual=1.0 if lost else c.relative_residual,
            mean_norm=c.mean_norm * 2.0**k,
            bound=1.0 if lost and c.bound is not None else c.bound,
        )

    if lost:
        norm = state.certificate.mean_norm if state.certificate else 0.0
        warn_lost_update(S.dtype, f"{norm:.3e} x 2^{k}", stacklevel=3)
    mods = state.module_certificates
    return dataclasses.replace(
        state,
        S=S,
        certificate=back(state.certificate),
        module_certificates=None if mods is None else tuple(back(c) for c in mods),  # type: ignore[misc]
    )


__all__ = ["shift", "times_pow2", "unscaled", "warn_lost_update"]
