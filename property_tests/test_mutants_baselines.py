"""Tests written for surviving mutants of ``baselines.py`` (docs/mutation.md)."""

from __future__ import annotations

import torch

from glora_math import LoRAFactors
from glora_math import baselines as bl
from glora_math.testing.helpers import best_rank_error, f64, n_dims
from glora_math.testing.strategies import gaussian_clients
from glora_math.tolerances import orthonormality_tol, product_tol, storage_tol


def _clients(dtype: torch.dtype = torch.float64) -> list[LoRAFactors]:
    g = torch.Generator().manual_seed(0)
    fs = gaussian_clients(3, 8, [1, 2, 3], 6, generator=g)
    return [LoRAFactors(f.B.to(dtype), f.A.to(dtype)) for f in fs]


def _mean(fs: list[LoRAFactors]) -> torch.Tensor:
    return sum((f64(f.B) @ f64(f.A) for f in fs), torch.zeros(8, 6, dtype=torch.float64)) / len(fs)


def test_flexlora_gives_each_client_its_own_rank_by_default() -> None:
    # client_ranks=None: client i gets the best rank-r_i approximation of the mean (Eckart-Young),
    # with every singular value in B and orthonormal rows in A (split="left", the published code).
    fs = _clients()
    W = _mean(fs)
    s0 = float(torch.linalg.svdvals(W)[0])
    n = n_dims(8, 6, [f.rank for f in fs])
    outs = bl.flexlora(fs)
    assert [o.rank for o in outs] == [f.rank for f in fs]
    for o, f in zip(outs, fs, strict=True):
        err = float(torch.linalg.matrix_norm(f64(o.B) @ f64(o.A) - W))
        assert abs(err - best_rank_error(W, f.rank)) <= product_tol(torch.float64, n=n, scale=s0)
        A = f64(o.A)
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        assert float(torch.linalg.matrix_norm(A @ A.mT - eye)) <= orthonormality_tol(
            torch.float64, n=n
        )


def test_flexlora_returns_the_clients_dtype() -> None:
    # Half-precision clients are computed in float32 and get factors in their own dtype back.
    for dtype in (torch.float16, torch.bfloat16):
        fs = _clients(dtype)
        outs = bl.flexlora(fs, client_ranks=[2, 2, 2])
        assert all(o.B.dtype == dtype and o.A.dtype == dtype for o in outs)
        W = _mean([LoRAFactors(f64(f.B), f64(f.A)) for f in fs])
        err = float(torch.linalg.matrix_norm(f64(outs[0].B) @ f64(outs[0].A) - W))
        scale = float(torch.linalg.matrix_norm(W))
        # Computed in float32 (product_tol), then rounded to the half dtype (storage_tol).
        tol = product_tol(dtype, n=n_dims(8, 6, [1, 2, 3]), scale=scale)
        assert abs(err - best_rank_error(W, 2)) <= tol + storage_tol(dtype, scale=scale)
