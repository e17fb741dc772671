"""Tests written for surviving mutants of ``batched.py`` (docs/mutation.md).

The stacked route (clients carrying a batch of same-shape modules) takes the batched Gram
route where the per-module operator would take the Gram route: float32 and half clients, qr
gauge, every client's rank at most d, a sketch narrower than the clients' span; float64
stacks take the batched Householder route. Either way every module equals the per-module
operator on its own clients.
"""

from __future__ import annotations

import pytest
import torch

from glora_math import LoRAFactors, RankClampedWarning, ServerState, Sketch, glora_aggregate
from glora_math.testing.helpers import f64, state_tol
from glora_math.testing.strategies import conditioned_matrix
from glora_math.tolerances import eigenvalue_error, orthonormality_tol, zero_gap_tol

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
