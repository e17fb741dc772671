"""Tests written for surviving mutants of ``aggregate.py`` (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch

from glora_math import LoRAFactors, NonFiniteError, glora_aggregate
from glora_math.aggregate import _overflow


def _clients() -> list[LoRAFactors]:
    return [
        LoRAFactors(
            torch.full((4, 1), 1.0, dtype=torch.float64),
            torch.full((1, 3), 1.0, dtype=torch.float64),
        ),
        LoRAFactors(
            torch.full((4, 1), 5.0, dtype=torch.float64),
            torch.full((1, 3), 1.0, dtype=torch.float64),
        ),
    ]


def test_an_overflow_error_keeps_the_cause_of_a_non_finite_certificate() -> None:
    # A NonFiniteError without a client (the certificate's) keeps its own text: it did not come
    # from a failed kernel. The largest client (1) is named.
    err = _overflow(NonFiniteError("the certificate overflowed"), _clients())
    assert isinstance(err, NonFiniteError)
    assert err.client == 1
    assert err.message.startswith("the certificate overflowed; the largest client update")


def test_an_overflow_error_says_which_kernel_failed() -> None:
    # A kernel error (LinAlgError, OverflowError) has no .message: its text is quoted.
    for kernel_error in (torch.linalg.LinAlgError("svd did not converge"), OverflowError("big")):
        err = _overflow(kernel_error, _clients())
        assert isinstance(err, NonFiniteError)
        assert err.client == 1
        assert err.message.startswith(f"a kernel failed ({kernel_error}); the largest client")


def test_a_certificate_overflow_is_reported_as_such() -> None:
    # float32, one rank-1 client B = c 1, A = c 1 with c = 1e19: every entry of W = c^2 and of
    # S = U^T W is finite, but ||W||_F = 4 c^2 = 4e38 exceeds float32's largest value 3.4e38.
    c = 1e19
    clients = [
        LoRAFactors(
            torch.full((4, 1), c, dtype=torch.float32), torch.full((1, 4), c, dtype=torch.float32)
        )
    ]
    with pytest.raises(NonFiniteError) as info:
        glora_aggregate(clients, rank=1)
    assert info.value.client == 0
    assert info.value.message.startswith("the certificate overflowed torch.float32")
