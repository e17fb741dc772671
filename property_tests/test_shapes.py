"""The jaxtyping shape annotations of the public API hold at run time (checked by beartype)."""

from __future__ import annotations

import torch
from beartype import beartype
from hypothesis import given
from hypothesis import strategies as st
from jaxtyping import jaxtyped

import glora_math as gm

from .helpers import unique_or_reject
from .strategies import problems

checked_gauge_fix = jaxtyped(typechecker=beartype)(gm.gauge_fix)
checked_readout = jaxtyped(typechecker=beartype)(gm.readout)
checked_apply_gauge = jaxtyped(typechecker=beartype)(gm.apply_gauge)


# jaxtyped() patches a class's __init__ in place: decorate subclasses, never the real classes.
@jaxtyped(typechecker=beartype)
class CheckedFactors(gm.LoRAFactors):
    __slots__ = ()


@jaxtyped(typechecker=beartype)
class CheckedFixed(gm.GaugeFixed):
    __slots__ = ()


@jaxtyped(typechecker=beartype)
class CheckedState(gm.ServerState):
    __slots__ = ()


@given(problems(zero_updates=True), st.data())
def test_public_functions_honour_their_shape_annotations(pb, data) -> None:  # type: ignore[no-untyped-def]
    for f in pb.factors:
        CheckedFactors(f.B, f.A)
        gf = checked_gauge_fix(f, "qr")
        CheckedFixed(gf.U, gf.C)
        checked_apply_gauge(f, torch.eye(f.rank, dtype=f.B.dtype))
    union = pb.union_dim()
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")
    s = unique_or_reject(lambda: gm.glora_aggregate(pb.factors, pb.weights, rank=R))
    CheckedState(s.U, s.S, s.eigvals, s.gap, s.requested_rank, s.weights, s.gauge, s.dtype)
    ro = checked_readout(s, R)
    assert ro.B.shape == (pb.d, R)


def test_the_checker_is_live() -> None:
    # A wrong shape must be caught by the checked wrapper (so the test above can fail).
    import pytest
    from jaxtyping import TypeCheckError

    with pytest.raises((TypeCheckError, gm.ShapeMismatchError)):
        CheckedFixed(torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(TypeCheckError):
        CheckedState(
            torch.zeros(4, 2),
            torch.zeros(3, 5),
            torch.zeros(2),
            0.0,
            2,
            torch.zeros(1),
            "qr",
            torch.float32,
        )
