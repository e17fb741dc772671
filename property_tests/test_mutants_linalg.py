"""Tests written for surviving mutants of ``linalg.py`` (docs/mutation.md)."""

from __future__ import annotations

import math

import pytest
import torch

import glora_math.linalg as linalg_module
from glora_math.linalg import (
    column_signs,
    condition_number,
    full_rank_qr,
    gram_lower,
    gram_top_left_svd,
    lowrank_svd,
    randomized_left_svd,
    sign_fixed_qr,
    svd_costs,
    svd_route,
    tall_left_svd,
)
from glora_math.testing.helpers import f64
from glora_math.tolerances import eps, product_tol, rank_tol

F64 = torch.float64


@pytest.mark.parametrize("m", [1, 255, 256, 300, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_lower_is_the_lower_triangle_of_the_gram_matrix(m: int, dtype: torch.dtype) -> None:
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
