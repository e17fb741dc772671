"""Tests written for surviving mutants of ``linalg.py`` (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch

from glora_math.linalg import gram_lower
from glora_math.testing.helpers import f64
from glora_math.tolerances import product_tol


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
