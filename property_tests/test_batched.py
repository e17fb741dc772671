"""GLoRA on stacked modules equals the per-module operator, module by module."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import (
    GloraError,
    LoRAFactors,
    RankClampedWarning,
    ServerState,
    Sketch,
    aggregate_modules,
    get_operator,
    glora_aggregate,
    glora_aggregate_stack,
    readout,
)
from glora_math.tolerances import (
    certificate_tol,
    eigenvalue_error,
    orthonormality_tol,
    zero_gap_tol,
)

from .helpers import f64, state_tol, unique_or_reject
from .strategies import conditioned_matrix, problems


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


# -------------------------------------------------------------------------------------------------
# Tests that pin behaviour found by the mutation run (docs/mutation.md): each was written for a
# mutant of ``batched.py`` that survived the property suite.
#
# The stacked route (clients carrying a batch of same-shape modules) takes the batched Gram route
# where the per-module operator would take the Gram route: float32 and half clients, qr gauge,
# every client's rank at most d, a sketch narrower than the clients' span; float64 stacks take the
# batched Householder route. Either way every module equals the per-module operator on its own
# clients.
# -------------------------------------------------------------------------------------------------


F32 = torch.float32


def _stack(L: int, d: int, k: int, ranks: list[int], dtype: torch.dtype):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(L * d + k)
    out = []
    for r in ranks:
        Bs = [
            conditioned_matrix(d, r, cond=2.0, scale=1.0, generator=g, dtype=torch.float64)
            for _ in range(L)
        ]
        As = [
            conditioned_matrix(r, k, cond=2.0, scale=1.0, generator=g, dtype=torch.float64)
            for _ in range(L)
        ]
        out.append(LoRAFactors(torch.stack(Bs).to(dtype), torch.stack(As).to(dtype)))
    return out


def _modules_match(state: ServerState, fs: list[LoRAFactors], R: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
    L = state.U.shape[0]
    weights = kwargs.pop("weights", None)
    for layer in range(L):
        mods = [LoRAFactors(f.B[layer], f.A[layer]) for f in fs]
        ref = glora_aggregate(mods, weights, rank=R, **kwargs)
        one = state.module(layer)
        d, k = ref.shape
        scale = sum(float(f.B.norm() * f.A.norm()) for f in mods) / len(mods)
        tol = state_tol(
            ref.U.dtype, d=d, k=k, ranks=[f.rank for f in mods], kappa=2.0, gap=ref.gap, scale=scale
        )
        assert float((f64(one.delta()) - f64(ref.delta())).norm()) <= tol


def test_a_float64_stack_takes_the_batched_householder_route() -> None:
    fs = _stack(3, 8, 6, [2, 3], torch.float64)
    state = glora_aggregate(fs, rank=2)
    assert state.route == "stacked-householder"
    _modules_match(state, fs, 2)


def test_a_float32_stack_of_square_client_factors_takes_the_batched_gram_route() -> None:
    # r = d for client 0: its B is square and well conditioned, which the per-module Gram route
    # accepts. K = p_0 I + p_1 U_1 U_1^T has the gap p_1 at R = 2.
    fs = _stack(3, 4, 6, [4, 2], F32)
    state = glora_aggregate(fs, [1.0, 3.0], rank=2)
    assert state.route == "stacked-gram"
    one = glora_aggregate([LoRAFactors(f.B[0], f.A[0]) for f in fs], [1.0, 3.0], rank=2)
    assert one.route == "gram"
    _modules_match(state, fs, 2, weights=[1.0, 3.0])


def test_a_sketch_as_wide_as_the_clients_span_takes_the_batched_householder_route() -> None:
    # R + oversample = min(d, n) = 5 (d = 8, ranks 2 + 3): the batched Gram route declines.
    fs = _stack(3, 8, 6, [2, 3], F32)
    sketch = Sketch(oversample=3, power_iters=1, seed=0)
    state = glora_aggregate(fs, rank=2, sketch=sketch)
    assert state.route == "stacked-householder"
    _modules_match(state, fs, 2, sketch=sketch)


def test_the_sketched_batched_route_does_not_depend_on_the_default_dtype() -> None:
    # Every tensor is made in the clients' working dtype: a float64 default dtype (a global
    # setting of the caller's) changes nothing, bit for bit.
    fs = _stack(2, 8, 6, [2, 3], F32)
    sketch = Sketch(oversample=1, power_iters=1, seed=0)
    ref = glora_aggregate(fs, rank=2, sketch=sketch)
    assert ref.route == "stacked-gram"
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        state = glora_aggregate(fs, rank=2, sketch=sketch)
    finally:
        torch.set_default_dtype(before)
    assert state.route == "stacked-gram"
    assert torch.equal(state.U, ref.U)
    assert torch.equal(state.S, ref.S)


@pytest.mark.parametrize(("dtype", "route"), [(F32, "gram"), (torch.float64, "householder")])
def test_the_sketched_batched_route_reports_the_spectrum_of_each_module(
    dtype: torch.dtype, route: str
) -> None:
    # The same sketch per module (the same test matrix): the Ritz values of K, squared
    # singular values, as the per-module operator reports them, to the rounding of K's
    # eigenvalues.
    fs = _stack(2, 8, 6, [2, 3], dtype)
    sketch = Sketch(oversample=1, power_iters=1, seed=0)
    state = glora_aggregate(fs, rank=2, sketch=sketch)
    assert state.route == f"stacked-{route}"
    for layer in range(2):
        ref = glora_aggregate(
            [LoRAFactors(f.B[layer], f.A[layer]) for f in fs], rank=2, sketch=sketch
        )
        lam = f64(ref.eigvals)
        tol = eigenvalue_error(float(lam[0]), 8 + 5, dtype)
        assert float((f64(state.module(layer).eigvals) - lam).abs().max()) <= tol


@pytest.mark.parametrize("dtype", [F32, torch.float64])
def test_a_module_whose_clients_span_fewer_than_R_directions_is_clamped(dtype: torch.dtype) -> None:
    # Three rank-1 clients on one column v per module (v, 3 v and 7 v, rounded in float32):
    # they span 1 direction, R = 2. The sketch (width 2 < min(d, n) = 3) cannot be used as it
    # is: the module is redone by the per-module operator, which clamps R (a warning naming
    # the module) and leaves a zero column in U and a zero row in S beyond it.
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, 8, 1, generator=g, dtype=torch.float64)
    v = (v / v.norm(dim=1, keepdim=True)).to(dtype)
    fs = [LoRAFactors(v * c, torch.randn(2, 1, 6, generator=g).to(dtype)) for c in (1.0, 3.0, 7.0)]
    with pytest.warns(RankClampedWarning) as rec:
        state = glora_aggregate(fs, rank=2, sketch=Sketch(oversample=0, power_iters=1, seed=0))
    assert sorted(str(w.message)[:8] for w in rec) == ["module 0", "module 1"]
    assert state.U.shape == (2, 8, 2)
    assert float(state.U[:, :, 1].abs().max()) == 0.0
    assert float(state.S[:, 1].abs().max()) == 0.0
    norms = f64(state.U[:, :, 0]).norm(dim=1)
    assert float((norms - 1.0).abs().max()) <= orthonormality_tol(dtype, n=8 + 1)


@pytest.mark.parametrize("dtype", [torch.float64, F32])
def test_a_zero_weight_client_drops_out_of_every_module(dtype: torch.dtype) -> None:
    # Weight 0: the client is not in K, in the stacked width or in the spectrum of any module,
    # exactly as in the per-module operator (spectrum of width min(d, 2), not min(d, 5)).
    fs = _stack(2, 8, 6, [2, 3], dtype)
    state = glora_aggregate(fs, [1.0, 0.0], rank=2)
    for layer in range(2):
        ref = glora_aggregate([LoRAFactors(f.B[layer], f.A[layer]) for f in fs], [1.0, 0.0], rank=2)
        assert state.module(layer).eigvals.shape == ref.eigvals.shape == (2,)
    _modules_match(state, fs, 2, weights=[1.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_stack_on_the_householder_route_works_in_float32(
    dtype: torch.dtype,
) -> None:
    # Half-precision factors are computed in float32 on either route.
    fs = _stack(2, 8, 6, [2, 3], dtype)
    state = glora_aggregate(fs, rank=2, route="householder")
    assert state.route == "stacked-householder"
    assert state.U.dtype == F32
    _modules_match(state, fs, 2, route="householder")


def test_the_zero_gap_rule_of_a_stack_counts_the_stacked_width() -> None:
    # K = p_0 (e_1 e_1^T + e_2 e_2^T) + p_1 e_3 e_3^T in every module (d = 8, m = 3 columns):
    # the gap at R = 2 is p_0 - p_1 = 1.5e-14, above the zero-gap tolerance over d + m = 11
    # terms, SAFETY 11 eps lambda_1 = 1.2e-14, as the per-module operator counts: no warning.
    d, k = 8, 5
    g = torch.Generator().manual_seed(6)
    eye = torch.eye(d, dtype=torch.float64)
    fs = [
        LoRAFactors(
            eye[:, :2].expand(2, d, 2), torch.randn(2, 2, k, generator=g, dtype=torch.float64)
        ),
        LoRAFactors(
            eye[:, 2:3].expand(2, d, 1), torch.randn(2, 1, k, generator=g, dtype=torch.float64)
        ),
    ]
    w = [0.5 + 7.5e-15, 0.5 - 7.5e-15]
    lam1 = 0.5
    assert (
        zero_gap_tol(lam1, d + 3, torch.float64)
        < 1.5e-14
        < zero_gap_tol(lam1, 2 * d, torch.float64)
    )
    state = glora_aggregate(fs, w, rank=2)  # a ZeroEigengapWarning would fail the test
    assert state.route == "stacked-householder"
    glora_aggregate([LoRAFactors(f.B[0], f.A[0]) for f in fs], w, rank=2)


def test_a_rank_deficient_client_in_a_sketched_float64_stack_is_redone_per_module() -> None:
    # Client 1's B has rank 1 of 2 in every module: the batched QR cannot use it as a basis,
    # so each module is redone by the per-module operator, whose state it then equals.
    fs = _stack(2, 8, 6, [2, 2], torch.float64)
    B1 = fs[1].B[..., :1] @ torch.ones(2, 1, 2, dtype=torch.float64)
    fs[1] = LoRAFactors(B1, fs[1].A)
    sketch = Sketch(oversample=1, power_iters=1, seed=0)
    state = glora_aggregate(fs, rank=2, sketch=sketch)
    _modules_match(state, fs, 2, sketch=sketch)


@pytest.mark.parametrize("sketch", [None, Sketch(oversample=1, power_iters=1, seed=0)])
def test_a_stack_whose_weighted_clients_have_fewer_columns_than_R_is_clamped_per_module(
    sketch: Sketch | None,
) -> None:
    # Two rank-2 float64 clients, the second of weight 0: the stacked bases of the weighted
    # client have m = 2 columns, below R = 3 (which the clients' total rank 4 allows). Every
    # module (L = 3) is redone by the per-module operator, which clamps R to 2 with a warning
    # naming the module and leaves a zero column in U beyond it; each module equals it.
    fs = _stack(3, 8, 6, [2, 2], torch.float64)
    with pytest.warns(RankClampedWarning) as rec:
        state = glora_aggregate(fs, [1.0, 0.0], rank=3, sketch=sketch)
    assert state.route == "stacked-householder"
    assert sorted(str(w.message)[:8] for w in rec) == ["module 0", "module 1", "module 2"]
    assert state.U.shape == (3, 8, 3)
    assert float(state.U[:, :, 2].abs().max()) == 0.0
    with pytest.warns(RankClampedWarning):  # the per-module operator clamps each module too
        _modules_match(state, fs, 3, weights=[1.0, 0.0], sketch=sketch)


# ----------------------------------------------------------------------------------------------
# glora_aggregate_stack: side="auto" on a stack, in batched kernels


def _float32_stack(n: int, L: int, shape: tuple[int, int, int], seed: int) -> list[LoRAFactors]:
    """n clients of L float32 modules, ``shape = (d, k, r)``, Gaussian factors."""
    d, k, r = shape
    g = torch.Generator().manual_seed(seed)
    return [
        LoRAFactors(torch.randn(L, d, r, generator=g), torch.randn(L, r, k, generator=g))
        for _ in range(n)
    ]


def _cert_tol(mods: list[LoRAFactors], S: torch.Tensor) -> float:
    """``certificate_tol`` (float32) of one module's equal-weight clients and state's S."""
    n = len(mods)
    d, k = int(mods[0].B.shape[0]), int(mods[0].A.shape[1])
    size = sum(float(f.B.norm() * f.A.norm()) for f in mods) / n
    mean = float(sum((f64(f.B) @ f64(f.A) for f in mods), torch.zeros(d, k)).norm()) / n
    terms = d + k + sum(int(f.B.shape[1]) for f in mods)
    return certificate_tol(torch.float32, n=terms, scale=(size + float(f64(S).norm())) / mean)


@given(
    st.integers(1, 4),
    st.integers(2, 5),
    st.integers(1, 3),
    st.integers(4, 20),
    st.integers(4, 20),
    st.integers(0, 2**16),
    st.data(),
)
def test_the_stack_takes_each_modules_auto_side_like_the_per_module_operator(  # type: ignore[no-untyped-def]  # noqa: PLR0917
    L, n, r, d, k, seed, data
) -> None:
    # Each module of glora_aggregate_stack(side="auto") is glora_aggregate(side="auto") on that
    # module's clients: the same side (unless the two sides' certificates tie within their
    # tolerance, where either is right), the same update and certificate to rounding.
    fs = _float32_stack(n, L, (d, k, r), seed)
    cap = min(n * r, d, k)
    R = data.draw(st.integers(1, cap), label="R")
    states = unique_or_reject(lambda: glora_aggregate_stack(fs, rank=R))
    assert len(states) == L
    for layer, got in enumerate(states):
        mods = [LoRAFactors(f.B[layer], f.A[layer]) for f in fs]
        ref = unique_or_reject(lambda mods=mods: glora_aggregate(mods, rank=R, side="auto"))
        ctol = _cert_tol(mods, ref.S)
        assert got.certificate is not None
        assert ref.certificate is not None
        assert abs(got.relative_residual - ref.relative_residual) <= ctol
        if got.side != ref.side:  # a tie within the certificates' tolerance
            left = glora_aggregate(mods, rank=R, side="left").relative_residual
            right = glora_aggregate(mods, rank=R, side="right").relative_residual
            assert abs(left - right) <= 2 * ctol
            continue
        scale = sum(float(f.B.norm() * f.A.norm()) for f in mods) / n
        tol = state_tol(torch.float32, d=d, k=k, ranks=[r] * n, kappa=1.0, gap=ref.gap,
                        scale=scale)  # fmt: skip
        assert float((f64(got.delta()) - f64(ref.delta())).norm()) <= tol


def test_the_stack_keeps_the_right_side_where_the_clients_share_row_spaces() -> None:
    # Module 0: the clients share one B (left exact at R = r); module 1: they share one A
    # (right exact). side="auto" keeps left for module 0 and right for module 1, both with a
    # zero certified residual, and both certified from the Gram matrices (P16).
    g = torch.Generator().manual_seed(3)
    d, k, r, n = 24, 20, 2, 4
    B0, A1 = torch.randn(d, r, generator=g), torch.randn(r, k, generator=g)
    fs = []
    for _ in range(n):
        B = torch.stack([B0, torch.randn(d, r, generator=g)])
        A = torch.stack([torch.randn(r, k, generator=g), A1])
        fs.append(LoRAFactors(B, A))
    states = glora_aggregate_stack(fs, rank=r)
    assert [s.side for s in states] == ["left", "right"]
    for j, s in enumerate(states):
        assert s.certificate is not None
        assert s.certificate.method == "gram"
        mods = [LoRAFactors(f.B[j], f.A[j]) for f in fs]
        assert s.relative_residual <= _cert_tol(mods, s.S)
    fixed = glora_aggregate_stack(fs, rank=r, side="right")
    assert [s.side for s in fixed] == ["right", "right"]


def test_the_stack_function_refuses_one_module() -> None:
    f = LoRAFactors(torch.randn(6, 2), torch.randn(2, 5))
    with pytest.raises(GloraError, match="glora_aggregate_stack takes stacked modules"):
        glora_aggregate_stack([f, f], rank=2)


def test_the_glora_auto_operator_aggregates_a_group_like_each_module() -> None:
    # aggregate_modules groups same-shape modules into one glora_aggregate_stack call; the
    # results equal the per-module operator's (the update, each readout, the certificate).
    fs = _float32_stack(3, 3, (16, 12, 2), seed=5)
    modules = {f"m{j}": [LoRAFactors(f.B[j], f.A[j]) for f in fs] for j in range(3)}
    grouped = aggregate_modules(modules, operator="glora_auto", rank=4)
    op = get_operator("glora_auto")
    for name, clients in modules.items():
        one = op(clients, None, rank=4)
        got = grouped.results[name]
        assert got.certificate is not None
        assert one.certificate is not None
        ref = glora_aggregate(clients, rank=4, side="auto")
        tol = _cert_tol(list(clients), ref.S)
        assert abs(got.certificate.relative_residual - one.certificate.relative_residual) <= tol
        scale = sum(float(c.B.norm() * c.A.norm()) for c in clients)
        stol = state_tol(torch.float32, d=16, k=12, ranks=[2] * 3, kappa=1.0, gap=ref.gap,
                         scale=scale)  # fmt: skip
        assert float((f64(got.update.delta()) - f64(one.update.delta())).norm()) <= stol
