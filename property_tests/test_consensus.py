"""The consensus basis against a dense eigendecomposition of K = sum_i p_i U_i U_i^T."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import glora_math as gm
from glora_math import (
    GaugeError,
    GaugeFixed,
    LoRAFactors,
    NonFiniteError,
    RankClampedWarning,
    ShapeMismatchError,
    ZeroEigengapWarning,
    consensus_basis,
    gauge_fix,
)
from glora_math.consensus import eigengap, stacked_bases
from glora_math.linalg import projector_distance
from glora_math.tolerances import orthonormality_tol, product_tol, subspace_tol, zero_gap_tol

from .helpers import dense_K, f64, n_dims, top_eigenspace, unique_or_reject
from .strategies import SEEDS, problems


@given(
    problems(weights="with_zeros", zero_updates=True, deficient=True),
    st.sampled_from(["qr", "svd"]),
    st.data(),
)
def test_consensus_basis_is_the_top_eigenspace_of_K(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    fixed = [gauge_fix(f, mode) for f in pb.factors]
    K = dense_K(fixed, pb.p)
    lam = torch.linalg.eigvalsh(K).flip(0)
    avail = int((lam > lam[0] * pb.d * torch.finfo(torch.float64).eps * 10).sum())
    if avail == 0:
        return
    R = data.draw(st.integers(1, avail), label="R")
    basis = unique_or_reject(lambda: consensus_basis(fixed, pb.weights, rank=R))
    V, lam = top_eigenspace(K, R)
    n = n_dims(pb.d, pb.k, pb.ranks)
    # Spectrum: eigenvalues of K from the stacked bases.
    m = basis.eigvals.numel()
    assert float((f64(basis.eigvals) - lam[:m]).abs().max()) <= product_tol(
        pb.dtype, n=n, scale=1.0
    )
    # Subspace: within Davis-Kahan of the dense top-R eigenspace.
    gap = float(lam[R - 1] - (lam[R] if lam.numel() > R else 0.0))
    tol = subspace_tol(pb.dtype, n=n, kappa=1.0, gap=gap)
    assert projector_distance(f64(basis.U), V) <= tol * (2 * R) ** 0.5
    assert abs(basis.gap - gap) <= product_tol(pb.dtype, n=n, scale=1.0)


@given(problems(zero_updates=True, deficient=True))
def test_rank_above_the_union_is_clamped_with_a_warning(pb) -> None:  # type: ignore[no-untyped-def]
    fixed = [gauge_fix(f, "qr") for f in pb.factors]
    union = pb.union_dim()
    with pytest.warns(RankClampedWarning):
        basis = consensus_basis(fixed, pb.weights, rank=union + 1)
    assert basis.rank == union
    # The spectrum reported on this (QR) route is still that of K.
    lam = torch.linalg.eigvalsh(dense_K(fixed, pb.p)).flip(0)
    m = basis.eigvals.numel()
    n = n_dims(pb.d, pb.k, pb.ranks)
    err = (f64(basis.eigvals) - lam[:m]).abs()
    assert m == 0 or float(err.max()) <= product_tol(pb.dtype, n=n, scale=1.0)


def test_zero_eigengap_warns() -> None:
    # Two clients with orthogonal 1-D subspaces and equal weights: K has eigenvalue 1/2 twice,
    # so the top-1 eigenspace is not unique.
    e = torch.eye(4, dtype=torch.float64)
    A = torch.ones(1, 3, dtype=torch.float64)
    fs = [gm.LoRAFactors(e[:, :1], A), gm.LoRAFactors(e[:, 1:2], A)]
    with pytest.warns(gm.ZeroEigengapWarning, match=r"lambda_R=5\.000e-01, lambda_R\+1=5\.000e-01"):
        state = gm.glora_aggregate(fs, rank=1)
    assert state.gap == 0.0
    # More client directions than d (m = 4 > d = 2): still a zero gap, still a warning.
    e2 = torch.eye(2, dtype=torch.float64)
    many = [gm.LoRAFactors(e2[:, i % 2 : i % 2 + 1], A) for i in range(4)]
    with pytest.warns(gm.ZeroEigengapWarning, match="not unique"):
        gm.glora_aggregate(many, rank=1)
    # The message names lambda_R and lambda_R+1: here K = diag(1/2, 1/4, 1/4) and R = 2.
    three = [*fs, gm.LoRAFactors(e[:, 2:3], A)]
    with pytest.warns(gm.ZeroEigengapWarning, match=r"lambda_R=2\.500e-01, lambda_R\+1=2\.500e-01"):
        gm.glora_aggregate(three, [2.0, 1.0, 1.0], rank=2)
    # With unequal weights the gap is |p_1 - p_2| and no warning is raised.
    state = gm.glora_aggregate(fs, [3.0, 1.0], rank=1)
    assert abs(state.gap - 0.5) <= product_tol(torch.float64, n=8, scale=1.0)


@given(st.integers(2, 12), st.integers(1, 4), st.floats(1e-9, 1.5), SEEDS)
def test_principal_angles_match_a_dense_reference_and_resolve_small_angles(
    d, p, theta, seed
) -> None:  # type: ignore[no-untyped-def]
    from glora_math.linalg import principal_angles

    if 2 * p > d:
        return
    g = torch.Generator().manual_seed(seed)
    Q = gm.random_orthogonal(d, generator=g)
    X, Y = Q[:, :p], Q[:, p : 2 * p]
    rotated = X * math.cos(theta) + Y * math.sin(theta)  # every principal angle equals theta
    angles = principal_angles(X, rotated)
    assert angles.shape == (p,)
    tol = product_tol(torch.float64, n=d + p, scale=1.0)
    assert float((angles - theta).abs().max()) <= tol  # accurate even for theta ~ 1e-9
    # Dense reference by cosines for angles where arccos is well conditioned.
    if theta > 1e-3:
        ref = torch.arccos(torch.linalg.svdvals(X.mT @ rotated).clamp(0, 1)).sort().values
        assert float((angles - ref).abs().max()) <= tol / math.sin(theta)


@given(st.integers(2, 4), st.floats(1e-12, 1e-2), st.integers(0, 6), SEEDS)
def test_nearly_coincident_subspaces_are_aggregated_exactly_at_the_union_rank(
    n, theta, spare, seed
) -> None:  # type: ignore[no-untyped-def]
    # Client i spans cos(theta_i) e_0 + sin(theta_i) e_i in a random basis: the union has
    # dimension n, but K's trailing eigenvalues are ~theta^2, far below the rounding level of
    # a Gram matrix. GLoRA at R = n must still be exact (P2) and must not clamp.
    d, k = n + 1 + spare, 5
    g = torch.Generator().manual_seed(seed)
    basis = gm.random_orthogonal(d, generator=g)
    t = theta * (1.0 + torch.rand(n, generator=g, dtype=torch.float64))
    fs = [
        gm.LoRAFactors(
            (
                math.cos(float(t[i])) * basis[:, :1]
                + math.sin(float(t[i])) * basis[:, i + 1 : i + 2]
            ),
            torch.randn(1, k, generator=g, dtype=torch.float64),
        )
        for i in range(n)
    ]
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    with warnings.catch_warnings():
        # lambda_R ~ theta^2 may sit below eigenvalue precision: the zero-gap warning is due.
        warnings.simplefilter("ignore", gm.ZeroEigengapWarning)
        state = gm.glora_aggregate(fs, w, rank=n)
    assert state.rank == n
    mean = gm.mean_update(fs, w)
    scale = sum(float(f.A.norm()) for f in fs)
    err = gm.fro_distance(gm.state_factors(state), mean)
    assert err <= product_tol(torch.float64, n=d + k + n, scale=scale)


@pytest.mark.parametrize("mode", ["qr", "svd"])
def test_rank_zero_clients_contribute_nothing(mode: str) -> None:
    # Empty factors (rank 0) are valid updates (zero); several of them must not disturb the
    # batched gauge fixing, and the state equals the one without them (weights renormalised).
    g = torch.Generator().manual_seed(3)
    f = gm.LoRAFactors(
        torch.randn(5, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 4, generator=g, dtype=torch.float64),
    )
    z = gm.LoRAFactors(
        torch.zeros(5, 0, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)
    )
    with_zeros = gm.glora_aggregate([z, z, f], [1.0, 1.0, 2.0], rank=2, gauge=mode)  # type: ignore[arg-type]
    alone = gm.glora_aggregate([f], rank=2, gauge=mode)  # type: ignore[arg-type]
    # p = 1/2 for f: the state is half of f's own.
    assert float((with_zeros.delta() - 0.5 * alone.delta()).norm()) <= product_tol(
        torch.float64, n=5 + 4 + 2, scale=float(f.B.norm() * f.A.norm())
    )


# -------------------------------------------------------------------------------------------------
# Tests that pin behaviour found by the mutation run (docs/mutation.md): each was written for a
# mutant of ``consensus.py`` that survived the property suite.
# -------------------------------------------------------------------------------------------------


F64 = torch.float64


def test_a_client_that_is_not_gauge_fixed_is_named_with_its_type() -> None:
    f = LoRAFactors(torch.ones(3, 1, dtype=F64), torch.ones(1, 2, dtype=F64))
    with pytest.raises(ShapeMismatchError) as err:
        consensus_basis([f], rank=1)  # type: ignore[list-item]
    assert err.value.client == 0
    assert err.value.message == "expected GaugeFixed(U, C) (see gauge_fix), got LoRAFactors"


def test_non_finite_coordinates_are_refused_with_their_message() -> None:
    ok = GaugeFixed(torch.eye(3, 1, dtype=F64), torch.ones(1, 2, dtype=F64))
    bad = GaugeFixed(torch.eye(3, 1, dtype=F64), torch.tensor([[1.0, float("nan")]], dtype=F64))
    with pytest.raises(NonFiniteError) as err:
        consensus_basis([ok, bad], rank=1)
    assert err.value.client == 1
    assert err.value.message == "basis or coordinates have NaN/Inf entries"


def test_a_half_precision_basis_is_checked_to_its_storage_precision() -> None:
    # A basis stored in float16 is orthonormal to float16 precision at best: the column
    # (1, 2^-8) (gap 2^-16, within float16 rounding) is accepted and computed in float32; the
    # column (1, 2^-2) (gap 1/16, far beyond it) is refused.
    fine = torch.tensor([[1.0], [2.0**-8]], dtype=torch.float16)
    assert 2.0**-16 > orthonormality_tol(torch.float32, n=3)  # float32's tolerance would refuse it
    basis = consensus_basis([GaugeFixed(fine, torch.ones(1, 2, dtype=torch.float16))], rank=1)
    assert basis.U.dtype == torch.float32
    bad = torch.tensor([[1.0], [2.0**-2]], dtype=torch.float16)
    with pytest.raises(GaugeError, match="not orthonormal"):
        consensus_basis([GaugeFixed(bad, torch.ones(1, 2, dtype=torch.float16))], rank=1)


def test_a_basis_exactly_at_the_orthonormality_tolerance_is_accepted() -> None:
    # d = 1, rho = 1: the tolerance is SAFETY * 2 * eps. U = [[x]] with x = 1 + tol / 2 has
    # fl(x^2) - 1 = tol exactly (x^2 = 1 + tol + tol^2 / 4, and tol^2 / 4 is below half an
    # ulp of 1): the gap equals the tolerance, which is allowed.
    tol = orthonormality_tol(F64, n=2)
    x = torch.tensor([[1.0 + tol / 2]], dtype=F64)
    assert float(torch.linalg.matrix_norm(x.mT @ x - torch.eye(1, dtype=F64))) == tol
    basis = consensus_basis([GaugeFixed(x, torch.ones(1, 2, dtype=F64))], rank=1)
    assert basis.U.shape == (1, 1)


def test_the_orthonormality_tolerance_counts_rows_and_columns() -> None:
    # d = 100, rho = 1: the tolerance is for n = d + rho = 101 terms. A column of squared
    # norm 1 + 2^-43 (gap 1.1e-13) is within it, though not within the tolerance for 2 terms.
    d = 100
    gap = 2.0**-43
    assert orthonormality_tol(F64, n=2) < gap <= orthonormality_tol(F64, n=d + 1)
    U = torch.zeros(d, 1, dtype=F64)
    U[0, 0] = 1.0 + 2.0**-44
    basis = consensus_basis([GaugeFixed(U, torch.ones(1, 3, dtype=F64))], rank=1)
    assert basis.U.shape == (d, 1)


def test_the_stacked_bases_of_clients_without_columns_are_d_by_zero() -> None:
    d = 5
    fixed = [GaugeFixed(torch.zeros(d, 0, dtype=F64), torch.zeros(0, 3, dtype=F64))] * 2
    M = stacked_bases(fixed, torch.tensor([0.5, 0.5], dtype=F64))
    assert M.shape == (d, 0)


@pytest.mark.parametrize("eigvals", [[3.0, 2.0, 1.0], [1.0], []])
def test_the_eigengap_at_rank_zero_is_zero_without_a_warning(eigvals: list[float]) -> None:
    # Documented: 0.0 for R = 0 (glora_aggregate's rank="auto" can choose no column).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gap = eigengap(torch.tensor(eigvals, dtype=F64), 0, n=4, stacklevel=2)
    assert gap == 0.0


def test_a_zero_spectrum_has_a_numerically_zero_gap() -> None:
    # Its gap 0 is at (not below) the rounding level zero_gap_tol(0, ...) = 0: it warns.
    lam = torch.zeros(3, dtype=F64)
    assert zero_gap_tol(0.0, 4, F64) == 0.0
    with pytest.warns(ZeroEigengapWarning):
        gap = eigengap(lam, 1, n=4, stacklevel=2)
    assert gap == 0.0


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add a stack frame"
)
def test_the_all_zero_clients_warning_points_at_the_caller() -> None:
    zero = GaugeFixed(torch.zeros(4, 0, dtype=F64), torch.zeros(0, 3, dtype=F64))
    with pytest.warns(RankClampedWarning, match="all client updates are zero") as rec:
        consensus_basis([zero, zero], rank=2)
    assert rec[0].filename == __file__


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add a stack frame"
)
def test_the_clamp_and_zero_gap_warnings_point_at_the_caller() -> None:
    e = torch.eye(4, dtype=F64)
    one = GaugeFixed(e[:, :1], torch.ones(1, 3, dtype=F64))
    with pytest.warns(RankClampedWarning) as rec:
        consensus_basis([one], rank=2)
    assert [w.filename for w in rec] == [__file__] * len(rec)
    two = [GaugeFixed(e[:, i : i + 1], torch.ones(1, 3, dtype=F64)) for i in range(2)]
    with pytest.warns(ZeroEigengapWarning) as rec:
        consensus_basis(two, rank=1)
    assert [w.filename for w in rec] == [__file__] * len(rec)
