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


def test_P15_estimated_certificate_bound_holds() -> None:
    """P15: the estimate's upper bound holds in at least 99% of 1,000 random cases.

    Random clients (sizes, ranks, weights, float32 and float64, R below the clients' span so
    the residual is not zero), the sketch's estimate against the exact certificate of the same
    state: the bound (confidence 0.99) must be at least the exact relative residual, up to the
    dtype's certificate tolerance.
    """
    import random

    from glora_math import Sketch
    from glora_math.synthetic import random_clients

    rng = random.Random(15)
    misses = 0
    for case in range(1000):
        n, r = rng.randint(2, 6), rng.randint(1, 4)
        d, k = rng.randint(n * r + 2, 48), rng.randint(8, 40)
        dtype = torch.float32 if case % 2 else torch.float64
        clients = random_clients(n_clients=n, d=d, k=k, rank=r, seed=case, dtype=dtype,
                                 heterogeneity=rng.uniform(0.1, 1.0))  # fmt: skip
        weights = [rng.uniform(0.1, 1.0) for _ in range(n)]
        R = rng.randint(1, max(1, n * r - 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = glora_aggregate(clients, weights, rank=R, sketch=Sketch(seed=case))
            est = glora_aggregate(clients, weights, rank=R,
                                  sketch=Sketch(seed=case, certificate="estimate"))  # fmt: skip
        assert exact.certificate is not None
        assert est.certificate is not None
        assert est.certificate.estimated
        assert not exact.certificate.estimated
        assert est.certificate.confidence == 0.99
        bound = est.certificate.bound
        assert bound is not None
        assert bound >= est.certificate.relative_residual
        tol = certificate_tol(dtype, n=d + k + n * r, scale=1.0)
        misses += bound + tol < exact.certificate.relative_residual
    assert misses <= 10, misses


def test_the_estimate_is_linear_in_the_clients_and_refuses_too_few_probes() -> None:
    import pytest

    from glora_math import GloraError, Sketch
    from glora_math.operators import get_operator
    from glora_math.synthetic import random_clients

    with pytest.raises(GloraError, match=r"too few for confidence 0\.99"):
        Sketch(certificate="estimate", probes=10)
    with pytest.raises(GloraError, match="'exact' or 'estimate'"):
        Sketch(certificate="guess")  # type: ignore[arg-type]
    # Through the operators' options: sketch_probes > 0 asks for the estimate.
    clients = random_clients(n_clients=5, d=40, k=30, rank=3, seed=1)
    res = get_operator("glora")(clients, rank=4, options={"sketch": 1.0, "sketch_probes": 96.0})
    assert res.certificate is not None
    assert res.certificate.estimated
    # A stack: one set of probes for every module; the total is the stack's estimate.
    Bs, As = (
        torch.randn(4, 3, 40, 2, dtype=torch.float64),
        torch.randn(4, 3, 2, 30, dtype=torch.float64),
    )
    stack = [LoRAFactors(Bs[i], As[i]) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = glora_aggregate(stack, rank=3, sketch=Sketch(certificate="estimate"))
        ex = glora_aggregate(stack, rank=3, sketch=Sketch())
    assert est.certificate is not None
    assert ex.certificate is not None
    assert est.certificate.estimated
    assert est.certificate.bound is not None
    assert est.certificate.bound >= ex.certificate.relative_residual
