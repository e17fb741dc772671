"""Tests of ``glora_math.readout``.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``readout.py`` that survived the property suite.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from glora_math import LoRAFactors, NonFiniteError, RankClampedWarning, glora_aggregate, readout
from glora_math.tolerances import product_tol


def _clients(batch: tuple[int, ...] = (), d: int = 6, k: int = 5) -> list[LoRAFactors]:
    g = torch.Generator().manual_seed(2)
    return [
        LoRAFactors(
            torch.randn(*batch, d, 2, generator=g, dtype=torch.float64),
            torch.randn(*batch, 2, k, generator=g, dtype=torch.float64),
        )
        for _ in range(2)
    ]


def test_a_balanced_readout_of_a_right_side_state_shares_the_singular_values_equally() -> None:
    # Documented: "balanced" puts sqrt(s_j) on each side, whichever side the state is on: the
    # j-th column of B and the j-th row of A both have norm sqrt(s_j).
    state = glora_aggregate(_clients(), rank=3, side="right")
    out = readout(state, 3, "balanced")
    s = torch.linalg.svdvals(state.S)
    tol = product_tol(torch.float64, n=6 + 5 + 3, scale=float(s.max()))
    assert torch.allclose(out.B.norm(dim=0), s.sqrt(), rtol=0.0, atol=tol)
    assert torch.allclose(out.A.norm(dim=1), s.sqrt(), rtol=0.0, atol=tol)


def test_a_stacked_readout_is_the_readout_of_each_module() -> None:
    state = glora_aggregate(_clients((2,)), rank=3)
    for split in ("balanced", "left", "right"):
        out = readout(state, 2, split)  # type: ignore[arg-type]
        for i in range(2):
            one = readout(state.module(i), 2, split)  # type: ignore[arg-type]
            tol = product_tol(torch.float64, n=6 + 5 + 3, scale=float(state.S[i].norm()))
            assert torch.allclose(out.B[i], one.B, rtol=0.0, atol=tol)
            assert torch.allclose(out.A[i], one.A, rtol=0.0, atol=tol)


def test_a_stacked_readout_beyond_the_states_rank_is_zero_padded() -> None:
    # Two rank-1 clients span 2 directions per module: R = 3 is clamped to 2, and a rank-3
    # readout pads one zero column and one zero row per module.
    g = torch.Generator().manual_seed(3)
    clients = [
        LoRAFactors(
            torch.randn(2, 6, 1, generator=g, dtype=torch.float64),
            torch.randn(2, 1, 5, generator=g, dtype=torch.float64),
        )
        for _ in range(2)
    ]
    with pytest.warns(RankClampedWarning):
        state = glora_aggregate(clients, rank=3)
    out = readout(state, 3)
    assert out.B.shape == (2, 6, 3)
    assert out.A.shape == (2, 3, 5)
    assert not bool(out.B[..., 2].any())
    assert not bool(out.A[..., 2, :].any())
    for i in range(2):
        one = readout(state.module(i), 3)
        tol = product_tol(torch.float64, n=6 + 5 + 3, scale=float(state.S[i].norm()))
        assert torch.allclose(out.B[i] @ out.A[i], one.B @ one.A, rtol=0.0, atol=tol)


def test_a_readout_whose_b_overflows_the_clients_dtype_is_an_error() -> None:
    # float16 clients, ||W|| = 1.4e5: computed in float32, but split="left" puts s_1 in B,
    # whose entries (7e4) are beyond float16's 65504; A stays finite.
    clients = [
        LoRAFactors(
            torch.full((4, 1), 200.0, dtype=torch.float16),
            torch.full((1, 3), 200.0, dtype=torch.float16),
        )
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = glora_aggregate(clients, rank=1)
    with pytest.raises(NonFiniteError, match=r"the rank-1 readout overflows torch\.float16"):
        readout(state, 1, "left")
