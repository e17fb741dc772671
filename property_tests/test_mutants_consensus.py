"""Tests written for surviving mutants of ``consensus.py`` (docs/mutation.md)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from glora_math import (
    GaugeError,
    GaugeFixed,
    LoRAFactors,
    NonFiniteError,
    RankClampedWarning,
    ShapeMismatchError,
    ZeroEigengapWarning,
    consensus_basis,
)
from glora_math.consensus import eigengap, stacked_bases
from glora_math.tolerances import orthonormality_tol, zero_gap_tol

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


def test_a_half_precision_basis_is_checked_for_orthonormality_in_float32() -> None:
    # The column (1, 2^-8) has squared norm 1 + 2^-16: its gap 1.5e-5 is far above the float32
    # tolerance, though 1 + 2^-16 rounds to 1 in float16. The working dtype of a float16
    # basis is float32, and the check runs there.
    U = torch.tensor([[1.0], [2.0**-8]], dtype=torch.float16)
    assert 2.0**-16 > orthonormality_tol(torch.float32, n=3)
    f = GaugeFixed(U, torch.ones(1, 2, dtype=torch.float16))
    with pytest.raises(GaugeError, match="not orthonormal"):
        consensus_basis([f], rank=1)


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
