"""SPEC propositions P1-P6 on the GLoRA core, against dense float64 references."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import (
    LoRAFactors,
    RankClampedWarning,
    apply_gauge,
    eckart_young_error,
    gauge_fix,
    glora_aggregate,
    readout,
    readouts,
)
from glora_math.linalg import projector_distance
from glora_math.tolerances import product_tol, subspace_tol

from .helpers import (
    best_rank_error,
    cond,
    dense_K,
    f64,
    n_dims,
    state_tol,
    unique_or_reject,
)
from .strategies import gauges_for, gaussian_clients, problems

MODES = st.sampled_from(["qr", "svd"])
GAUGE_KINDS = st.sampled_from(["invertible", "orthogonal", "special_orthogonal"])


def _draw_rank(data, pb, *, at_least_union: bool = False) -> int:  # type: ignore[no-untyped-def]
    union = pb.union_dim()
    if at_least_union:
        return union
    return data.draw(st.integers(1, union), label="R")


@given(problems(weights="with_zeros", zero_updates=True, deficient=True), MODES, st.data())
def test_P1_server_update_is_the_projection_of_the_mean(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    # In svd mode U_i spans col(B_i A_i) = col(B_i) here (A_i has full row rank), so a rank
    # drawn up to the union of the col(B_i) is valid for both modes.
    if pb.union_dim() == 0:
        return
    R = _draw_rank(data, pb)
    state = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode))
    W = pb.mean()
    U = f64(state.U)
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=1.0, scale=pb.scale()
    )
    assert float((f64(state.delta()) - U @ (U.mT @ W)).norm()) <= tol


@given(problems(weights="with_zeros", zero_updates=True, deficient=True), MODES)
def test_P2_exact_when_R_spans_the_union(pb, mode) -> None:  # type: ignore[no-untyped-def]
    R = pb.union_dim()
    if R == 0:
        return
    state = glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode)
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=state.gap, scale=pb.scale()
    )
    assert float((f64(state.delta()) - pb.mean()).norm()) <= tol


@given(problems(max_clients=1), MODES)
def test_P2_single_client_is_reproduced_at_its_own_rank(pb, mode) -> None:  # type: ignore[no-untyped-def]
    f = pb.factors[0]
    state = glora_aggregate([f], rank=f.rank, gauge=mode)
    scale = float(f.B.norm() * f.A.norm())
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=state.gap, scale=scale
    )
    assert float((f64(state.delta()) - f64(f.delta())).norm()) <= tol


@given(problems(equal_ranks=True), MODES, st.data())
def test_P2_coinciding_subspaces_with_R_equal_r(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    # All clients share col(B_0): B_i = B_0 X_i with X_i invertible.
    r = pb.ranks[0]
    if r > pb.d:
        return
    B0 = pb.factors[0].B
    g = torch.Generator().manual_seed(pb.seed + 7)
    from glora_math import random_invertible

    clients = [
        LoRAFactors(B0 @ random_invertible(r, cond=pb.cond, generator=g).to(pb.dtype), f.A)
        for f in pb.factors
    ]
    state = glora_aggregate(clients, pb.weights, rank=r, gauge=mode)
    W = sum(
        (float(pb.p[i]) * f64(c.delta()) for i, c in enumerate(clients)),
        start=torch.zeros(pb.d, pb.k, dtype=torch.float64),
    )
    scale = sum(float(pb.p[i]) * float(c.B.norm() * c.A.norm()) for i, c in enumerate(clients))
    kappa = max(cond(c.B) for c in clients)
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=kappa, gap=state.gap, scale=scale
    )
    assert float((f64(state.delta()) - W).norm()) <= tol


@given(problems(weights="random"), MODES, GAUGE_KINDS, st.data())
def test_P3_gauge_invariance_of_K_subspace_and_update(pb, mode, kind, data) -> None:  # type: ignore[no-untyped-def]
    R = _draw_rank(data, pb)
    Gs, _ = data.draw(gauges_for(pb.ranks, kind=kind), label="gauges")
    gauged = [apply_gauge(f, G.to(pb.dtype)) for f, G in zip(pb.factors, Gs, strict=True)]
    s0 = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode))
    s1 = unique_or_reject(lambda: glora_aggregate(gauged, pb.weights, rank=R, gauge=mode))
    kappa = max(max(cond(f.B), cond(h.B)) for f, h in zip(pb.factors, gauged, strict=True))
    if mode == "svd":
        kappa *= max(max(cond(f.A), cond(h.A)) for f, h in zip(pb.factors, gauged, strict=True))
    scale = sum(
        float(pb.p[i]) * max(float(f.B.norm() * f.A.norm()), float(h.B.norm() * h.A.norm()))
        for i, (f, h) in enumerate(zip(pb.factors, gauged, strict=True))
    )
    n = n_dims(pb.d, pb.k, pb.ranks)
    gap = min(s0.gap, s1.gap)
    # K: the projectors are gauge invariant.
    K0 = dense_K([gauge_fix(f, mode) for f in pb.factors], pb.p)
    K1 = dense_K([gauge_fix(h, mode) for h in gauged], pb.p)
    assert float((K0 - K1).norm()) <= subspace_tol(pb.dtype, n=n, kappa=kappa, gap=1.0) * 2 * n
    # span(U_ref): compared through projectors, never bases.
    assert (
        projector_distance(f64(s0.U), f64(s1.U))
        <= subspace_tol(pb.dtype, n=n, kappa=kappa, gap=gap) * (2 * R) ** 0.5
    )
    # U_ref S: the update itself.
    tol = state_tol(pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=kappa, gap=gap, scale=scale)
    assert float((f64(s0.delta()) - f64(s1.delta())).norm()) <= tol


@given(
    problems(weights="random", zero_updates=True, deficient=True),
    st.data(),
    st.sampled_from(["balanced", "left", "right"]),
)
def test_P4_readout_is_best_nested_exact_at_R_and_monotone(pb, data, split) -> None:  # type: ignore[no-untyped-def]
    union = pb.union_dim()
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")
    state = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R))
    X = f64(state.delta())
    n = n_dims(pb.d, pb.k, pb.ranks)
    scale = float(X.norm())
    tol = product_tol(pb.dtype, n=n, scale=scale, kappa=1.0)
    outs = readouts(state, list(range(1, R + 1)), split=split)
    errors = []
    for r, ro in enumerate(outs, start=1):
        assert ro.B.shape == (pb.d, r)
        assert ro.A.shape == (r, pb.k)
        err = float((f64(ro.delta()) - X).norm())
        errors.append(err)
        # Best rank-r approximation: error equals the dense Eckart-Young error of U_ref S.
        assert abs(err - best_rank_error(X, r)) <= tol
        assert abs(err - eckart_young_error(state, r)) <= tol
        # Same factors from readout() as from readouts().
        single = readout(state, r, split=split)
        assert torch.equal(single.B, ro.B)
        assert torch.equal(single.A, ro.A)
    # Nested: the rank-r product is the leading part of the rank-(r+1) product.
    for small, big in itertools.pairwise(outs):
        r = small.rank
        assert float((f64(big.B[:, :r] @ big.A[:r]) - f64(small.delta())).norm()) <= tol
    # Monotone, and exact at r = R.
    assert all(a >= b - tol for a, b in itertools.pairwise(errors))
    assert errors[-1] <= tol


@given(problems(weights="random"), st.data(), st.floats(1e-3, 1e3), MODES)
def test_P5_scaling_one_client_leaves_K_and_U_ref_unchanged(pb, data, c, mode) -> None:  # type: ignore[no-untyped-def]
    R = _draw_rank(data, pb)
    j = data.draw(st.integers(0, pb.n - 1), label="client")
    scaled = list(pb.factors)
    scaled[j] = LoRAFactors(scaled[j].B * c, scaled[j].A)
    s0 = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode))
    s1 = unique_or_reject(lambda: glora_aggregate(scaled, pb.weights, rank=R, gauge=mode))
    n = n_dims(pb.d, pb.k, pb.ranks)
    kappa = pb.cond**2 if mode == "svd" else pb.cond
    K0 = dense_K([gauge_fix(f, mode) for f in pb.factors], pb.p)
    K1 = dense_K([gauge_fix(f, mode) for f in scaled], pb.p)
    assert float((K0 - K1).norm()) <= subspace_tol(pb.dtype, n=n, kappa=kappa, gap=1.0) * 2 * n
    gap = min(s0.gap, s1.gap)
    assert (
        projector_distance(f64(s0.U), f64(s1.U))
        <= subspace_tol(pb.dtype, n=n, kappa=kappa, gap=gap) * (2 * R) ** 0.5
    )


@given(problems(weights="random"), st.data(), MODES)
def test_P6_permutation_invariance(pb, data, mode) -> None:  # type: ignore[no-untyped-def]
    R = _draw_rank(data, pb)
    perm = data.draw(st.permutations(range(pb.n)), label="perm")
    w = pb.weights
    s0 = unique_or_reject(lambda: glora_aggregate(pb.factors, w, rank=R, gauge=mode))
    s1 = unique_or_reject(
        lambda: glora_aggregate([pb.factors[i] for i in perm], w[list(perm)], rank=R, gauge=mode)
    )
    kappa = pb.cond**2 if mode == "svd" else pb.cond
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=kappa, gap=s0.gap, scale=pb.scale()
    )
    assert float((f64(s0.delta()) - f64(s1.delta())).norm()) <= tol


@given(problems(weights="with_zeros"), st.data(), MODES)
def test_P6_zero_weight_clients_drop_out(pb, data, mode) -> None:  # type: ignore[no-untyped-def]
    keep = [i for i in range(pb.n) if float(pb.weights[i]) > 0]
    sub = [pb.factors[i] for i in keep]
    union = pb.union_dim()
    R = data.draw(st.integers(1, union), label="R")
    s0 = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode))
    s1 = unique_or_reject(lambda: glora_aggregate(sub, pb.weights[keep], rank=R, gauge=mode))
    kappa = pb.cond**2 if mode == "svd" else pb.cond
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=kappa, gap=s0.gap, scale=pb.scale()
    )
    assert float((f64(s0.delta()) - f64(s1.delta())).norm()) <= tol
    assert (
        projector_distance(f64(s0.U), f64(s1.U))
        <= subspace_tol(pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), kappa=kappa, gap=s0.gap)
        * (2 * R) ** 0.5
    )


def test_P7_witness_fedit_is_not_gauge_invariant() -> None:
    # A concrete witness for SPEC P7 on the core's FedIT: two clients, a rotation of one.
    from glora_math import fedit, random_orthogonal

    g = torch.Generator().manual_seed(0)
    fs = gaussian_clients(2, 6, 2, 5, generator=g)
    G = random_orthogonal(2, generator=g)
    moved = [fs[0], apply_gauge(fs[1], G)]
    change = float((fedit(fs).delta() - fedit(moved).delta()).norm())
    assert change > 0.1 * float(fs[0].delta().norm())
    # ... while GLoRA's update does not move.
    a = glora_aggregate(fs, rank=4).delta()
    b = glora_aggregate(moved, rank=4).delta()
    assert float((a - b).norm()) <= product_tol(torch.float64, n=6 + 5 + 4, scale=float(a.norm()))


def test_lora_initialisation_all_B_zero() -> None:
    # LoRA's first round: every B is zero; the state is empty and readouts are zero factors.
    fs = [LoRAFactors(torch.zeros(8, 2), torch.randn(2, 5)) for _ in range(3)]
    with pytest.warns(RankClampedWarning, match="all client updates are zero"):
        state = glora_aggregate(fs, rank=2)
    assert state.rank == 0
    assert state.requested_rank == 2
    ro = readout(state, 2)
    assert ro.B.shape == (8, 2)
    assert ro.A.shape == (2, 5)
    assert not bool(ro.delta().any())
