"""Gauge fixing (SPEC GLoRA step 1) and gauge transformations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import GaugeError, LoRAFactors, apply_gauge, gauge_fix, random_invertible
from glora_math.gauge import gauge_fix_all
from glora_math.linalg import projector_distance
from glora_math.tolerances import orthonormality_tol, product_tol, subspace_tol
from glora_math.validation import validate_clients

from .helpers import cond, f64, orth
from .strategies import SEEDS, conditioned_matrix, gaussian_clients, problems

MODES = st.sampled_from(["qr", "svd"])


def _one(pb):  # type: ignore[no-untyped-def]
    return pb.factors[0]


@given(problems(max_clients=1, zero_updates=True, deficient=True), MODES)
def test_gauge_fix_reconstructs_the_update_with_an_orthonormal_basis(pb, mode) -> None:  # type: ignore[no-untyped-def]
    f = _one(pb)
    gf = gauge_fix(f, mode)
    n = pb.d + pb.k + f.rank
    scale = float(f.B.norm() * f.A.norm())
    assert float((f64(gf.delta()) - f64(f.delta())).norm()) <= product_tol(
        pb.dtype, n=n, scale=scale, kappa=pb.cond
    )
    eye = torch.eye(gf.rank, dtype=torch.float64)
    assert float((f64(gf.U).mT @ f64(gf.U) - eye).norm()) <= orthonormality_tol(pb.dtype, n=n)


@given(problems(max_clients=1, zero_updates=True, deficient=True))
def test_qr_basis_spans_the_column_space_of_B(pb) -> None:  # type: ignore[no-untyped-def]
    f = _one(pb)
    gf = gauge_fix(f, "qr")
    ref = orth(f.B)
    assert gf.rank == ref.shape[1]
    tol = subspace_tol(pb.dtype, n=pb.d + f.rank, kappa=pb.cond, gap=1.0)
    assert projector_distance(f64(gf.U), ref) <= tol * (2 * gf.rank) ** 0.5


@given(problems(max_clients=1, zero_updates=True, deficient=True))
def test_svd_basis_spans_the_column_space_of_the_update(pb) -> None:  # type: ignore[no-untyped-def]
    f = _one(pb)
    gf = gauge_fix(f, "svd")
    ref = orth(f.delta())
    assert gf.rank == ref.shape[1]
    tol = subspace_tol(pb.dtype, n=pb.d + pb.k + f.rank, kappa=pb.cond**2, gap=1.0)
    assert projector_distance(f64(gf.U), ref) <= tol * (2 * gf.rank) ** 0.5


@given(problems(max_clients=1), SEEDS, st.floats(1.0, 100.0))
def test_qr_mode_is_canonical_under_positive_upper_triangular_gauges(pb, seed, c) -> None:  # type: ignore[no-untyped-def]
    # B T' = Q (T T') with T T' upper triangular and positive diagonal: the same Q, the same C.
    f = _one(pb)
    if f.rank > pb.d:
        return
    g = torch.Generator().manual_seed(seed)
    G = torch.triu(random_invertible(f.rank, cond=c, generator=g))
    G = G + torch.diag(G.diagonal().abs() + 1.0 - G.diagonal())  # make diag(G) >= 1 > 0
    a = gauge_fix(f, "qr")
    b = gauge_fix(apply_gauge(f, G), "qr")
    kappa = cond(f.B) * cond(G)
    n = pb.d + pb.k + f.rank
    assert float((a.U - b.U).norm()) <= subspace_tol(pb.dtype, n=n, kappa=kappa, gap=1.0) * f.rank
    scale = float(f.B.norm() * f.A.norm()) * cond(G)
    assert float((a.C - b.C).norm()) <= product_tol(pb.dtype, n=n, scale=scale, kappa=kappa)


@given(problems(max_clients=1))
def test_svd_mode_depends_on_the_update_only(pb) -> None:  # type: ignore[no-untyped-def]
    f = _one(pb)
    g = torch.Generator().manual_seed(pb.seed + 1)
    G = random_invertible(f.rank, cond=pb.cond, generator=g)
    pad = conditioned_matrix(pb.d, 1, cond=1.0, scale=1.0, generator=g, dtype=pb.dtype)
    padded = LoRAFactors(torch.cat([f.B, pad], 1), torch.cat([f.A, torch.zeros_like(f.A[:1])], 0))
    a = gauge_fix(f, "svd")
    s = torch.linalg.svdvals(f64(f.delta()))[: a.rank]
    # Singular vectors are determined up to sign when singular values are distinct; their
    # sensitivity is eps * kappa / (relative gap between neighbouring singular values).
    rel_gap = float(((s[:-1] - s[1:]) / s[0]).min()) if s.numel() > 1 else 1.0
    kappa = cond(f.B) * cond(f.A) * cond(G)
    n = pb.d + pb.k + f.rank + 1
    for other in (apply_gauge(f, G), padded):
        b = gauge_fix(other, "svd")
        assert b.rank == a.rank
        # Always: the same subspace and the same product.
        sub = subspace_tol(pb.dtype, n=n, kappa=kappa, gap=1.0)
        assert projector_distance(f64(a.U), f64(b.U)) <= sub * (2 * a.rank) ** 0.5
        scale = float(f.B.norm() * f.A.norm()) * cond(G)
        assert float((f64(a.delta()) - f64(b.delta())).norm()) <= product_tol(
            pb.dtype, n=n, scale=scale, kappa=kappa
        )
        # With distinct singular values: the same basis and coordinates (canonical signs).
        basis = subspace_tol(pb.dtype, n=n, kappa=kappa, gap=rel_gap)
        if basis < 1.0:  # the bound is informative: singular values are separated
            tol = basis * a.rank
            assert float((a.U - b.U).norm()) <= tol
            assert float((a.C - b.C).norm()) <= tol * float(s[0]) * a.rank


@given(problems(max_clients=1, zero_updates=True, deficient=True), MODES)
def test_qr_mode_with_padded_rank_keeps_an_extra_direction(pb, mode) -> None:  # type: ignore[no-untyped-def]
    # The documented difference between the modes: qr sees col(B), svd sees col(B A).
    f = _one(pb)
    g = torch.Generator().manual_seed(pb.seed + 1)  # not pb.seed: that stream built B
    if f.rank + 1 > pb.d:
        return
    pad = conditioned_matrix(pb.d, 1, cond=1.0, scale=1.0, generator=g, dtype=pb.dtype)
    padded = LoRAFactors(torch.cat([f.B, pad], 1), torch.cat([f.A, torch.zeros_like(f.A[:1])], 0))
    assert gauge_fix(padded, mode).rank == gauge_fix(f, mode).rank + (1 if mode == "qr" else 0)


@given(problems(max_clients=1))
def test_apply_gauge_preserves_the_product(pb) -> None:  # type: ignore[no-untyped-def]
    f = _one(pb)
    G = random_invertible(f.rank, cond=pb.cond, generator=torch.Generator().manual_seed(pb.seed))
    h = apply_gauge(f, G)
    scale = float(f.B.norm() * f.A.norm()) * cond(G)
    tol = product_tol(pb.dtype, n=pb.d + pb.k + f.rank, scale=scale, kappa=cond(G))
    assert float((f64(h.delta()) - f64(f.delta())).norm()) <= tol


def test_apply_gauge_rejects_bad_gauges() -> None:
    f = LoRAFactors(torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(GaugeError, match="2x2"):
        apply_gauge(f, torch.eye(3, dtype=torch.float64))
    with pytest.raises(GaugeError, match="singular"):
        apply_gauge(f, torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(GaugeError, match="condition number"):
        random_invertible(3, cond=0.5)


def test_zero_B_gives_an_empty_basis() -> None:
    f = LoRAFactors(torch.zeros(6, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    for mode in ("qr", "svd"):
        gf = gauge_fix(f, mode)  # type: ignore[arg-type]
        assert gf.U.shape == (6, 0)
        assert gf.C.shape == (0, 4)
        assert not bool(gf.delta().any())


@pytest.mark.parametrize("mode", ["qr", "svd"])
def test_gauge_fix_all_equals_the_per_client_gauge_fix(mode: str) -> None:
    # Clients of equal rank go through one batched QR; each must still get its own canonical
    # form of the requested mode (Gaussian factors: distinct singular values, so it is unique).
    from glora_math.gauge import gauge_fix_all
    from glora_math.validation import validate_clients

    g = torch.Generator().manual_seed(12)
    fs = gaussian_clients(3, 8, 3, 6, generator=g)
    together = gauge_fix_all(fs, validate_clients(fs), mode)  # type: ignore[arg-type]
    for f, got in zip(fs, together, strict=True):
        one = gauge_fix(f, mode)  # type: ignore[arg-type]
        # Rounding is amplified by cond(B), and in svd mode also by the relative singular gap.
        kappa = cond(f.B)
        if mode == "svd":
            # Gaps between the rank-many non-zero singular values, and from the last to 0.
            s = torch.linalg.svdvals(f.B @ f.A)[: f.rank]
            gaps = torch.cat([s[:-1] - s[1:], s[-1:]])
            kappa *= float(s[0] / gaps.min())
        tol = product_tol(torch.float64, n=8 + 6 + 3, scale=1.0, kappa=kappa)
        assert float((got.U - one.U).norm()) <= tol
        assert float((got.C - one.C).norm()) <= tol * float(f.B.norm() * f.A.norm())


# -------------------------------------------------------------------------------------------------
# Tests that pin behaviour found by the mutation run (docs/mutation.md): each was written for a
# mutant of ``gauge.py`` that survived the property suite.
# -------------------------------------------------------------------------------------------------


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
