"""Tests written for surviving mutants of ``gauge.py`` (docs/mutation.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from glora_math import GaugeError, LoRAFactors, apply_gauge, gauge_fix, random_invertible
from glora_math.gauge import gauge_fix_all
from glora_math.tolerances import product_tol
from glora_math.validation import validate_clients

F64 = torch.float64


def test_qr_gauge_of_a_wide_B_is_the_sign_fixed_qr_of_B() -> None:
    # B of rank d with more columns than rows (r = 5 > d = 3): "qr" mode is the thin QR
    # B = Q T with diag(T) > 0, U = Q, C = T A. So U^T B = T is upper trapezoidal with a
    # positive diagonal, and U C = B A.
    d, r, k = 3, 5, 4
    g = torch.Generator().manual_seed(1)
    B = torch.randn(d, r, generator=g, dtype=F64)
    A = torch.randn(r, k, generator=g, dtype=F64)
    fixed = gauge_fix(LoRAFactors(B, A), "qr")
    assert fixed.U.shape == (d, d)
    T = fixed.U.mT @ B
    tol = product_tol(F64, n=d + r, scale=float(torch.linalg.matrix_norm(B)))
    assert float(torch.tril(T, diagonal=-1).abs().max()) <= tol
    assert bool((torch.diagonal(T) > 0).all())
    scale = float(torch.linalg.matrix_norm(B) * torch.linalg.matrix_norm(A))
    assert float(torch.linalg.matrix_norm(fixed.delta() - B @ A)) <= product_tol(
        F64, n=d + r + k, scale=scale
    )


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [((torch.float16, torch.float16), torch.float32), ((torch.float32, F64), F64)],
)
def test_batched_qr_gauge_fixing_works_in_the_working_dtype(dtypes, expected) -> None:  # type: ignore[no-untyped-def]
    # Two clients of one rank share the batched QR; its results are in info.work_dtype (float32
    # for half-precision clients, the promoted dtype for mixed clients), and U C = B A.
    g = torch.Generator().manual_seed(2)
    d, r, k = 6, 2, 5
    fs = [
        LoRAFactors(
            torch.randn(d, r, generator=g, dtype=F64).to(dt),
            torch.randn(r, k, generator=g, dtype=F64).to(dt),
        )
        for dt in dtypes
    ]
    info = validate_clients(fs)
    out = gauge_fix_all(fs, info, "qr")
    for f, fixed in zip(fs, out, strict=True):
        assert fixed.U.dtype == expected
        assert fixed.C.dtype == expected
        ref = f.B.to(F64) @ f.A.to(F64)
        scale = float(torch.linalg.matrix_norm(f.B.to(F64)) * torch.linalg.matrix_norm(f.A.to(F64)))
        err = float(torch.linalg.matrix_norm(fixed.delta().to(F64) - ref))
        assert err <= product_tol(expected, n=d + r + k, scale=scale)


def test_a_singular_gauge_is_refused_even_for_factors_with_no_columns() -> None:
    # G = 0 is singular whatever A is; with k = 0 the solve has nothing to be non-finite in.
    f = LoRAFactors(torch.ones(3, 2, dtype=F64), torch.zeros(2, 0, dtype=F64))
    with pytest.raises(GaugeError, match="gauge matrix is singular"):
        apply_gauge(f, torch.zeros(2, 2, dtype=F64))


def test_a_gauge_whose_inverse_overflows_the_working_dtype_is_refused() -> None:
    # G = diag(1e-30, 1) is invertible in exact arithmetic, but G^{-1} A has entries 1e40,
    # beyond float32: no Inf leaves apply_gauge, the gauge is refused as (numerically) singular.
    f = LoRAFactors(torch.ones(3, 2), torch.full((2, 3), 1e10))
    G = torch.diag(torch.tensor([1e-30, 1.0]))
    with pytest.raises(GaugeError, match="gauge matrix is singular"):
        apply_gauge(f, G)


@pytest.fixture
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("r", [1, 3])
def test_random_invertible_has_the_requested_dtype_whatever_the_default_dtype(r: int) -> None:
    G = random_invertible(r, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    assert G.dtype == torch.float32
    assert G.shape == (r, r)
