"""Small contracts of the core API that the propositions do not pin down.

Readout splits, gauge generators' determinism and norms, dtype round trips of apply_gauge,
the empty server state, spectrum length with zero-weight clients, warning attribution.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import glora_math as gm
from glora_math.tolerances import product_tol, storage_tol

from .helpers import f64, unique_or_reject
from .strategies import problems


@given(problems(weights="random"), st.data())
def test_readout_splits_place_the_singular_values(pb, data) -> None:  # type: ignore[no-untyped-def]
    union = pb.union_dim()
    R = data.draw(st.integers(1, union), label="R")
    state = unique_or_reject(lambda: gm.glora_aggregate(pb.factors, pb.weights, rank=R))
    s = torch.linalg.svdvals(f64(state.S))
    r = data.draw(st.integers(1, R), label="r")
    tol = product_tol(pb.dtype, n=pb.d + pb.k + R, scale=float(s[0]) + 1.0)
    eye = torch.eye(r, dtype=torch.float64)
    sr = torch.diag(s[:r])
    bal = gm.readout(state, r)  # default split: balanced
    assert float((f64(bal.B).mT @ f64(bal.B) - sr).norm()) <= tol
    assert float((f64(bal.A) @ f64(bal.A).mT - sr).norm()) <= tol
    assert all(
        torch.equal(x, y)
        for a, b in zip(gm.readouts(state, [r]), [bal], strict=True)
        for x, y in ((a.B, b.B), (a.A, b.A))
    )
    left = gm.readout(state, r, split="left")
    assert float((f64(left.A) @ f64(left.A).mT - eye).norm()) <= tol
    assert float((f64(left.B).mT @ f64(left.B) - sr @ sr).norm()) <= tol * float(s[0] + 1)
    right = gm.readout(state, r, split="right")
    assert float((f64(right.B).mT @ f64(right.B) - eye).norm()) <= tol
    assert float((f64(right.A) @ f64(right.A).mT - sr @ sr).norm()) <= tol * float(s[0] + 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda g, dt: gm.random_orthogonal(4, generator=g, dtype=dt),
        lambda g, dt: gm.random_special_orthogonal(4, generator=g, dtype=dt),
        lambda g, dt: gm.random_invertible(4, cond=30.0, generator=g, dtype=dt),
    ],
    ids=["O", "SO", "GL"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gauge_generators_are_seeded_typed_and_unit_norm(make, dtype) -> None:  # type: ignore[no-untyped-def]
    a = make(torch.Generator().manual_seed(5), dtype)
    b = make(torch.Generator().manual_seed(5), dtype)
    c = make(torch.Generator().manual_seed(6), dtype)
    assert a.dtype == dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert abs(float(torch.linalg.matrix_norm(a.double(), ord=2)) - 1.0) <= product_tol(
        dtype, n=8, scale=1.0, kappa=30.0
    )


def test_random_invertible_default_condition_is_ten() -> None:
    G = gm.random_invertible(3, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(G)
    assert abs(float(s[0] / s[-1]) - 10.0) <= product_tol(torch.float64, n=6, scale=10.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_apply_gauge_keeps_the_factors_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    f = gm.LoRAFactors(
        torch.randn(6, 3, generator=g).to(dtype), torch.randn(3, 5, generator=g).to(dtype)
    )
    G = gm.random_invertible(3, cond=3.0, generator=g)  # float64 gauge
    h = gm.apply_gauge(f, G)
    assert h.B.dtype == dtype
    assert h.A.dtype == dtype
    # The gauged factors are stored in the input dtype: its rounding dominates.
    tol = storage_tol(dtype, scale=float(f.B.float().norm() * f.A.float().norm()), kappa=3.0)
    assert float((h.delta().float() - f.delta().float()).norm()) <= tol


def test_apply_gauge_singular_message() -> None:
    f = gm.LoRAFactors(
        torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    )
    with pytest.raises(gm.GaugeError, match=r"^gauge matrix is singular$"):
        gm.apply_gauge(f, torch.zeros(2, 2, dtype=torch.float64))


def test_gauge_fix_defaults_to_qr() -> None:
    g = torch.Generator().manual_seed(0)
    f = gm.LoRAFactors(
        torch.randn(6, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 4, generator=g, dtype=torch.float64),
    )
    a, b = gm.gauge_fix(f), gm.gauge_fix(f, "qr")
    assert torch.equal(a.U, b.U)
    assert torch.equal(a.C, b.C)
    assert not torch.equal(gm.gauge_fix(f, "svd").U, a.U)


def test_empty_state_fields() -> None:
    fs = [
        gm.LoRAFactors(
            torch.zeros(5, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
        )
    ]
    with pytest.warns(gm.RankClampedWarning):
        basis = gm.consensus_basis([gm.gauge_fix(fs[0])], rank=1)
    assert basis.U.shape == (5, 0)
    assert basis.eigvals.shape == (0,)
    assert basis.gap == 0.0
    assert isinstance(basis.gap, float)


@given(problems(weights="with_zeros"))
def test_spectrum_length_counts_only_positive_weight_clients(pb) -> None:  # type: ignore[no-untyped-def]
    fixed = [gm.gauge_fix(f) for f in pb.factors]
    live = sum(f.rank for i, f in enumerate(fixed) if float(pb.weights[i]) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.GloraWarning)
        basis = gm.consensus_basis(fixed, pb.weights, rank=1)
    assert basis.eigvals.numel() == min(pb.d, live)


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add a stack frame"
)
def test_warnings_point_at_the_caller() -> None:
    fs = [
        gm.LoRAFactors(
            torch.eye(4, dtype=torch.float64)[:, :1], torch.ones(1, 3, dtype=torch.float64)
        )
    ]
    with pytest.warns(gm.RankClampedWarning) as rec:
        gm.consensus_basis([gm.gauge_fix(fs[0])], rank=2)
    assert rec[0].filename == __file__
    e = torch.eye(4, dtype=torch.float64)
    two = [
        gm.gauge_fix(gm.LoRAFactors(e[:, i : i + 1], torch.ones(1, 3, dtype=torch.float64)))
        for i in range(2)
    ]
    with pytest.warns(gm.ZeroEigengapWarning) as rec:
        gm.consensus_basis(two, rank=1)
    assert rec[0].filename == __file__


@pytest.mark.parametrize("mode", ["qr", "svd"])
def test_numerical_rank_uses_the_lapack_rule(mode: str) -> None:
    # tol = max(d, k or r) * eps * s_max. With d = 20, a singular value of 1e-15 (between
    # 2 eps and 20 eps) is numerically zero: the update has rank 1, not 2.
    d = 20
    B = torch.zeros(d, 2, dtype=torch.float64)
    B[0, 0], B[1, 1] = 1.0, 1e-15
    A = torch.eye(2, 3, dtype=torch.float64)
    assert gm.gauge_fix(gm.LoRAFactors(B, A), mode).rank == 1  # type: ignore[arg-type]
    B[1, 1] = 1e-13  # above the threshold: rank 2
    assert gm.gauge_fix(gm.LoRAFactors(B, A), mode).rank == 2  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
@pytest.mark.parametrize(
    "make", [gm.random_orthogonal, gm.random_special_orthogonal, gm.random_invertible]
)
def test_gauge_generators_reject_bad_sizes(make, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(gm.RankError, match="gauge size must be a positive int"):
        make(bad)


@given(problems(weights="random"), st.sampled_from(["qr", "svd"]), st.data())
def test_server_state_records_spectrum_and_gauge(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    R = data.draw(st.integers(1, pb.union_dim()), label="R")
    state = unique_or_reject(lambda: gm.glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode))
    basis = unique_or_reject(
        lambda: gm.consensus_basis([gm.gauge_fix(f, mode) for f in pb.factors], pb.weights, rank=R)
    )
    assert state.gauge == mode
    tol = product_tol(pb.dtype, n=pb.d + pb.k + sum(pb.ranks), scale=1.0, kappa=pb.cond)
    assert state.eigvals.shape == basis.eigvals.shape
    assert float((state.eigvals - basis.eigvals).abs().max()) <= tol
    assert abs(state.gap - basis.gap) <= tol


def test_clamp_warning_says_what_happened() -> None:
    f = gm.gauge_fix(
        gm.LoRAFactors(
            torch.eye(4, dtype=torch.float64)[:, :1], torch.ones(1, 3, dtype=torch.float64)
        )
    )
    with pytest.warns(
        gm.RankClampedWarning, match=r"server rank 3 exceeds the dimension 1 .*clamped to 1"
    ):
        gm.consensus_basis([f], rank=3)
