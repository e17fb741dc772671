"""The consensus basis against a dense eigendecomposition of K = sum_i p_i U_i U_i^T."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import RankClampedWarning, consensus_basis, gauge_fix
from glora_math.linalg import projector_distance
from glora_math.tolerances import product_tol, subspace_tol

from .helpers import dense_K, f64, n_dims, top_eigenspace, unique_or_reject
from .strategies import problems


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
    basis = unique_or_reject(lambda: consensus_basis(fixed, pb.weights, R))
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
        basis = consensus_basis(fixed, pb.weights, union + 1)
    assert basis.rank == union
