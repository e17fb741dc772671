"""The linear-algebra kernels and the factor metrics against dense float64 references.

Each kernel is checked for what it promises: its defining identity, its canonical form (signs),
both branches of every shape test, and the accuracy claims (principal angles and projector
distances near 0 to working precision, where the naive formulas lose half the digits).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import glora_math.linalg as linalg_module
from glora_math import LoRAFactors
from glora_math.linalg import (
    SvdRoute,
    column_signs,
    condition_number,
    full_column_rank,
    full_rank_qr,
    gram_lower,
    gram_top_left_svd,
    lowrank_fro_norm,
    lowrank_svd,
    numerical_rank,
    principal_angles,
    projector_distance,
    randomized_left_svd,
    sign_fixed_qr,
    sign_fixed_svd,
    svd_costs,
    svd_route,
    tall_left_svd,
)
from glora_math.metrics import (
    best_rank_approx,
    difference,
    fro_distance,
    fro_norm,
    mean_update,
    relative_error,
    singular_values,
)
from glora_math.tolerances import (
    eigenvalue_error,
    eps,
    orthonormality_tol,
    product_tol,
    rank_tol,
    subspace_tol,
)

from .helpers import f64
from .strategies import SEEDS, conditioned_matrix

F64 = torch.float64
DIMS = st.integers(1, 9)
BASIS_DIMS = st.integers(1, 3)
ANGLES = st.lists(st.floats(1e-12, 1.5), min_size=3, max_size=3)  # near 0 to near pi/2


def _mat(m: int, n: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return conditioned_matrix(m, n, cond=cond, scale=1.0, generator=g, dtype=F64)


def _maxabs(x: torch.Tensor) -> float:
    """Largest magnitude of ``x`` (0 for an empty tensor)."""
    return float(x.abs().max()) if x.numel() else 0.0


def _tol(*dims: int, scale: float = 1.0, kappa: float = 1.0) -> float:
    return product_tol(F64, n=sum(dims), scale=scale, kappa=kappa)


@given(DIMS, DIMS, SEEDS)
def test_sign_fixed_qr_is_a_qr_with_nonnegative_diagonal(m: int, n: int, seed: int) -> None:
    X = _mat(m, n, seed)
    Q, T = sign_fixed_qr(X)
    p = min(m, n)
    assert Q.shape == (m, p)
    assert T.shape == (p, n)
    assert float((Q @ T - X).norm()) <= _tol(m, n, kappa=10.0)
    assert float((Q.mT @ Q - torch.eye(p, dtype=F64)).norm()) <= orthonormality_tol(F64, n=m + n)
    assert bool((torch.diagonal(T) >= 0).all())
    assert torch.equal(torch.triu(T), T)


@given(DIMS, DIMS, SEEDS)
def test_sign_fixed_qr_is_unique_for_full_column_rank(m: int, n: int, seed: int) -> None:
    n = min(m, n)
    X = _mat(m, n, seed)
    Q1, T1 = sign_fixed_qr(X)
    # Another QR of X: flip signs of the columns of Q and rows of T; the fix must undo it.
    s = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(F64)
    Q2, _ = sign_fixed_qr((Q1 * s) @ (T1 * s[:, None]))
    assert float((Q1 - Q2).norm()) <= _tol(m, n, kappa=10.0)


def test_column_signs_rules() -> None:
    U = torch.tensor([[0.1, -3.0, 0.0], [-0.5, 2.0, 0.0]], dtype=F64)
    assert column_signs(U).tolist() == [-1.0, -1.0, 1.0]  # zero column keeps +1
    assert column_signs(torch.zeros(3, 0, dtype=F64)).shape == (0,)
    assert column_signs(torch.zeros(0, 2, dtype=F64)).tolist() == [1.0, 1.0]
    # Batched: the rule slice by slice, and empty slices keep the batch shape.
    Us = torch.stack([U, -U, torch.flip(U, dims=(0,))])
    assert column_signs(Us).tolist() == [column_signs(x).tolist() for x in Us]
    assert column_signs(torch.zeros(4, 0, 2, dtype=F64)).shape == (4, 2)


@given(DIMS, DIMS, SEEDS)
def test_sign_fixed_svd_reconstructs_with_canonical_signs(m: int, n: int, seed: int) -> None:
    X = _mat(m, n, seed)
    U, s, Vh = sign_fixed_svd(X)
    assert float(((U * s) @ Vh - X).norm()) <= _tol(m, n)
    assert bool((s[:-1] >= s[1:]).all())
    idx = U.abs().argmax(dim=0)
    assert bool((U[idx, torch.arange(U.shape[1])] > 0).all())


@given(DIMS, DIMS, st.integers(0, 9), SEEDS)
def test_numerical_rank_counts_values_above_rank_tol(m: int, n: int, true: int, seed: int) -> None:
    true = min(true, m, n)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, true, generator=g, dtype=F64) @ torch.randn(true, n, generator=g, dtype=F64)
    s = torch.linalg.svdvals(X)
    assert numerical_rank(s, (m, n), F64) == true
    tol = rank_tol(float(s[0]), (m, n), F64) if true else 0.0
    assert numerical_rank(s, (m, n), F64) == int((s > tol).sum())


def test_numerical_rank_edge_cases() -> None:
    assert numerical_rank(torch.zeros(0, dtype=F64), (3, 0), F64) == 0
    assert numerical_rank(torch.zeros(3, dtype=F64), (3, 3), F64) == 0
    s = torch.tensor([1.0, 1e-3, 1e-30], dtype=F64)
    assert numerical_rank(s, (3, 3), F64) == 2


def _rotated_pair(
    d: int, p: int, q: int, angles: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bases with exactly known principal angles: U2[:, j] = cos(a_j) U1[:, j] + sin(a_j) W_j."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, p + q, generator=g, dtype=F64))
    U1, W = Q[:, :p], Q[:, p : p + q]
    m = min(p, q)
    U2 = W.clone()
    U2[:, :m] = U1[:, :m] * torch.cos(angles[:m]) + W[:, :m] * torch.sin(angles[:m])
    return U1, U2


@given(BASIS_DIMS, BASIS_DIMS, ANGLES, SEEDS)
def test_principal_angles_are_accurate_near_zero_and_near_pi_over_2(p, q, angles, seed) -> None:  # type: ignore[no-untyped-def]
    a = torch.tensor(angles, dtype=F64)
    U1, U2 = _rotated_pair(12, p, q, a, seed)
    got = principal_angles(U1, U2)
    want = torch.sort(a[: min(p, q)]).values
    assert got.shape == (min(p, q),)
    # Absolute accuracy of order n * eps for every angle: the input pair itself is rounded to
    # that (U2 = U1 cos a + W sin a carries an error of order eps in every entry), so no method
    # can do better; arccos alone would lose digits near zero (cos a = 1 for a < 1e-8).
    err = (got - want).abs()
    assert float(err.max()) <= _tol(12, p, q)
    # Symmetric in its arguments, and empty when a basis is empty.
    assert float((principal_angles(U2, U1) - got).abs().max()) <= _tol(12, p, q)
    assert principal_angles(U1, U1[:, :0]).shape == (0,)
    assert principal_angles(U1, U1[:, :0]).dtype == F64


@pytest.mark.parametrize("offset", [1e-9, 1e-6, 1e-3])
def test_principal_angles_near_pi_over_2_are_accurate_to_working_precision(offset: float) -> None:
    # Near pi/2 the sine is 1 - offset^2/2: arcsin would lose digits like eps / offset, so the
    # angle must come from the cosine (an absolute error of order eps).
    a = torch.tensor([1e-10, 0.7, math.pi / 2 - offset], dtype=F64)
    U1, U2 = _rotated_pair(12, 3, 3, a, 5)
    got = principal_angles(U1, U2)
    assert float((got - a).abs().max()) <= _tol(12, 3, 3)


@given(BASIS_DIMS, BASIS_DIMS, ANGLES, SEEDS)
def test_projector_distance_matches_the_angles_and_the_dense_norm(p, q, angles, seed) -> None:  # type: ignore[no-untyped-def]
    a = torch.tensor(angles, dtype=F64)
    U1, U2 = _rotated_pair(12, p, q, a, seed)
    dense = float((U1 @ U1.mT - U2 @ U2.mT).norm())
    got = projector_distance(U1, U2)
    assert abs(got - dense) <= _tol(12, p, q)
    # ||P1 - P2||_F^2 = 2 sum sin^2(angles) + |p - q| (the unmatched directions).
    m = min(p, q)
    exact = math.sqrt(2 * float(torch.sin(a[:m]).pow(2).sum()) + abs(p - q))
    assert abs(got - exact) <= _tol(12, p, q) * max(exact, 1e-3)


@given(DIMS, DIMS, st.integers(0, 10), st.sampled_from([None, "dense", "factors"]), SEEDS)
def test_lowrank_fro_norm_and_svd_match_the_dense_product(
    d: int, k: int, m: int, route: SvdRoute | None, seed: int
) -> None:
    # Every route returns p = min(d, k, m) triplets (the regression test of the dense route's
    # shape is test_lowrank_svd_keeps_min_d_k_m_triplets_on_every_route).
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, m, generator=g, dtype=F64)
    A = torch.randn(m, k, generator=g, dtype=F64)
    W = B @ A
    scale = float(B.norm() * A.norm())
    assert abs(lowrank_fro_norm(B, A) - float(W.norm())) <= _tol(d, k, m, scale=scale)
    U, s, Vh = lowrank_svd(B, A, route=route)
    p = min(d, k, m)
    assert U.shape == (d, p)
    assert s.shape == (p,)
    assert Vh.shape == (p, k)
    assert float(((U * s) @ Vh - W).norm()) <= _tol(d, k, m, scale=scale)
    assert _maxabs(s - torch.linalg.svdvals(W)[:p]) <= _tol(d, k, m, scale=scale)
    assert float((Vh @ Vh.mT - torch.eye(p, dtype=F64)).norm()) <= orthonormality_tol(
        F64, n=d + k + m
    )
    if p:
        idx = U.abs().argmax(dim=0)
        assert bool((U[idx, torch.arange(p)] >= 0).all())


@pytest.mark.parametrize(
    ("c", "d"),  # d = 1: the direct branch; d = 4: the QR branch
    [(1e10, 1), (1.4e19, 1), (1e-12, 1), (1e10, 4), (8e18, 4), (1e-12, 4)],
)
def test_lowrank_fro_norm_holds_float32_norms_at_both_ends_of_its_range(c: float, d: int) -> None:
    # Unscaled squares overflowed past entries of 1.8e19 and underflowed below 1e-19.
    r = 1
    B, A = c * torch.ones(d, r), c * torch.ones(r, d)
    exact = d * c * c  # ||c^2 ones(d, d)||_F
    assert abs(lowrank_fro_norm(B, A) - exact) <= product_tol(
        torch.float32, n=2 * d + r, scale=exact
    )


@pytest.mark.parametrize(
    ("d", "k", "m", "route"),
    [(3, 3, 1, "dense"), (5, 7, 2, "dense"), (9, 9, 8, None), (4, 6, 3, "factors")],
)
def test_lowrank_svd_keeps_min_d_k_m_triplets_on_every_route(
    d: int, k: int, m: int, route: SvdRoute | None
) -> None:
    # (9, 9, 8) is where the cost model picks the dense route by itself.
    g = torch.Generator().manual_seed(0)
    U, s, Vh = lowrank_svd(
        torch.randn(d, m, generator=g, dtype=F64),
        torch.randn(m, k, generator=g, dtype=F64),
        route=route,
    )
    p = min(d, k, m)
    assert (U.shape, s.shape, Vh.shape) == ((d, p), (p,), (p, k))


@given(DIMS, DIMS, SEEDS)
def test_tall_left_svd_both_branches(m: int, n: int, seed: int) -> None:
    X = _mat(m, n, seed)
    U, s = tall_left_svd(X)
    ref = torch.linalg.svdvals(X)
    assert float((s - ref).abs().max()) <= _tol(m, n)
    assert float(((U.mT @ X).norm(dim=1) - s).abs().max()) <= _tol(m, n)  # U are left vectors
    assert float((U.mT @ U - torch.eye(U.shape[1], dtype=F64)).norm()) <= orthonormality_tol(
        F64, n=m + n
    )


@pytest.mark.parametrize("shape", [(3, 9, 4), (3, 4, 9)])
def test_tall_left_svd_is_batched(shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    Xs = torch.randn(*shape, generator=g, dtype=F64)
    U, s = tall_left_svd(Xs)
    for i in range(shape[0]):
        Ui, si = tall_left_svd(Xs[i])
        assert float((s[i] - si).abs().max()) <= _tol(*shape[1:])
        # Same left singular vectors up to sign (distinct singular values here).
        assert float(((U[i] * Ui).sum(0).abs() - 1.0).abs().max()) <= _tol(*shape[1:])


def test_randomized_svd_falls_back_to_the_exact_one_when_wide_enough() -> None:
    X = _mat(20, 6, 1)
    U, s = tall_left_svd(X)
    for width in (6, 7, 50):
        U2, s2 = randomized_left_svd(X, width, power_iters=1, generator=torch.Generator())
        assert torch.equal(U, U2)
        assert torch.equal(s, s2)
    U3, s3 = randomized_left_svd(X, 5, power_iters=1, generator=torch.Generator().manual_seed(0))
    assert U3.shape == (20, 5)
    assert s3.shape == (5,)


def test_randomized_svd_is_exact_for_a_matrix_of_low_rank() -> None:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 3, generator=g, dtype=F64) @ torch.randn(3, 12, generator=g, dtype=F64)
    U, s = randomized_left_svd(X, 5, power_iters=0, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.svdvals(X)
    scale = float(ref[0])
    assert float((s[:3] - ref[:3]).abs().max()) <= _tol(30, 12, scale=scale)
    assert float((X - U[:, :3] @ (U[:, :3].mT @ X)).norm()) <= _tol(30, 12, scale=scale)


@given(st.lists(st.integers(0, 4), min_size=1, max_size=4), DIMS, DIMS, SEEDS)
def test_metrics_from_factors_match_dense(ranks: list[int], d: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    fs = [
        LoRAFactors(
            torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
        )
        for r in ranks
    ]
    w = torch.rand(len(fs), generator=g, dtype=F64) + 0.1
    p = w / w.sum()
    dense = sum((float(p[i]) * (f.B @ f.A) for i, f in enumerate(fs)), torch.zeros(d, k, dtype=F64))
    mean = mean_update(fs, w)
    scale = sum(float(f.B.norm() * f.A.norm()) for f in fs) + 1.0
    tol = _tol(d, k, sum(ranks), scale=scale)
    assert float((mean.delta() - dense).norm()) <= tol
    assert abs(fro_norm(mean) - float(dense.norm())) <= tol
    other = fs[0]
    assert float((difference(mean, other).delta() - (dense - other.delta())).norm()) <= tol
    assert abs(fro_distance(mean, other) - float((dense - other.delta()).norm())) <= tol
    sv = singular_values(mean)
    ref = torch.linalg.svdvals(dense)
    assert _maxabs(sv - ref[: sv.numel()]) <= tol
    for r in (1, 2):
        best = best_rank_approx(mean, r)
        assert best.rank == min(r, sv.numel())  # min(d, k, sum r_i) directions exist
        assert abs(fro_distance(best, mean) - float(ref[r:].pow(2).sum().sqrt())) <= tol
    if float(dense.norm()) > tol:
        assert abs(relative_error(mean, fs, w)) <= tol / float(dense.norm())
        zero = LoRAFactors(torch.zeros(d, 1, dtype=F64), torch.zeros(1, k, dtype=F64))
        assert relative_error(zero, fs, w) == pytest.approx(1.0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_metrics_work_in_the_working_dtype(half: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    fs = [
        LoRAFactors(
            torch.randn(5, 2, generator=g).to(half), torch.randn(2, 4, generator=g).to(half)
        )
        for _ in range(3)
    ]
    mean = mean_update(fs, [1.0, 2.0, 3.0])
    assert mean.B.dtype == mean.A.dtype == torch.float32
    other = LoRAFactors(fs[0].B.to(F64), fs[0].A.to(F64))
    diff = difference(fs[0], other)
    assert diff.B.dtype == diff.A.dtype == F64
    assert diff.rank == 4


def test_relative_error_of_a_zero_mean() -> None:
    z = LoRAFactors(torch.zeros(4, 1, dtype=F64), torch.zeros(1, 3, dtype=F64))
    nz = LoRAFactors(torch.ones(4, 1, dtype=F64), torch.ones(1, 3, dtype=F64))
    assert relative_error(z, [z]) == 0.0
    assert relative_error(nz, [z]) == math.inf


@given(DIMS, DIMS, st.integers(1, 6), st.floats(1.0, 1e12), SEEDS)
def test_gram_top_left_svd_agrees_with_the_qr_route_where_it_claims_to(
    d: int, m: int, R: int, cond: float, seed: int
) -> None:
    # Tall (the m-by-m Gram and a Rayleigh-Ritz step) and wide (the d-by-d Gram) branches.
    p = min(d, m)
    R = min(R, p)
    X = _mat(d, m, seed, cond=cond)
    U, lam, ok = gram_top_left_svd(X, R)
    ref_U, ref_s = tall_left_svd(X)
    ref = ref_s.pow(2)
    assert U.shape == (d, R)
    assert lam.shape == (p,)
    assert bool((lam[:-1] >= lam[1:]).all())
    assert bool((lam >= 0).all())
    noise = eigenvalue_error(float(lam[0]), d + m, F64)
    # Eigenvalues of the Gram matrix: absolute error at the eigensolver's level.
    assert _maxabs(lam - ref) <= noise
    # ok exactly where lambda_R clears that level (a clamp decision is never made from noise).
    assert bool(ok) == bool(lam[R - 1] > noise)
    if ok:
        assert float((U.mT @ U - torch.eye(R, dtype=F64)).norm()) <= orthonormality_tol(
            F64, n=d + m
        )
        gap = float(ref[R - 1] - (ref[R] if R < p else 0.0))
        tol = subspace_tol(F64, n=d + m, kappa=1.0, gap=gap)
        assert projector_distance(U, ref_U[:, :R]) <= tol * (2 * R) ** 0.5


@pytest.mark.parametrize("shape", [(30, 7), (40, 255), (40, 256), (20, 700), (3, 25, 300)])
def test_gram_lower_is_the_lower_triangle_of_the_gram_matrix(shape: tuple[int, ...]) -> None:
    # Below 256 columns one product; from 256 on, column blocks (2 to 8 of them, the last
    # shorter when the block size does not divide m).
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=F64)
    G = gram_lower(X)
    full = X.mT @ X
    m = shape[-1]
    assert G.shape == (*shape[:-2], m, m)
    scale = float(X.pow(2).sum(-2).max())  # the largest diagonal entry bounds every entry
    tol = product_tol(F64, n=shape[-2], scale=scale)
    assert float((torch.tril(G) - torch.tril(full)).abs().max()) <= tol
    # Above the diagonal: the Gram's entries (diagonal blocks) or zeros (skipped blocks).
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool), diagonal=1)
    close = (G - full).abs() <= tol
    assert bool((close | (G == 0))[..., upper].all())
    if m >= 256:  # blocks were skipped: some of the upper triangle is zero
        assert bool((G[..., upper] == 0).any())
    # And what the eigensolver reads gives the spectrum of the Gram matrix.
    assert float((torch.linalg.eigvalsh(G) - torch.linalg.eigvalsh(full)).abs().max()) <= (
        eigenvalue_error(scale, m + shape[-2], F64)
    )


def test_gram_top_left_svd_declines_ranks_above_min_d_m() -> None:
    Y = _mat(8, 3, 0)
    U, lam, ok = gram_top_left_svd(Y, 4)
    assert not bool(ok)
    assert U.shape == (8, 3)
    assert lam.shape == (3,)
    assert bool(gram_top_left_svd(Y, 3)[2])


def test_gram_top_left_svd_is_batched() -> None:
    for d, m in ((9, 4), (4, 9)):
        conds = ((0, 10.0), (1, 1e10), (2, 3.0))
        Xs = torch.stack([_mat(d, m, s, cond=c) for s, c in conds])
        U, lam, ok = gram_top_left_svd(Xs, 4)
        assert U.shape == (3, d, 4)
        assert lam.shape == (3, 4)
        assert ok.tolist() == [True, False, True]  # cond 1e10: lambda_4 = 1e-20 is noise
        for i in range(3):
            Ui, lami, oki = gram_top_left_svd(Xs[i], 4)
            assert bool(oki) == bool(ok[i])
            assert _maxabs(lami - lam[i]) <= eigenvalue_error(1.0, 13, F64)
            if oki:
                assert projector_distance(Ui, U[i]) <= orthonormality_tol(F64, n=13)


@given(st.integers(1, 4), DIMS, DIMS, st.floats(1.0, 1e18), SEEDS)
def test_full_column_rank_is_the_batched_numerical_rank_rule(
    L: int, m: int, n: int, cond: float, seed: int
) -> None:
    X = torch.stack([_mat(m, n, seed + i, cond=cond) for i in range(L)])
    X[0] = 0.0  # an all-zero matrix is rank-deficient
    s = torch.linalg.svdvals(X)
    got = full_column_rank(s, (m, n), F64).tolist()
    want = [numerical_rank(s[i], (m, n), F64) == min(m, n) for i in range(L)]
    assert got == want
    assert got[0] is False
    # full_rank_qr: the same QR as sign_fixed_qr, with this rule on T (never for wide X).
    Q, T, full = full_rank_qr(X)
    Q0, T0 = sign_fixed_qr(X)
    assert torch.equal(Q, Q0)
    assert torch.equal(T, T0)
    assert full.tolist() == (want if n <= m else [False] * L)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rank_rules_switch_at_rank_tol_relative_to_the_largest_value(scale: float) -> None:
    shape = (5, 2)
    tol = rank_tol(scale, shape, F64)
    # rank_tol is the largest value treated as zero: an exact tie is rank-deficient.
    for factor, full in ((1.5, True), (1.0, False), (0.75, False)):
        s = torch.tensor([scale, factor * tol], dtype=F64)
        assert numerical_rank(s, shape, F64) == (2 if full else 1)
        assert bool(full_column_rank(s, shape, F64)) is full


def test_sign_fixing_leaves_columns_with_a_zero_diagonal_alone() -> None:
    # X with a zero first column: R[0, 0] = 0, so the first column of Q keeps LAPACK's sign,
    # and columns with a non-zero diagonal get diag(T) > 0.
    g = torch.Generator().manual_seed(9)
    X = torch.randn(6, 3, generator=g, dtype=F64)
    X[:, 0] = 0.0
    Q0, T0 = torch.linalg.qr(X, mode="reduced")
    Q, T = sign_fixed_qr(X)
    assert float(T0[0, 0]) == 0.0
    assert torch.equal(Q[:, 0], Q0[:, 0])
    assert torch.equal(T[0], T0[0])
    assert bool((torch.diagonal(T)[1:] > 0).all())


@given(st.integers(2, 40), st.integers(2, 40), st.integers(1, 45), st.integers(0, 2**16))
def test_both_svd_routes_agree_and_the_cost_model_picks_one(d, k, m, seed) -> None:  # type: ignore[no-untyped-def]
    from glora_math.linalg import lowrank_svd, svd_costs, svd_route

    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, m, generator=g, dtype=torch.float64)
    A = torch.randn(m, k, generator=g, dtype=torch.float64)
    cost = svd_costs(d, k, m)
    assert svd_route(d, k, m) == ("factors" if cost["factors"] <= cost["dense"] else "dense")
    if m >= d:
        assert svd_route(d, k, m) == "dense"  # the factor route needs a tall B
    Uf, sf, Vf = lowrank_svd(B, A, route="factors")
    Ud, sd, Vd = lowrank_svd(B, A, route="dense")
    X = B @ A
    scale = float(torch.linalg.matrix_norm(X, ord=2))
    tol = product_tol(torch.float64, n=d + k + m, scale=scale + 1.0)
    assert float(((Uf * sf) @ Vf - X).norm()) <= tol
    assert float(((Ud * sd) @ Vd - X).norm()) <= tol
    p = min(sf.numel(), sd.numel())
    assert float((sf[:p] - sd[:p]).abs().max()) <= tol


# -------------------------------------------------------------------------------------------------
# Tests that pin behaviour found by the mutation run (docs/mutation.md): each was written for a
# mutant of ``linalg.py`` that survived the property suite.
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 255, 256, 300, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_lower_is_the_lower_triangle_for_every_block_size_and_dtype(
    m: int, dtype: torch.dtype
) -> None:
    # One block below 256 columns, blocks of at least 128 above (at most 8 of them; 1100
    # columns make blocks of 138): every block size gives X^T X on and below the diagonal.
    g = torch.Generator().manual_seed(m)
    X = torch.randn(2, 3, m, generator=g, dtype=torch.float64).to(dtype)  # a batch of two
    G = gram_lower(X)
    assert G.shape == (2, m, m)
    assert G.dtype == dtype
    ref = f64(X).mT @ f64(X)
    err = float(torch.linalg.matrix_norm(torch.tril(f64(G) - ref)).max())
    scale = float(torch.linalg.matrix_norm(f64(X)).pow(2).max())
    assert err <= product_tol(dtype, n=3, scale=scale)
    # Above the diagonal: X^T X or zero, entry by entry.
    upper = torch.triu(f64(G), diagonal=1)
    off = torch.triu(ref, diagonal=1)
    tol = product_tol(dtype, n=3, scale=scale)
    assert bool(((upper == 0) | ((upper - off).abs() <= tol)).all())


# ---------------------------------------------------------------------------------------------
# column_signs, condition_number, full_rank_qr


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (2, 0, 3)])
def test_column_signs_of_an_empty_matrix_are_ones_in_its_dtype(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    # The signs have U's dtype whatever its shape, as they do for a non-empty U.
    U = torch.zeros(shape, dtype=dtype)
    sg = column_signs(U)
    assert sg.shape == (*shape[:-2], shape[-1])
    assert sg.dtype == dtype
    assert bool((sg == 1).all())
    assert column_signs(torch.ones(3, 2, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_condition_number_is_computed_in_float64_for_every_input_dtype(
    dtype: torch.dtype,
) -> None:
    # A rank-2 matrix (third column the sum of the first two, exact in every dtype here):
    # in float64 its third singular value lies below rank_tol and is not counted.
    X = torch.tensor([[1.0, 0.5, 1.5], [0.25, 2.0, 2.25], [3.0, -1.0, 2.0], [1.0, 1.0, 2.0]])
    x = X.to(dtype)
    assert torch.equal(x[:, 2], x[:, 0] + x[:, 1])
    got = condition_number(x)
    assert got == condition_number(x.to(torch.float64))
    s = torch.linalg.svdvals(X.to(torch.float64))  # x holds X's entries exactly
    assert float(s[2]) <= rank_tol(float(s[0]), (4, 3), F64) < float(s[1])
    assert got == float(s[0] / s[1])


@pytest.mark.parametrize("shape", [(3, 4), (0, 3), (3, 0)])
def test_condition_number_of_a_zero_or_empty_matrix_is_one(shape: tuple[int, int]) -> None:
    assert condition_number(torch.zeros(shape, dtype=torch.float64)) == 1.0


def test_condition_number_does_not_count_a_singular_value_at_rank_tol() -> None:
    # rank_tol is the largest value treated as zero: diag(1, rank_tol) has condition number 1.
    t = rank_tol(1.0, (2, 2), torch.float64)
    X = torch.diag(torch.tensor([1.0, t], dtype=torch.float64))
    assert torch.equal(torch.linalg.svdvals(X), torch.tensor([1.0, t], dtype=torch.float64))
    assert condition_number(X) == 1.0
    # Twice rank_tol is counted: the condition number is 1 / (2 rank_tol), exactly 2^50.
    X2 = torch.diag(torch.tensor([1.0, 2 * t], dtype=torch.float64))
    assert condition_number(X2) == 1 / (2 * t)


def test_condition_number_of_a_wide_matrix_uses_its_larger_dimension() -> None:
    # The rank rule of a 2-by-4 matrix is rank_tol with max(2, 4) = 4: a second singular value
    # of 3 eps (between 2 eps and 4 eps) is not counted, for X and for its transpose alike.
    e = eps(torch.float64)
    X = torch.zeros(2, 4, dtype=torch.float64)
    X[0, 0], X[1, 1] = 1.0, 3 * e
    s = torch.linalg.svdvals(X)
    assert rank_tol(1.0, (2, 2), torch.float64) < float(s[1]) < rank_tol(1.0, (2, 4), F64)
    assert condition_number(X) == 1.0
    assert condition_number(X.mT) == 1.0


@pytest.mark.parametrize("shape", [(5, 3), (1, 5, 3)])
def test_full_rank_qr_takes_a_single_tall_matrix_or_a_stack_of_one(
    shape: tuple[int, ...],
) -> None:
    X = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    Q, T, full = full_rank_qr(X)
    Q0, T0 = sign_fixed_qr(X)
    assert torch.equal(Q, Q0)
    assert torch.equal(T, T0)
    assert full.shape == shape[:-2]
    assert full.dtype == torch.bool
    assert bool(full.all())  # a Gaussian matrix has full column rank


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5)])
def test_full_rank_qr_says_a_wide_matrix_is_rank_deficient_as_a_bool(
    shape: tuple[int, ...],
) -> None:
    X = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    _, _, full = full_rank_qr(X)
    assert full.dtype == torch.bool
    assert full.shape == shape[:-2]
    assert not bool(full.any())


# ---------------------------------------------------------------------------------------------
# The cost model and the routes of lowrank_svd


@pytest.mark.parametrize(("d", "k", "m"), [(7, 5, 3), (5, 7, 3), (12, 30, 4), (3, 5, 3), (3, 5, 4)])
def test_svd_costs_are_the_documented_operation_counts(d: int, k: int, m: int) -> None:
    # dense: 2 d k m + 4 max(d, k) min(d, k)^2 + 8 min(d, k)^3; factors: 4 (d + k) m^2 + 12 m^3,
    # and infinite unless m < d (the factor route needs a tall B).
    lo, hi = min(d, k), max(d, k)
    cost = svd_costs(d, k, m)
    assert cost["dense"] == 2 * d * k * m + 4 * hi * lo * lo + 8 * lo**3
    if m < d:
        assert cost["factors"] == 4 * (d + k) * m * m + 12 * m**3
    else:
        assert cost["factors"] == math.inf


@pytest.mark.parametrize(("d", "k", "m"), [(4, 1, 1), (8, 2, 2), (15, 33, 14)])
def test_svd_route_gives_a_tie_to_the_factors(d: int, k: int, m: int) -> None:
    cost = svd_costs(d, k, m)
    assert cost["factors"] == cost["dense"]
    assert svd_route(d, k, m) == "factors"


@pytest.mark.parametrize(
    ("dims", "route", "dense"),
    [
        ((9, 9, 8), None, True),  # the cost model picks the dense route
        ((12, 12, 3), None, False),  # the cost model picks the factors
        ((9, 9, 8), "dense", True),
        ((12, 12, 3), "dense", True),
        ((12, 12, 3), "factors", False),
        ((9, 9, 8), "factors", False),
        ((5, 7, 5), "factors", True),  # m >= d: the dense route is the only one
        ((5, 7, 6), "factors", True),
    ],
)
def test_lowrank_svd_takes_the_route_asked_for_and_the_cost_models_by_default(
    monkeypatch: pytest.MonkeyPatch,
    dims: tuple[int, int, int],
    route: str | None,
    dense: bool,
) -> None:
    # The dense route is the sign-fixed SVD of the d-by-k product; the factor route never
    # forms it.
    d, k, m = dims
    if route is None:
        assert (svd_route(d, k, m) == "dense") == dense
    calls: list[tuple[int, ...]] = []
    real = linalg_module.sign_fixed_svd

    def spy(X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.append(tuple(X.shape))
        return real(X)

    monkeypatch.setattr(linalg_module, "sign_fixed_svd", spy)
    g = torch.Generator().manual_seed(d + k + m)
    B = torch.randn(d, m, generator=g, dtype=F64)
    A = torch.randn(m, k, generator=g, dtype=F64)
    U, s, Vh = lowrank_svd(B, A, route=route)  # type: ignore[arg-type]
    assert calls == ([(d, k)] if dense else [])
    scale = float(torch.linalg.matrix_norm(B @ A, ord=2))
    tol = product_tol(F64, n=d + k + m, scale=scale)
    assert float(torch.linalg.matrix_norm((U * s) @ Vh - B @ A)) <= tol


# ---------------------------------------------------------------------------------------------
# gram_top_left_svd and randomized_left_svd


@pytest.mark.parametrize("shape", [(6, 3), (3, 6), (2, 6, 3)])
def test_gram_top_left_svd_of_a_zero_matrix_is_not_ok(shape: tuple[int, ...]) -> None:
    # A zero matrix has numerical rank 0, at or below every R: lambda_R = 0 does not lie above
    # the Gram's rounding level (0 too), so ok is false and callers take the QR route.
    _, lam, ok = gram_top_left_svd(torch.zeros(shape, dtype=F64), 2)
    assert bool((lam == 0).all())
    assert ok.dtype == torch.bool
    assert ok.shape == shape[:-2]
    assert not bool(ok.any())


@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (2, 8, 3)])
def test_gram_top_left_svd_declines_ranks_above_min_d_m_with_a_bool_per_matrix(
    shape: tuple[int, ...],
) -> None:
    X = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    _, _, ok = gram_top_left_svd(X, 4)
    assert isinstance(ok, torch.Tensor)
    assert ok.dtype == torch.bool
    assert ok.shape == shape[:-2]
    assert not bool(ok.any())


@pytest.mark.parametrize("width", [3, 4, 9])
def test_randomized_left_svd_of_a_stack_falls_back_once_the_width_reaches_min_d_m(
    width: int,
) -> None:
    # A stack of tall 10-by-3 matrices: a width of 3 or more is at least min(d, m) = 3.
    M = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    U, s = randomized_left_svd(M, width, power_iters=1, generator=torch.Generator())
    U0, s0 = tall_left_svd(M)
    assert torch.equal(U, U0)
    assert torch.equal(s, s0)
