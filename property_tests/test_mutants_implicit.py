"""Tests written for surviving mutants of ``implicit.py`` (docs/mutation.md)."""

from __future__ import annotations

import torch

from glora_math.implicit import gram_basis_maps
from glora_math.linalg import numerical_rank
from glora_math.testing.helpers import f64
from glora_math.testing.strategies import conditioned_matrix
from glora_math.tolerances import eps

F32 = torch.float32


def test_gram_basis_maps_decide_the_rank_by_the_rule_for_a_d_by_r_matrix() -> None:
    # The rank rule is numerical_rank's on the d-by-r B: singular values at or below
    # max(d, r) eps s_1 count as zero. A direction at 1e-6 (float32, d = 64, r = 2) lies between
    # r eps = 2.4e-7 and d eps = 7.6e-6: it is dropped, and the rest is well conditioned.
    d, r = 64, 2
    assert r * eps(F32) < 1e-6 < d * eps(F32)
    g = torch.Generator().manual_seed(0)
    B = conditioned_matrix(d, r, cond=1e6, scale=1.0, generator=g, dtype=torch.float64).to(F32)
    expected = numerical_rank(torch.linalg.svdvals(f64(B)), (d, r), F32)
    assert expected == 1
    maps = gram_basis_maps([B], [1.0], F32)
    assert maps is not None
    assert maps[1] == [expected]
