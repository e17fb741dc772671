"""The verification layer itself: proofs, high-precision checks, P8 and L1 properties.

The proofs and checks must pass *and* have power: a false statement fed to the same machinery
must fail.
"""

from __future__ import annotations

import random

import mpmath as mp
import pytest
import sympy as sp
import torch
from glora_math.proofs import highprec, symbolic
from glora_math.proofs.propositions import PROPOSITIONS
from glora_math.proofs.verify import run_properties
from hypothesis import given
from hypothesis import strategies as st

from glora_math import glora_aggregate
from glora_math.linalg import lowrank_fro_norm
from glora_math.tolerances import aggregate_tol, product_tol

from .helpers import f64, n_dims, unique_or_reject
from .strategies import problems


@pytest.mark.parametrize("pid", sorted(symbolic.PROOFS))
def test_symbolic_proof_passes(pid: str) -> None:
    res = symbolic.PROOFS[pid]()
    assert res.ok, res.detail


@pytest.mark.parametrize("pid", sorted(highprec.CHECKS))
def test_high_precision_residual_sits_at_working_precision(pid: str) -> None:
    res = highprec.run_check(pid, dps=50, trials=2)
    assert res.ok, (res.residual, res.threshold, res.detail)


def test_symbolic_machinery_rejects_false_identities() -> None:
    d, k, R = symbolic.d, symbolic.k, symbolic.R
    U = sp.MatrixSymbol("U", d, R)
    W = sp.MatrixSymbol("W", d, k)
    assert not symbolic._is_zero(U * U.T * W - W)  # projection is not the identity
    B = sp.MatrixSymbol("B", d, symbolic.r)
    assert not symbolic._is_zero(symbolic._projector(B) - B * B.T)
    rng = random.Random(0)
    Q = symbolic.rational_orthogonal(3, rng)
    assert (Q.T * Q - sp.eye(3)).is_zero_matrix
    M = symbolic.rational_matrix(4, 2, rng)
    P = symbolic.rational_projector(M)
    assert (P * P - P).is_zero_matrix
    assert not (P - sp.eye(4)).is_zero_matrix


def test_high_precision_check_has_power() -> None:
    # A false claim (FedIT equals the mean update) leaves an O(1) residual at 50 digits.
    def fedit_is_exact(rng: random.Random) -> tuple[mp.mpf, str]:
        pb = highprec._problem(rng)
        Bb = sum((p * B for p, B in zip(pb.p, pb.Bs, strict=True)), mp.zeros(pb.d, pb.r))
        Ab = sum((p * A for p, A in zip(pb.p, pb.As, strict=True)), mp.zeros(pb.r, pb.k))
        return highprec._fro(pb.mean - Bb * Ab) / pb.scale, "false claim"

    res = highprec._run(fedit_is_exact, 50, 2, 0)
    assert not res.ok
    assert res.residual > 1e-3


def test_registry_links_resolve() -> None:
    import importlib

    ids = [p.id for p in PROPOSITIONS]
    assert ids[:14] == [f"P{i}" for i in range(1, 15)]
    for p in PROPOSITIONS:
        assert p.id in symbolic.PROOFS
        assert p.properties
        for ref in p.properties:
            module, fn = ref.split(":")
            assert hasattr(importlib.import_module(f"property_tests.{module}"), fn), ref


def test_run_properties_counts_examples_and_reports_failures() -> None:
    n, failures = run_properties(("test_verification:test_L1_lowrank_norms",))
    assert n >= 10
    assert not failures
    # A property that does not exist is reported, not silently counted as verified.
    n, failures = run_properties(("test_verification:test_no_such_property",))
    assert n == 0
    assert len(failures) == 1
    assert "test_no_such_property" in failures[0]


@given(problems(weights="random"), st.data())
def test_P8_optimality_gap(pb, data) -> None:  # type: ignore[no-untyped-def]
    union = pb.union_dim()
    R = data.draw(st.integers(1, union), label="R")
    state = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R))
    W = pb.mean()
    s = torch.linalg.svdvals(W)
    floor = float(s[R:].pow(2).sum().sqrt())
    err = float((W - f64(state.delta())).norm())
    tol = aggregate_tol(
        pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), kappa=pb.cond, gap=state.gap, scale=pb.scale()
    )
    assert err >= floor - tol
    # Equality when span(U_ref) contains the top-R left singular space: R = union.
    if union == R:
        assert err <= tol
        assert floor <= tol + float(s[union:].pow(2).sum().sqrt())


@given(problems(max_clients=1))
def test_L1_lowrank_norms(pb) -> None:  # type: ignore[no-untyped-def]
    f = pb.factors[0]
    dense = float(f64(f.delta()).norm())
    tol = product_tol(pb.dtype, n=pb.d + pb.k + f.rank, scale=float(f.B.norm() * f.A.norm()))
    assert abs(lowrank_fro_norm(f.B, f.A) - dense) <= tol
