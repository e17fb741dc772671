"""Tests of ``glora_math.certificate``.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``certificate.py`` that survived the property suite.
"""

from __future__ import annotations

import warnings

import torch

from glora_math import LoRAFactors, glora_aggregate
from glora_math.certificate import residual_curve, warn_residual
from glora_math.tolerances import certificate_tol


def test_the_residual_curve_is_computed_in_float64() -> None:
    # Documented: rho(R)^2 for R = 0..rows, in float64, also for a float32 S.
    # Squared row norms 2 and 2 of ||W||^2 = 4: rho^2 = 1, 1/2, 0 (exact in binary).
    curve = residual_curve(torch.ones(2, 2, dtype=torch.float32), 2.0)
    assert curve.dtype == torch.float64
    assert curve.tolist() == [1.0, 0.5, 0.0]


def test_the_residual_curve_of_a_unit_mean() -> None:
    # ||W|| = 1, row norms^2 1/4 and 1/2: rho^2 = 1, 3/4, 1/4 (exact in binary).
    S = torch.tensor([[0.5, 0.0], [0.0, 0.5**0.5]], dtype=torch.float64)
    curve = residual_curve(S[:1], 1.0)
    assert curve.tolist() == [1.0, 0.75]


def test_the_residual_curve_of_a_zero_mean_is_zero() -> None:
    curve = residual_curve(torch.zeros(2, 3, dtype=torch.float64), 0.0)
    assert curve.tolist() == [0.0, 0.0, 0.0]


def test_a_limit_of_zero_never_warns() -> None:
    # Documented: a warning when rho exceeds limit (> 0); limit 0 or None means no check.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_residual(0.5, 0.0, "here", stacklevel=1)
        warn_residual(0.5, None, "here", stacklevel=1)


def test_a_float32_certificate_holds_norms_beyond_the_square_root_of_its_range() -> None:
    # Found by the mutation round: the certificate squared unscaled entries, so a float32 mean
    # update of norm 4e20 (entries 1e20, squares beyond float32's 3.4e38) was reported as an
    # overflow. The norm itself is far inside float32's range.
    c = 1e10
    state = glora_aggregate([LoRAFactors(c * torch.ones(4, 1), c * torch.ones(1, 4))], rank=1)
    assert state.certificate is not None
    mean = state.certificate.mean_norm
    assert abs(mean - 4 * c * c) <= certificate_tol(torch.float32, n=4 + 4 + 1, scale=4 * c * c)
    assert state.relative_residual <= certificate_tol(torch.float32, n=4 + 4 + 1, scale=1.0)


def test_a_float32_certificate_holds_norms_at_both_ends_of_its_range() -> None:
    # The largest entry may be as large as the norm allows (a first scaling by 2^e overflowed
    # to inf for entries at or above 2^127, giving NaN), and squares of tiny entries must not
    # underflow to a zero mean (a mean of norm 5e-24 was certified as exactly 0).
    for c in (1.4e19, 1e-12):
        state = glora_aggregate([LoRAFactors(c * torch.ones(1, 1), c * torch.ones(1, 1))], rank=1)
        assert state.certificate is not None
        tol = certificate_tol(torch.float32, n=3, scale=c * c)
        assert abs(state.certificate.mean_norm - c * c) <= tol
        assert state.relative_residual <= certificate_tol(torch.float32, n=3, scale=1.0)
