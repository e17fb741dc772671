"""GLoRA on stacked modules equals the per-module operator, module by module."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import LoRAFactors, glora_aggregate, readout

from .helpers import f64, state_tol, unique_or_reject
from .strategies import problems


def stacked(Bs, As):  # type: ignore[no-untyped-def]
    """Per client, one ``LoRAFactors`` of its stacked modules."""
    return [LoRAFactors(B, A) for B, A in zip(Bs, As, strict=True)]


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
    batched = unique_or_reject(lambda: glora_aggregate(stacked(Bs, As), w, rank=R))
    for layer in range(L):
        fs = [LoRAFactors(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)]
        scale = sum(float(f.B.norm() * f.A.norm()) for f in fs)
        ref = unique_or_reject(lambda fs=fs: glora_aggregate(fs, w, rank=R))
        tol = state_tol(torch.float64, d=d, k=k, ranks=[r] * n, kappa=1.0, gap=ref.gap, scale=scale)
        assert float((batched.delta()[layer] - f64(ref.delta())).norm()) <= tol
        rr = data.draw(st.integers(1, ref.rank), label="readout rank")
        Bb, Ab = readout(batched, rr)
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
        st_ = glora_aggregate(stacked(Bs, As), rank=2)
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
        st_ = glora_aggregate(stacked(Bs, As), [1.0, 2.0], rank=6)  # only 5 directions exist
    # Clamped, like the per-module operator, to the 5 directions the clients can span (no
    # allocation beyond them); readouts up to the requested R are still served.
    assert st_.U.shape == (3, 8, 5)
    assert st_.S.shape == (3, 5, 5)
    assert st_.requested_rank == 6
    from glora_math.tolerances import product_tol

    for layer in range(3):
        W = (Bs[0][layer] @ As[0][layer] + 2 * Bs[1][layer] @ As[1][layer]) / 3
        assert float((st_.delta()[layer] - W).norm()) <= product_tol(
            torch.float64, n=8 + 5 + 5, scale=float(W.norm()) + 1
        )


def test_a_zero_weight_client_can_raise_R_above_the_weighted_directions_of_a_stack() -> None:
    # R is checked against every client's rank, a zero-weight one's too, so R can exceed the
    # directions the weighted clients span. Found by the mutation round: the float32 Gram
    # route of a stack then returned R - 1 columns and the stack failed with a raw reshape
    # error. Every module must equal the per-module operator (clamped, zero columns beyond).
    import pytest

    from glora_math import RankClampedWarning
    from glora_math.tolerances import product_tol

    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        Bs = [torch.randn(3, 8, 2, generator=g, dtype=dtype) for _ in range(2)]
        As = [torch.randn(3, 2, 6, generator=g, dtype=dtype) for _ in range(2)]
        with pytest.warns(RankClampedWarning):
            st_ = glora_aggregate(stacked(Bs, As), [1.0, 0.0], rank=3)
        for layer in range(3):
            with pytest.warns(RankClampedWarning):
                one = glora_aggregate(
                    [LoRAFactors(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)],
                    [1.0, 0.0],
                    rank=3,
                )
            W = Bs[0][layer] @ As[0][layer]
            tol = product_tol(dtype, n=8 + 6 + 4, scale=float(W.norm()))
            assert float((st_.delta()[layer] - W).norm()) <= tol
            assert float((st_.delta()[layer] - one.delta()).norm()) <= 2 * tol


def test_a_stack_with_clients_of_rank_zero_equals_the_modules() -> None:
    # Found by the mutation round: a rank-0 client made the stack fail with a raw IndexError
    # (a reduction over an empty dimension), and the warnings of a module redone one by one
    # pointed inside the library instead of at the caller.
    import os
    import warnings

    from glora_math import RankClampedWarning
    from glora_math.tolerances import product_tol

    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        ranks = (0, 2, 3)
        Bs = [torch.randn(3, 8, r, generator=g, dtype=dtype) for r in ranks]
        As = [torch.randn(3, r, 6, generator=g, dtype=dtype) for r in ranks]
        p = [1.0, 1.0, 2.0]
        st_ = glora_aggregate(stacked(Bs, As), p, rank=5)  # exact: 5 directions
        for layer in range(3):
            W = (Bs[1][layer] @ As[1][layer] + 2 * Bs[2][layer] @ As[2][layer]) / 4
            one = glora_aggregate(
                [LoRAFactors(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)], p, rank=5
            )
            tol = product_tol(dtype, n=8 + 6 + 5, scale=float(W.norm()))
            assert float((st_.delta()[layer] - W).norm()) <= tol
            assert float((st_.delta()[layer] - one.delta()).norm()) <= 2 * tol
        # Every client of rank 0: the zero update, and one warning per module, at the caller.
        empty = [LoRAFactors(torch.zeros(3, 8, 0, dtype=dtype), torch.zeros(3, 0, 6, dtype=dtype))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            zero = glora_aggregate(empty * 2, None, rank=2)
        assert float(zero.delta().norm()) == 0.0
        clamped = [w for w in caught if issubclass(w.category, RankClampedWarning)]
        assert {f"module {i}" for i in range(3)} <= {str(w.message)[:8] for w in clamped}
        if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add frames
            assert {w.filename for w in clamped} == {__file__}


@given(
    problems(min_clients=2, max_clients=4, weights="random"),
    st.integers(1, 3),
    st.sampled_from(["left", "right"]),
    st.sampled_from(["qr", "svd"]),
    st.data(),
)
def test_every_fixed_side_and_gauge_of_a_stack_equals_the_modules(  # type: ignore[no-untyped-def]
    pb, L, side, gauge, data
) -> None:
    # Heterogeneous ranks, either side, either gauge: each module of the stacked state, its
    # certificate and its readouts equal the per-module operator's.
    g = torch.Generator().manual_seed(pb.seed)
    Bs = [torch.randn(L, pb.d, r, generator=g, dtype=torch.float64) for r in pb.ranks]
    As = [torch.randn(L, r, pb.k, generator=g, dtype=torch.float64) for r in pb.ranks]
    n_dim = pb.d if side == "left" else pb.k
    union = min(n_dim, sum(pb.ranks))
    R = data.draw(st.integers(1, union), label="R")
    w = pb.weights
    batched = unique_or_reject(
        lambda: glora_aggregate(stacked(Bs, As), w, rank=R, side=side, gauge=gauge)
    )
    assert batched.batch_shape == (L,)
    assert batched.side == side
    assert batched.module_certificates is not None
    assert batched.certificate is not None
    res2 = 0.0
    for layer in range(L):
        fs = [LoRAFactors(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)]
        scale = sum(float(f.B.norm() * f.A.norm()) for f in fs)
        ref = unique_or_reject(lambda fs=fs: glora_aggregate(fs, w, rank=R, side=side, gauge=gauge))
        tol = state_tol(
            torch.float64, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=1.0, gap=ref.gap, scale=scale
        )
        one = batched.module(layer)
        assert one.side == side
        assert one.shape == (pb.d, pb.k)
        assert float((one.delta() - ref.delta()).norm()) <= tol
        assert batched.module_gaps is not None
        assert abs(float(batched.module_gaps[layer]) - ref.gap) <= tol
        # The certificate of each module is the per-module operator's (same exact residual).
        mean_norm = ref.certificate.mean_norm  # type: ignore[union-attr]
        assert abs(one.relative_residual - ref.relative_residual) * mean_norm <= tol
        res2 += (ref.relative_residual * mean_norm) ** 2
        rr = data.draw(st.integers(1, ref.rank), label="readout rank")
        Bb, Ab = readout(batched, rr)
        assert float((Bb[layer] @ Ab[layer] - readout(ref, rr).delta()).norm()) <= tol
    # The stacked certificate is the relative error of all modules together.
    total = batched.certificate
    assert abs(total.residual - res2**0.5) <= L * tol  # type: ignore[union-attr]


def test_stacks_need_a_fixed_side_and_rank_and_only_glora_takes_them() -> None:
    import pytest

    from glora_math import GloraError, ShapeMismatchError, fedit

    g = torch.Generator().manual_seed(3)
    fs = [
        LoRAFactors(torch.randn(2, 6, 2, generator=g), torch.randn(2, 2, 5, generator=g))
        for _ in range(3)
    ]
    for kwargs in ({"side": "auto", "rank": 2}, {"rank": "auto", "tol": 0.1}):
        with pytest.raises(GloraError, match="choose per module"):
            glora_aggregate(fs, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ShapeMismatchError, match="client 0: stacked factors"):
        fedit(fs)
    other = LoRAFactors(torch.randn(3, 6, 2, generator=g), torch.randn(3, 2, 5, generator=g))
    with pytest.raises(ShapeMismatchError, match="client 2: batch dimensions"):
        glora_aggregate([fs[0], fs[1], other], rank=2)
    with pytest.raises(GloraError, match="module index"):
        glora_aggregate(fs, rank=2).module(2)
