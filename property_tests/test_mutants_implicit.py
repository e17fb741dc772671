"""Tests written for surviving mutants of ``implicit.py`` (docs/mutation.md)."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from glora_math import LoRAFactors, RankClampedWarning, Sketch, glora_aggregate
from glora_math.implicit import gram_basis_maps, implicit_state
from glora_math.linalg import numerical_rank
from glora_math.testing.helpers import f64, state_tol
from glora_math.testing.strategies import conditioned_matrix
from glora_math.tolerances import eigenvalue_error, eps
from glora_math.validation import normalize_weights, validate_clients

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


def test_clients_of_rank_zero_give_the_empty_state_on_the_float32_route() -> None:
    # Every client of rank 0 (float32, qr gauge, where the Gram route is tried first): all
    # updates are zero, so the state is empty and the clamp is a warning, not an error.
    clients = [LoRAFactors(torch.zeros(5, 0, dtype=F32), torch.zeros(0, 7, dtype=F32))] * 2
    with pytest.warns(RankClampedWarning, match="all client updates are zero"):
        state = glora_aggregate(clients, rank=2)
    assert state.rank == 0
    assert state.U.shape == (5, 0)
    assert state.S.shape == (0, 7)
    assert state.relative_residual == 0.0


def _float32_clients() -> list[LoRAFactors]:
    # Two rank-2 float32 clients in d = 6: their column spaces span m = 4 dimensions.
    g = torch.Generator().manual_seed(1)
    return [
        LoRAFactors(
            conditioned_matrix(6, 2, cond=2.0, scale=1.0, generator=g, dtype=torch.float64).to(F32),
            conditioned_matrix(2, 5, cond=2.0, scale=1.0, generator=g, dtype=torch.float64).to(F32),
        )
        for _ in range(2)
    ]


def test_a_sketch_as_wide_as_the_clients_span_takes_the_general_route() -> None:
    # R + oversample = min(d, m) = 4: the sketch is as wide as the union of the client
    # subspaces, so implicit_state declines and the general route computes the exact consensus.
    fs = _float32_clients()
    info = validate_clients(fs)
    p = normalize_weights(None, 2, dtype=F32, device=info.device)
    assert implicit_state(fs, info, p, 1, Sketch(oversample=3, power_iters=1, seed=0)) is None
    assert implicit_state(fs, info, p, 1, Sketch(oversample=2, power_iters=1, seed=0)) is not None
    wide = glora_aggregate(fs, rank=1, sketch=Sketch(oversample=3, power_iters=1, seed=0))
    exact = glora_aggregate(fs, rank=1, route="householder")
    assert wide.route == "householder"
    scale = sum(float(f.B.norm() * f.A.norm()) for f in fs) / 2
    tol = state_tol(F32, d=6, k=5, ranks=[2, 2], kappa=2.0, gap=exact.gap, scale=scale)
    assert float((f64(wide.delta()) - f64(exact.delta())).norm()) <= tol


@pytest.mark.parametrize("sketch", [None, Sketch(oversample=0, power_iters=1, seed=0)])
def test_implicit_state_warnings_point_at_the_caller_of_its_caller(sketch: Sketch | None) -> None:
    # Documented: warnings point at the caller of the caller (the public operator's caller).
    # Both clients share one column space (B_1 = 2 B_0): they span 2 dimensions, m = 4 columns.
    # R = 3 exceeds the span: a RankClampedWarning, from the exact and the sketched consensus
    # (width 3 < min(d, m) = 4).
    f = _float32_clients()[0]
    fs = [f, LoRAFactors(2.0 * f.B, f.A.flip(0))]
    info = validate_clients(fs)
    p = normalize_weights(None, 2, dtype=F32, device=info.device)

    def operator() -> object:
        return implicit_state(fs, info, p, 3, sketch)

    line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(RankClampedWarning) as rec:
        state = operator()
    assert state is not None
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add stack frames
        assert (rec[0].filename, rec[0].lineno) == (__file__, line)


def test_the_sketched_gram_route_reports_the_spectrum_of_K() -> None:
    # The same sketch on the Gram route and on the Householder route (the same test matrix):
    # the same Ritz values of K, squares of the Ritz values of M, to the rounding of K's
    # eigenvalues in float32.
    g = torch.Generator().manual_seed(2)
    fs = [
        LoRAFactors(
            conditioned_matrix(30, 3, cond=3.0, scale=1.0, generator=g, dtype=torch.float64).to(
                F32
            ),
            conditioned_matrix(3, 8, cond=3.0, scale=1.0, generator=g, dtype=torch.float64).to(F32),
        )
        for _ in range(4)
    ]
    sketch = Sketch(oversample=3, power_iters=2, seed=5)
    gram = glora_aggregate(fs, rank=2, sketch=sketch)
    householder = glora_aggregate(fs, rank=2, sketch=sketch, route="householder")
    assert (gram.route, householder.route) == ("gram", "householder")
    lam = f64(householder.eigvals)
    tol = eigenvalue_error(float(lam[0]), 30 + 12, F32)
    assert float((f64(gram.eigvals) - lam).abs().max()) <= tol


def test_a_direction_just_above_the_rank_threshold_is_kept_and_the_maps_decline() -> None:
    # s_2 = 1.5 max(d, r) eps s_1 (float32, d = 64): above numerical_rank's threshold, so the
    # direction is kept, and the kept part's condition number 1 / (1.5 d eps) = 87000 is beyond
    # what a float64 Gram orthonormalises to float32 accuracy (about 23000): the maps decline.
    d, r = 64, 2
    g = torch.Generator().manual_seed(3)
    cond = 1.0 / (1.5 * d * eps(F32))
    B = conditioned_matrix(d, r, cond=cond, scale=1.0, generator=g, dtype=torch.float64).to(F32)
    assert numerical_rank(torch.linalg.svdvals(f64(B)), (d, r), F32) == 2
    assert gram_basis_maps([B], [1.0], F32) is None


def test_a_large_rank_one_client_is_perfectly_conditioned_for_the_gram_route() -> None:
    # The condition number is scale-free: a rank-1 B of norm 1e5 has condition number 1 and
    # takes the Gram route (its size is not its conditioning).
    g = torch.Generator().manual_seed(4)
    B = conditioned_matrix(40, 1, cond=1.0, scale=1e5, generator=g, dtype=torch.float64).to(F32)
    maps = gram_basis_maps([B], [1.0], F32)
    assert maps is not None
    assert maps[1] == [1]


@pytest.mark.parametrize("default", [torch.float64, torch.float16, torch.bfloat16])
def test_the_gram_route_does_not_depend_on_the_default_dtype(default: torch.dtype) -> None:
    # The weights p_i enter the maps sqrt(p_i) V_i S_i^{-1} through a float64 tensor made with
    # an explicit dtype: torch's default dtype (a global setting of the caller's; float64 or a
    # half type) changes nothing, bit for bit. Weights 0.3 and 0.7 are not representable in a
    # half type, so rounding them there would move the state.
    fs = _float32_clients()
    ref = glora_aggregate(fs, [0.3, 0.7], rank=2)
    assert ref.route == "gram"
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        state = glora_aggregate(fs, [0.3, 0.7], rank=2)
    finally:
        torch.set_default_dtype(before)
    assert state.route == "gram"
    assert torch.equal(state.U, ref.U)
    assert torch.equal(state.S, ref.S)
    assert torch.equal(state.eigvals, ref.eigvals)
