"""Consensus subspaces with a controlled eigengap: recovery within c eps kappa / gap."""

from __future__ import annotations

import math

from hypothesis import given

from glora_math import glora_aggregate
from glora_math.linalg import projector_distance
from glora_math.tolerances import product_tol, subspace_tol

from .helpers import f64, n_dims
from .strategies import gapped_problems


@given(gapped_problems())
def test_gapped_problems_have_the_designed_gap(gp) -> None:  # type: ignore[no-untyped-def]
    pb = gp.problem
    state = glora_aggregate(pb.factors, pb.weights, rank=gp.R)
    n = n_dims(pb.d, pb.k, pb.ranks)
    assert math.isclose(
        state.gap, gp.gap, abs_tol=product_tol(pb.dtype, n=n, scale=1.0, kappa=pb.cond)
    )
    assert abs(float(state.eigvals[0]) - 1.0) <= product_tol(
        pb.dtype, n=n, scale=1.0, kappa=pb.cond
    )


@given(gapped_problems())
def test_consensus_recovers_the_common_subspace_within_the_gap_bound(gp) -> None:  # type: ignore[no-untyped-def]
    # Davis-Kahan: the error in span(U_ref) grows like eps * kappa / gap, and no faster.
    pb = gp.problem
    state = glora_aggregate(pb.factors, pb.weights, rank=gp.R)
    tol = subspace_tol(pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), kappa=pb.cond, gap=gp.gap)
    assert projector_distance(f64(state.U), gp.V) <= tol * (2 * gp.R) ** 0.5
