"""Randomized consensus (Sketch): what holds exactly, and what holds when the sketch is wide.

Statements:
- P1 for the subspace the sketch found: ``U S = U U^T W_bar`` and U orthonormal, whatever U is.
- When the union of the client subspaces fits in the sketch (dim <= R + oversample), the sketch
  captures all of range(K) and the result is the exact consensus subspace (Davis-Kahan).
- Gauge invariance: the sketch sees the clients only through K, so another gauge of the same
  updates gives the same subspace for the same seed.
- Same seed, same bits; the cheap finiteness check falls back correctly on overflow.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import (
    GloraError,
    LoRAFactors,
    Sketch,
    apply_gauge,
    consensus_basis,
    gauge_fix,
    glora_aggregate,
)
from glora_math.linalg import projector_distance, randomized_left_svd, tall_left_svd
from glora_math.tolerances import aggregate_tol, orthonormality_tol, product_tol, subspace_tol
from glora_math.validation import all_finite

from .helpers import dense_K, f64, n_dims, state_tol, unique_or_reject
from .strategies import gapped_problems, gauges_for, gaussian_clients, problems


def _narrow(extra: int) -> Sketch:
    return Sketch(oversample=extra, power_iters=1, seed=7)


@given(problems(weights="with_zeros", deficient=True), st.integers(0, 3), st.data())
def test_P1_holds_for_the_sketched_subspace(pb, oversample, data) -> None:  # type: ignore[no-untyped-def]
    union = pb.union_dim()
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")
    state = unique_or_reject(
        lambda: glora_aggregate(pb.factors, pb.weights, rank=R, sketch=_narrow(oversample))
    )
    n = n_dims(pb.d, pb.k, pb.ranks)
    U = f64(state.U)
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    assert float((U.mT @ U - eye).norm()) <= orthonormality_tol(pb.dtype, n=n)
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=1.0, scale=pb.scale()
    )
    assert float((f64(state.delta()) - U @ (U.mT @ pb.mean())).norm()) <= tol


@given(gapped_problems())
def test_a_sketch_as_wide_as_the_union_finds_the_exact_subspace(gp) -> None:  # type: ignore[no-untyped-def]
    pb = gp.problem
    union = pb.union_dim()
    sketch = Sketch(oversample=union - gp.R, power_iters=0, seed=3)
    fixed = [gauge_fix(f, "qr") for f in pb.factors]
    basis = consensus_basis(fixed, pb.p, rank=gp.R, sketch=sketch)
    # K's smallest non-zero eigenvalue is min_i p_i: the sketch K Omega resolves directions
    # down to it, so its ratio to the largest (1) conditions the sketch.
    kappa = 1.0 / float(pb.p.min())
    n = n_dims(pb.d, pb.k, pb.ranks)
    tol = subspace_tol(pb.dtype, n=n, kappa=kappa, gap=gp.gap)
    assert projector_distance(f64(basis.U), gp.V) <= tol * (2 * gp.R) ** 0.5
    # The reported spectrum (squared Ritz values) is then K's spectrum.
    lam = torch.linalg.eigvalsh(dense_K(fixed, pb.p)).flip(0)[:union]
    err = float((f64(basis.eigvals[:union]) - lam).abs().max())
    assert err <= product_tol(pb.dtype, n=n, scale=1.0, kappa=kappa)


@given(problems(deficient=False), st.data())
def test_the_sketch_is_gauge_invariant(pb, data) -> None:  # type: ignore[no-untyped-def]
    R = data.draw(st.integers(1, pb.union_dim()), label="R")
    gauges, gcond = data.draw(gauges_for(pb.ranks, kind="invertible"), label="gauges")
    sketch = _narrow(1)
    s1 = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R, sketch=sketch))
    moved = [apply_gauge(f, Q) for f, Q in zip(pb.factors, gauges, strict=True)]
    s2 = unique_or_reject(lambda: glora_aggregate(moved, pb.weights, rank=R, sketch=sketch))
    n = n_dims(pb.d, pb.k, pb.ranks)
    # The Ritz gap of the sketch plays the role of the eigengap for the sketched subspace.
    tol = subspace_tol(
        pb.dtype, n=n, kappa=pb.cond * gcond, gap=min(s1.gap, s2.gap) / float(s1.eigvals[0])
    )
    assert projector_distance(f64(s1.U), f64(s2.U)) <= tol * (2 * R) ** 0.5


def test_same_seed_same_bits_and_other_seed_other_sketch() -> None:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(64, 40, generator=g, dtype=torch.float64)
    U1, s1 = randomized_left_svd(M, 5, power_iters=0, generator=torch.Generator().manual_seed(1))
    U2, s2 = randomized_left_svd(M, 5, power_iters=0, generator=torch.Generator().manual_seed(1))
    U3, _ = randomized_left_svd(M, 5, power_iters=0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(U1, U2)
    assert torch.equal(s1, s2)
    assert not torch.equal(U1, U3)


def test_ritz_values_are_lower_bounds_and_power_iterations_converge() -> None:
    g = torch.Generator().manual_seed(0)
    # Singular values 1, 0.9, ..., decaying geometrically: a slow spectrum for the sketch.
    Q1, _ = torch.linalg.qr(torch.randn(200, 60, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    sv = 0.9 ** torch.arange(60, dtype=torch.float64)
    M = Q1 @ torch.diag(sv) @ Q2.mT
    exact_U, exact_s = tall_left_svd(M)
    errors = []
    for q in (0, 2, 6):
        U, s = randomized_left_svd(M, 10, power_iters=q, generator=torch.Generator().manual_seed(5))
        assert bool((s <= exact_s[:10] * (1 + 1e-12)).all())
        errors.append(projector_distance(U[:, :3], exact_U[:, :3]))
    # The bound (sigma_11 / sigma_3)^(4q+2) = 0.9^(32q+16): 0.19, 0.006, 5e-9 up to a
    # constant; each step must shrink the error by orders of magnitude.
    assert errors[0] > 10 * errors[1] > 100 * errors[2]


def test_the_batched_sketch_matches_the_per_module_sketch() -> None:
    g = torch.Generator().manual_seed(4)
    L, d, k, r, n = 3, 40, 30, 4, 5
    Bs = [torch.randn(L, d, r, generator=g, dtype=torch.float64) for _ in range(n)]
    As = [torch.randn(L, r, k, generator=g, dtype=torch.float64) for _ in range(n)]
    sketch = Sketch(oversample=2, power_iters=2, seed=11)
    batched = glora_aggregate(
        [LoRAFactors(B, A) for B, A in zip(Bs, As, strict=True)], rank=3, sketch=sketch
    )
    for layer in range(L):
        single = glora_aggregate(
            [(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)], rank=3, sketch=sketch
        )
        scale = float(single.delta().norm())
        tol = aggregate_tol(
            torch.float64,
            n=d + k + n * r,
            kappa=1.0,
            gap=single.gap / single.eigvals[0],
            scale=scale,
        )
        assert float((batched.U[layer] @ batched.S[layer] - single.delta()).norm()) <= tol


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_sketch_settings_are_validated(bad: object) -> None:
    with pytest.raises(GloraError, match=r"Sketch\.oversample"):
        Sketch(oversample=bad)  # type: ignore[arg-type]


def test_all_finite_falls_back_when_the_sum_overflows() -> None:
    big = torch.full((4,), 1e308, dtype=torch.float64)
    assert all_finite(big)  # the sum is inf, every entry is finite
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
    assert all_finite(torch.zeros(0))
    # One entry: no reduction shortcut may skip it.
    assert not all_finite(torch.tensor([float("nan")]))
    assert all_finite(torch.tensor([2.0]))


def test_consensus_basis_uses_the_sketch_it_is_given() -> None:
    # Random client subspaces give K a flat spectrum, so a narrow sketch without power
    # iterations finds a subspace visibly different from the exact one; consensus_basis must
    # return that sketched subspace, the one glora_aggregate builds its state on.
    g = torch.Generator().manual_seed(8)
    clients = gaussian_clients(6, 60, 4, 9, generator=g)
    fixed = [gauge_fix(f, "qr") for f in clients]
    sketch = Sketch(oversample=0, power_iters=0, seed=1)
    sketched = consensus_basis(fixed, None, rank=3, sketch=sketch)
    state = glora_aggregate(clients, rank=3, sketch=sketch)
    tol = orthonormality_tol(torch.float64, n=60 + 9 + 24)
    assert projector_distance(sketched.U, state.U) <= tol
    exact = consensus_basis(fixed, None, rank=3)
    assert projector_distance(sketched.U, exact.U) > 0.1
