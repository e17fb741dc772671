"""Tests of ``glora_math.metrics``.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``metrics.py`` that survived the property suite.
"""

from __future__ import annotations

import torch

from glora_math import mean_update
from glora_math.testing.strategies import gaussian_clients
from glora_math.tolerances import product_tol


def test_the_equal_weights_of_float64_clients_are_float64() -> None:
    # mean_update with weights=None is sum_i B_i A_i / N in the working dtype (float64): the
    # weight 1/3 must not be rounded to float32 (a relative error of 1e-8).
    g = torch.Generator().manual_seed(0)
    clients = gaussian_clients(3, 6, 2, 5, generator=g)
    mean = mean_update(clients)
    assert mean.B.dtype == torch.float64
    expected = sum(f.B @ f.A for f in clients) / 3
    scale = sum(float(f.B.norm() * f.A.norm()) for f in clients) / 3
    tol = product_tol(torch.float64, n=6 + 5 + 6, scale=scale)
    assert float((mean.B @ mean.A - expected).norm()) <= tol
