"""Gauge fixing (SPEC GLoRA step 1) and gauge transformations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import GaugeError, LoRAFactors, apply_gauge, gauge_fix, random_invertible
from glora_math.linalg import projector_distance
from glora_math.tolerances import orthonormality_tol, product_tol, subspace_tol

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
