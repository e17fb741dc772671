"""Tests of the strategies themselves: they must produce what they claim."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import random_invertible, random_orthogonal, random_special_orthogonal
from glora_math.tolerances import product_tol

from .helpers import cond
from .strategies import SEEDS, conditioned_matrix, gaussian_clients, problems


@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    c=st.floats(1.0, 1e4),
    scale=st.floats(0.1, 10.0),
    seed=SEEDS,
)
def test_conditioned_matrix_has_the_drawn_condition_and_norm(
    m: int, n: int, c: float, scale: float, seed: int
) -> None:
    X = conditioned_matrix(
        m,
        n,
        cond=c,
        scale=scale,
        generator=torch.Generator().manual_seed(seed),
        dtype=torch.float64,
    )
    s = torch.linalg.svdvals(X)
    tol = product_tol(torch.float64, n=m + n, scale=1.0, kappa=c)
    assert X.shape == (m, n)
    assert math.isclose(float(s[0]), scale, rel_tol=tol)
    if min(m, n) > 1:
        assert math.isclose(float(s[0] / s[-1]), c, rel_tol=tol)


@given(r=st.integers(1, 10), c=st.floats(1.0, 1e4), seed=SEEDS)
def test_random_invertible_has_exact_condition_number(r: int, c: float, seed: int) -> None:
    G = random_invertible(r, cond=c, generator=torch.Generator().manual_seed(seed))
    tol = product_tol(torch.float64, n=2 * r, scale=1.0, kappa=c)
    expected = c if r > 1 else 1.0
    assert math.isclose(cond(G), expected, rel_tol=tol)


@given(r=st.integers(1, 10), seed=SEEDS)
def test_random_orthogonal_and_special_orthogonal(r: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    Q = random_orthogonal(r, generator=g)
    S = random_special_orthogonal(r, generator=g)
    tol = product_tol(torch.float64, n=2 * r, scale=1.0)
    eye = torch.eye(r, dtype=torch.float64)
    assert float((Q.mT @ Q - eye).norm()) <= tol
    assert float((S.mT @ S - eye).norm()) <= tol
    assert math.isclose(float(torch.linalg.det(S)), 1.0, rel_tol=tol)


def test_special_orthogonal_flips_a_negative_determinant() -> None:
    # Over 40 seeds, O(r) draws have det -1 about half the time; SO(r) never does.
    dets_o = [
        float(torch.linalg.det(random_orthogonal(3, generator=torch.Generator().manual_seed(s))))
        for s in range(40)
    ]
    dets_so = [
        float(
            torch.linalg.det(
                random_special_orthogonal(3, generator=torch.Generator().manual_seed(s))
            )
        )
        for s in range(40)
    ]
    assert min(dets_o) < 0 < max(dets_o)
    assert min(dets_so) > 0


@given(problems(weights="with_zeros", zero_updates=True, deficient=True))
def test_problems_respect_their_contract(pb) -> None:  # type: ignore[no-untyped-def]
    assert pb.n == len(pb.factors) >= 1
    assert pb.weights is not None
    assert float(pb.weights.sum()) > 0
    assert bool((pb.weights >= 0).all())
    for i, f in enumerate(pb.factors):
        assert f.shape == (pb.d, pb.k)
        assert 1 <= f.rank <= min(pb.d, pb.k)
        if i in pb.zero_clients:
            assert not bool(f.B.any())
        elif i in pb.deficient_clients and f.rank >= 2:
            assert int(torch.linalg.matrix_rank(f.B)) == f.rank - 1
        else:
            tol = product_tol(torch.float64, n=pb.d + f.rank, scale=1.0, kappa=pb.cond)
            assert f.rank == 1 or math.isclose(cond(f.B), pb.cond, rel_tol=tol)


@given(problems(equal_ranks=True, weights="equal"))
def test_equal_rank_problems(pb) -> None:  # type: ignore[no-untyped-def]
    assert len(set(pb.ranks)) == 1
    assert pb.weights is None


def test_gaussian_clients_takes_one_rank_or_one_per_client() -> None:
    same = gaussian_clients(3, 5, 2, 4, generator=torch.Generator().manual_seed(0))
    assert [(f.B.shape, f.A.shape) for f in same] == [((5, 2), (2, 4))] * 3
    mixed = gaussian_clients(3, 5, [1, 0, 3], 4, generator=torch.Generator().manual_seed(0))
    assert [f.rank for f in mixed] == [1, 0, 3]
    assert all(f.B.dtype == f.A.dtype == torch.float64 for f in mixed)
