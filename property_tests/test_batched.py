"""The batched operator equals the per-module operator, layer by layer."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import LoRAFactors, glora_aggregate, readout
from glora_math.batched import glora_aggregate_batched, readout_batched

from .helpers import f64, state_tol, unique_or_reject
from .strategies import problems


@given(
    st.lists(
        problems(min_clients=2, max_clients=4, equal_ranks=True, weights="random"),
        min_size=1,
        max_size=4,
    ),
    st.data(),
)
def test_batched_equals_the_per_module_operator(layers, data) -> None:  # type: ignore[no-untyped-def]
    # Use the first layer's dimensions and client count for every layer of the batch.
    base = layers[0]
    L = len(layers)
    n, d, k, r = base.n, base.d, base.k, base.ranks[0]
    g = torch.Generator().manual_seed(base.seed)
    Bs = [torch.randn(L, d, r, generator=g, dtype=torch.float64) for _ in range(n)]
    As = [torch.randn(L, r, k, generator=g, dtype=torch.float64) for _ in range(n)]
    zero_layer = data.draw(st.integers(-1, L - 1), label="zero_layer")  # -1: none
    if zero_layer >= 0:
        Bs[0][zero_layer] = 0.0  # a rank-deficient client in one layer: the fallback path
    union = min(d, (n - 1) * r) if zero_layer >= 0 else min(d, n * r)  # no clamping here
    R = data.draw(st.integers(1, union), label="R")
    w = base.weights
    batched = unique_or_reject(lambda: glora_aggregate_batched(Bs, As, w, rank=R))
    for layer in range(L):
        fs = [LoRAFactors(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)]
        scale = sum(float(f.B.norm() * f.A.norm()) for f in fs)
        ref = unique_or_reject(lambda fs=fs: glora_aggregate(fs, w, rank=R))
        tol = state_tol(torch.float64, d=d, k=k, ranks=[r] * n, kappa=1.0, gap=ref.gap, scale=scale)
        assert float((batched.delta()[layer] - f64(ref.delta())).norm()) <= tol
        rr = data.draw(st.integers(1, ref.rank), label="readout rank")
        Bb, Ab = readout_batched(batched, rr)
        one = readout(ref, rr)
        assert float((Bb[layer] @ Ab[layer] - one.delta()).norm()) <= tol


def test_batched_clamps_layers_like_the_operator() -> None:
    import pytest

    from glora_math import RankClampedWarning

    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(2, 6, 1, generator=g, dtype=torch.float64) for _ in range(2)]
    As = [torch.randn(2, 1, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    Bs[0][1] = 0.0  # layer 1 spans only one direction
    with pytest.warns(RankClampedWarning):
        st_ = glora_aggregate_batched(Bs, As, rank=2)
    ref = glora_aggregate(
        [LoRAFactors(Bs[1][1], As[1][1]), LoRAFactors(Bs[0][1], As[0][1])], rank=1
    )
    from glora_math.tolerances import product_tol

    scale = float(Bs[1][1].norm() * As[1][1].norm())
    assert float((st_.delta()[1] - ref.delta()).norm()) <= product_tol(
        torch.float64, n=12, scale=scale
    )


def test_batched_with_fewer_client_directions_than_R() -> None:
    import pytest

    from glora_math import RankClampedWarning

    g = torch.Generator().manual_seed(1)
    Bs = [torch.randn(3, 8, r, generator=g, dtype=torch.float64) for r in (2, 3)]
    As = [torch.randn(3, r, 5, generator=g, dtype=torch.float64) for r in (2, 3)]
    with pytest.warns(RankClampedWarning):
        st_ = glora_aggregate_batched(Bs, As, [1.0, 2.0], rank=6)  # only 5 directions exist
    assert st_.U.shape == (3, 8, 6)
    assert st_.S.shape == (3, 6, 5)
    from glora_math.tolerances import product_tol

    for layer in range(3):
        W = (Bs[0][layer] @ As[0][layer] + 2 * Bs[1][layer] @ As[1][layer]) / 3
        assert float((st_.delta()[layer] - W).norm()) <= product_tol(
            torch.float64, n=8 + 5 + 5, scale=float(W.norm()) + 1
        )
