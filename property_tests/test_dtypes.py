"""Half-precision inputs are computed in float32 and returned in their own dtype."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import LoRAFactors, fedit, glora_aggregate, readout

from .helpers import f64, state_tol, unique_or_reject
from .strategies import problems


@given(
    problems(dtype=torch.float32, max_cond=10.0),
    st.sampled_from([torch.float16, torch.bfloat16]),
    st.data(),
)
def test_half_inputs_are_computed_in_float32(pb, half, data) -> None:  # type: ignore[no-untyped-def]
    clients = [LoRAFactors(f.B.to(half), f.A.to(half)) for f in pb.factors]
    R = data.draw(st.integers(1, pb.union_dim()), label="R")
    state = unique_or_reject(lambda: glora_aggregate(clients, pb.weights, rank=R))
    assert state.U.dtype == torch.float32
    assert state.S.dtype == torch.float32
    assert state.dtype == half
    ro = readout(state, R)
    assert ro.B.dtype == half
    assert ro.A.dtype == half
    # The half values are exact in float64: the float32 result must match a float64 run on the
    # same values within float32 tolerances.
    exact = [LoRAFactors(f64(c.B), f64(c.A)) for c in clients]
    ref = unique_or_reject(lambda: glora_aggregate(exact, pb.weights, rank=R))
    tol = state_tol(
        torch.float32,
        d=pb.d,
        k=pb.k,
        ranks=pb.ranks,
        kappa=pb.cond,
        gap=min(state.gap, ref.gap),
        scale=pb.scale(),
    )
    assert float((f64(state.delta()) - ref.delta()).norm()) <= tol
    if len(set(pb.ranks)) == 1:
        assert fedit(clients).B.dtype == half


def test_mixed_dtypes_promote() -> None:
    a = LoRAFactors(torch.randn(5, 2, dtype=torch.float16), torch.randn(2, 4, dtype=torch.float16))
    b = LoRAFactors(torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    state = glora_aggregate([a, b], rank=2)
    assert state.dtype == torch.float64
    assert state.U.dtype == torch.float64
