"""The routes without explicit client bases (``glora_math.implicit``), exact and randomized.

Statements:
- ``gram_basis_maps`` turns every B into an orthonormal basis of its column space, to the
  Householder tolerance, with the numerical rank of the Householder rule.
- It declines (``None``) exactly where the float64 Gram cannot match a Householder basis in the
  working dtype (``tolerances.gram_basis_accurate``), and the operator then takes the general
  route and still returns a correct state.
- For float32 clients with the qr gauge the route is taken, in both consensus modes.
- Exact: it finds the general route's subspace and spectrum, to the Davis-Kahan tolerance
  of the exact gap, with P1 (``U S = U U^T W_bar``).
- Randomized: it finds the subspace the general route finds from the same test matrix, with
  P1 for it.
- Batched, it matches the per-module operator and redoes the layers it cannot treat
  uniformly.
- ``randomized_left_svd_factored`` is ``randomized_left_svd`` of the product, to rounding.
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import glora_math.sides as sides_module
from glora_math import (
    LoRAFactors,
    RankClampedWarning,
    Sketch,
    consensus_basis,
    gauge_fix,
    glora_aggregate,
)
from glora_math.implicit import gram_basis_maps, implicit_state
from glora_math.linalg import (
    numerical_rank,
    projector_distance,
    randomized_left_svd,
    randomized_left_svd_factored,
)
from glora_math.tolerances import (
    eigenvalue_error,
    eps,
    gram_basis_accurate,
    orthonormality_tol,
    product_tol,
    subspace_tol,
)
from glora_math.validation import normalize_weights, validate_clients

from .helpers import cond, dense_K, f64, n_dims, state_tol, top_eigenspace, unique_or_reject
from .strategies import conditioned_matrix, problems

F32 = torch.float32


def test_gram_basis_accurate_switches_at_the_ratio_of_the_epsilons() -> None:
    limit = math.sqrt(eps(F32) / float(torch.finfo(torch.float64).eps))
    kappa = torch.tensor([1.0, limit * 0.999, limit * 1.001], dtype=torch.float64)
    assert gram_basis_accurate(kappa, F32).tolist() == [True, True, False]
    # float64 work: only a perfectly conditioned basis qualifies.
    assert gram_basis_accurate(kappa, torch.float64).tolist() == [True, False, False]


@pytest.mark.parametrize("cond", [1.0, 30.0, 3000.0])
def test_gram_basis_maps_orthonormalise_and_keep_the_column_space(cond: float) -> None:
    g = torch.Generator().manual_seed(int(cond))
    d, r = 300, 6
    full = conditioned_matrix(d, r, cond=cond, scale=2.0, generator=g, dtype=torch.float64)
    low = conditioned_matrix(d, r - 2, cond=cond, scale=1.0, generator=g, dtype=torch.float64)
    low = low @ torch.randn(r - 2, r, generator=g, dtype=torch.float64)  # rank r - 2
    Bs = [full.to(F32), low.to(F32), torch.zeros(d, 3, dtype=F32)]
    p = [0.5, 0.3, 0.2]
    maps = gram_basis_maps(Bs, p, F32)
    assert maps is not None
    D, ranks = maps
    assert ranks == [r, r - 2, 0]
    assert D.shape == (r + r + 3, 2 * r - 2)
    W = torch.cat(Bs, dim=1) @ D  # [sqrt(p_i) U_i]
    cols = 0
    for B, pi, rho in zip(Bs, p, ranks, strict=True):
        U = f64(W[:, cols : cols + rho]) / math.sqrt(pi)
        cols += rho
        if rho == 0:
            continue
        eye = torch.eye(rho, dtype=torch.float64)
        assert float((U.mT @ U - eye).norm()) <= orthonormality_tol(F32, n=d + r)
        # U spans col(B): the part of B outside it is rounding, relative to the conditioning.
        Bd = f64(B)
        resid = float((Bd - U @ (U.mT @ Bd)).norm())
        assert resid <= product_tol(F32, n=d + r, scale=float(Bd.norm()), kappa=cond)
    # Off-diagonal blocks are zero: client i's columns map only to client i's basis.
    assert float(D[:r, r:].abs().max()) == 0.0


def test_gram_basis_maps_decline_where_the_gram_is_not_accurate_enough() -> None:
    g = torch.Generator().manual_seed(2)
    # float32, d = 6: the rank rule keeps a direction 1e-5 below the top, but a float64 Gram
    # cannot orthonormalise a basis of condition 1e5 to float32 accuracy.
    B = conditioned_matrix(6, 2, cond=1e5, scale=1.0, generator=g, dtype=torch.float64)
    assert gram_basis_maps([B.to(F32)], [1.0], F32) is None
    # float64 work: any conditioning above 1 declines.
    assert gram_basis_maps([B], [1.0], torch.float64) is None
    # ... and the operator still answers correctly, through the general route.
    A = conditioned_matrix(2, 5, cond=1.0, scale=1.0, generator=g, dtype=torch.float64)
    other = conditioned_matrix(6, 2, cond=2.0, scale=1.0, generator=g, dtype=torch.float64)
    fs = [LoRAFactors(B.to(F32), A.to(F32)), LoRAFactors(other.to(F32), A.to(F32))]
    state = glora_aggregate(fs, rank=1, sketch=Sketch(oversample=1, power_iters=1, seed=0))
    U = f64(state.U)
    mean = sum((f64(f.B) @ f64(f.A) for f in fs), start=torch.zeros(6, 5, dtype=torch.float64))
    tol = state_tol(F32, d=6, k=5, ranks=[2, 2], kappa=1e5, gap=1.0, scale=float(mean.norm()))
    assert float((f64(state.delta()) - U @ (U.mT @ mean / 2)).norm()) <= tol


def test_float32_clients_take_the_route_and_float64_clients_do_not(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    fs64 = [
        LoRAFactors(
            torch.randn(40, 4, generator=g, dtype=torch.float64),
            torch.randn(4, 30, generator=g, dtype=torch.float64),
        )
        for _ in range(6)
    ]
    fs32 = [LoRAFactors(f.B.to(F32), f.A.to(F32)) for f in fs64]
    sketch = Sketch(oversample=2, power_iters=1, seed=0)
    calls: list[int] = []
    real = sides_module.gauge_fix_all

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sides_module, "gauge_fix_all", spy)
    glora_aggregate(fs32, rank=3, sketch=sketch)
    glora_aggregate(fs32, rank=3)
    assert calls == []
    glora_aggregate(fs64, rank=3, sketch=sketch)
    glora_aggregate(fs64, rank=3)
    assert calls == [1, 1]
    # The svd gauge always gauge-fixes.
    glora_aggregate(fs32, rank=3, gauge="svd")
    glora_aggregate(fs32, rank=3, sketch=sketch, gauge="svd")
    assert calls == [1, 1, 1, 1]


@given(
    problems(dtype=F32, weights="with_zeros", deficient=True, zero_updates=True, max_clients=6),
    st.data(),
)
def test_the_route_finds_the_general_routes_subspace_with_P1(pb, data) -> None:  # type: ignore[no-untyped-def]
    live = [f.B for f, pi in zip(pb.factors, pb.p.tolist(), strict=True) if pi > 0]
    # The union of the client subspaces in float32 (the problem's own union_dim is float64's).
    union = int(torch.linalg.matrix_rank(torch.cat(live, dim=1)))
    if union < 2:
        return
    R = data.draw(st.integers(1, union - 1), label="R")
    extra = data.draw(st.integers(0, min(1, union - 1 - R)), label="oversample")
    sketch = Sketch(oversample=extra, power_iters=1)
    info = validate_clients(pb.factors)
    p = normalize_weights(pb.weights, pb.n, dtype=F32, device=info.device)
    fast = unique_or_reject(lambda: implicit_state(pb.factors, info, p, R, sketch))
    # The sketch is narrower than the union and the clients are well conditioned: taken.
    assert fast is not None
    U, S, eigvals, gap, _ = fast
    fixed = [gauge_fix(f, "qr") for f in pb.factors]
    general = unique_or_reject(lambda: consensus_basis(fixed, pb.weights, rank=R, sketch=sketch))
    assert U.shape == general.U.shape
    n = n_dims(pb.d, pb.k, pb.ranks)
    # Both routes sketch the same K with the same test matrix; they differ by rounding in K,
    # amplified by the Ritz gap (as in the gauge-invariance test of the general route).
    rel_gap = min(gap, general.gap) / float(eigvals[0])
    tol = subspace_tol(F32, n=n, kappa=pb.cond, gap=rel_gap)
    assert projector_distance(f64(U), f64(general.U)) <= tol * (2 * U.shape[1]) ** 0.5
    # P1 for the route's own subspace, and an orthonormal U.
    Ud = f64(U)
    eye = torch.eye(Ud.shape[1], dtype=torch.float64)
    assert float((Ud.mT @ Ud - eye).norm()) <= orthonormality_tol(F32, n=n)
    tol1 = state_tol(F32, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=1.0, scale=pb.scale())
    assert float((Ud @ f64(S) - Ud @ (Ud.mT @ pb.mean())).norm()) <= tol1


@given(
    problems(dtype=F32, weights="with_zeros", deficient=True, zero_updates=True, max_clients=6),
    st.data(),
)
def test_the_exact_route_finds_the_top_eigenspace_of_K_with_P1(pb, data) -> None:  # type: ignore[no-untyped-def]
    fixed = [gauge_fix(f, "qr") for f in pb.factors]
    K = dense_K(fixed, pb.p)
    lam = torch.linalg.eigvalsh(K).flip(0)
    avail = int((lam > lam[0] * pb.d * eps(F32) * 10).sum())
    if avail == 0:
        return
    R = data.draw(st.integers(1, avail), label="R")
    info = validate_clients(pb.factors)
    p = normalize_weights(pb.weights, pb.n, dtype=F32, device=info.device)
    fast = unique_or_reject(lambda: implicit_state(pb.factors, info, p, R, None))
    # Well-conditioned float32 clients with some update: the route is taken.
    assert fast is not None
    U, S, eigvals, gap, _ = fast
    V, lam = top_eigenspace(K, R)
    n = n_dims(pb.d, pb.k, pb.ranks)
    # The spectrum of K, as long as the general route's (the nonzero part).
    general = consensus_basis(fixed, pb.weights, rank=R)
    assert eigvals.shape == general.eigvals.shape
    m = eigvals.numel()
    assert float((f64(eigvals) - lam[:m]).abs().max()) <= product_tol(F32, n=n, scale=1.0)
    # The top-R eigenspace of K, within Davis-Kahan of the dense one.
    exact_gap = float(lam[R - 1] - (lam[R] if lam.numel() > R else 0.0))
    assert abs(gap - exact_gap) <= product_tol(F32, n=n, scale=1.0)
    tol = subspace_tol(F32, n=n, kappa=1.0, gap=exact_gap)
    assert projector_distance(f64(U), V) <= tol * (2 * R) ** 0.5
    # P1 for that subspace, and an orthonormal U.
    Ud = f64(U)
    eye = torch.eye(Ud.shape[1], dtype=torch.float64)
    assert float((Ud.mT @ Ud - eye).norm()) <= orthonormality_tol(F32, n=n)
    tol1 = state_tol(F32, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=1.0, scale=pb.scale())
    assert float((Ud @ f64(S) - Ud @ (Ud.mT @ pb.mean())).norm()) <= tol1


def test_randomized_left_svd_factored_is_the_sketch_of_the_product() -> None:
    g = torch.Generator().manual_seed(9)
    B = torch.randn(80, 30, generator=g, dtype=torch.float64)
    D = torch.randn(30, 20, generator=g, dtype=torch.float64)
    U1, s1 = randomized_left_svd(
        B @ D, 6, power_iters=2, generator=torch.Generator().manual_seed(4)
    )
    U2, s2, BtU = randomized_left_svd_factored(
        B, D, 6, power_iters=2, generator=torch.Generator().manual_seed(4)
    )
    scale = float(torch.linalg.matrix_norm(B @ D, ord=2))
    kappa = float(torch.linalg.cond(B @ D))
    assert float((s1 - s2).abs().max()) <= product_tol(
        torch.float64, n=110, scale=scale, kappa=kappa
    )
    # The same singular vectors up to sign.
    signs = torch.sign((U1 * U2).sum(0))
    assert float((U1 - U2 * signs).norm()) <= subspace_tol(
        torch.float64, n=110, kappa=kappa, gap=float((s1[:-1] - s1[1:]).min() / s1[0])
    )
    assert float((BtU - B.mT @ U2).norm()) <= product_tol(
        torch.float64, n=110, scale=float(B.norm())
    )
    with pytest.raises(ValueError, match="sketch width 20"):
        randomized_left_svd_factored(B, D, 20, power_iters=0, generator=torch.Generator())


def test_equal_ranks_give_a_stack_of_maps_that_acts_like_the_block_diagonal() -> None:
    g = torch.Generator().manual_seed(12)
    d, r = 50, 4
    full = torch.randn(d, r, generator=g, dtype=torch.float64)
    low = torch.randn(d, 2, generator=g, dtype=torch.float64)
    low = low @ torch.randn(2, r, generator=g, dtype=torch.float64)  # rank 2 of 4
    Bs = [full.to(F32), low.to(F32), (2 * full).to(F32)]
    maps = gram_basis_maps(Bs, [0.2, 0.3, 0.5], F32)
    assert maps is not None
    stack, ranks = maps
    assert stack.shape == (3, r, r)
    assert ranks == [4, 2, 4]
    # The directions client 1 does not keep map to zero columns.
    assert float(stack[1, :, 2:].abs().max()) == 0.0
    dense = torch.zeros(3 * r, 3 * r, dtype=F32)
    for i in range(3):
        dense[i * r : (i + 1) * r, i * r : (i + 1) * r] = stack[i]
    B = torch.cat(Bs, dim=1)
    out = []
    for D in (stack, dense):
        out.append(
            randomized_left_svd_factored(
                B, D, 3, power_iters=1, generator=torch.Generator().manual_seed(0), rank=sum(ranks)
            )
        )
    for a, b in zip(out[0], out[1], strict=True):
        assert torch.equal(a, b) or float((a - b).abs().max()) <= product_tol(
            F32, n=d + 3 * r, scale=float(b.abs().max())
        )
    with pytest.raises(ValueError, match=r"min\(d, m\) = 10"):
        randomized_left_svd_factored(B, stack, 10, power_iters=0, generator=g, rank=10)


@pytest.mark.parametrize("sketch", [None, Sketch(oversample=2, power_iters=2, seed=11)])
def test_the_batched_route_matches_the_per_module_route_and_redoes_odd_layers(  # type: ignore[no-untyped-def]
    monkeypatch, sketch
) -> None:
    g = torch.Generator().manual_seed(21)
    L, d, k, r, n = 4, 48, 30, 4, 5
    Bs = [torch.randn(L, d, r, generator=g, dtype=torch.float64) for _ in range(n)]
    As = [torch.randn(L, r, k, generator=g, dtype=torch.float64) for _ in range(n)]
    # Layer 1: client 3's B is rank-deficient; layer 2: client 0's B has condition number 1e5,
    # beyond what its float64 Gram can orthonormalise to float32 accuracy (d = 48 keeps it).
    Bs[3][1] = Bs[3][1, :, :2] @ torch.randn(2, r, generator=g, dtype=torch.float64)
    Bs[0][2] = conditioned_matrix(d, r, cond=1e5, scale=1.0, generator=g, dtype=torch.float64)
    Bs = [B.to(F32) for B in Bs]
    As = [A.to(F32) for A in As]
    w = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0])
    redone: list[int] = []
    real = sides_module.side_state

    def spy(fs, *args, **kwargs):  # type: ignore[no-untyped-def]
        redone.append(1)
        return real(fs, *args, **kwargs)

    monkeypatch.setattr(sides_module, "side_state", spy)
    clients = [LoRAFactors(B, A) for B, A in zip(Bs, As, strict=True)]
    batched = glora_aggregate(clients, w, rank=3, sketch=sketch)
    # Only the two odd layers went through the per-module operator.
    assert len(redone) == 2
    for layer in range(L):
        fs = [LoRAFactors(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)]
        single = glora_aggregate(fs, w, rank=3, sketch=sketch)
        # The layer's own conditioning (1e5 only in layer 2), not a bound for all layers.
        kappa = max(cond(f.B) for f in fs)
        tol = subspace_tol(F32, n=d + k + n * r, kappa=kappa, gap=single.gap / single.eigvals[0])
        assert projector_distance(f64(batched.U[layer]), f64(single.U)) <= tol * 6**0.5
        # P1 for the batched layer's own subspace.
        U = f64(batched.U[layer])
        mean = sum(
            (float(w[i] / w.sum()) * (f64(f.B) @ f64(f.A)) for i, f in enumerate(fs)),
            start=torch.zeros(d, k, dtype=torch.float64),
        )
        scale = sum(
            float(w[i] / w.sum()) * float(f.B.norm() * f.A.norm()) for i, f in enumerate(fs)
        )
        tol1 = state_tol(F32, d=d, k=k, ranks=[r] * n, kappa=kappa, gap=1.0, scale=scale)
        assert float((U @ f64(batched.S[layer]) - U @ (U.mT @ mean)).norm()) <= tol1


@given(problems(dtype=F32, weights="random"), st.booleans(), st.data())
def test_the_route_is_recorded_and_forcing_either_gives_the_same_state(  # type: ignore[no-untyped-def]
    pb, stacked, data
) -> None:
    # The rule's choice is recorded; forcing the other route changes the state only by
    # rounding (the same subspace: P3 of the bases, P1 of the coordinates).
    R = data.draw(st.integers(1, max(1, pb.union_dim())), label="R")
    fs = list(pb.factors)
    if stacked:  # the same clients as a stack of 2 modules
        fs = [LoRAFactors(torch.stack([f.B, f.B]), torch.stack([f.A, f.A])) for f in fs]
    auto = unique_or_reject(lambda: glora_aggregate(fs, pb.weights, rank=R))
    house = unique_or_reject(lambda: glora_aggregate(fs, pb.weights, rank=R, route="householder"))
    assert house.route == ("stacked-householder" if stacked else "householder")
    assert auto.route in (
        ("stacked-gram", "stacked-householder") if stacked else ("gram", "householder")
    )
    tol = state_tol(
        F32, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=house.gap, scale=pb.scale()
    )
    assert float((f64(auto.delta()) - f64(house.delta())).norm()) <= tol * (2 if stacked else 1)


def test_forcing_the_gram_route_where_it_is_not_accurate_is_refused() -> None:
    from glora_math import GloraError

    g = torch.Generator().manual_seed(5)
    fs = [(torch.randn(8, 2, generator=g, dtype=torch.float64),
           torch.randn(2, 6, generator=g, dtype=torch.float64)) for _ in range(3)]  # fmt: skip
    with pytest.raises(GloraError, match="route='gram' is not accurate"):
        glora_aggregate(fs, rank=2, route="gram")  # float64: the Gram route cannot match it
    with pytest.raises(GloraError, match="needs gauge='qr'"):
        glora_aggregate(fs, rank=2, route="gram", gauge="svd")
    with pytest.raises(GloraError, match="route must be"):
        glora_aggregate(fs, rank=2, route="fast")  # type: ignore[arg-type]
    f32 = [(B.float(), A.float()) for B, A in fs]
    assert glora_aggregate(f32, rank=2, route="gram").route == "gram"


# -------------------------------------------------------------------------------------------------
# Tests that pin behaviour found by the mutation run (docs/mutation.md): each was written for a
# mutant of ``implicit.py`` that survived the property suite.
# -------------------------------------------------------------------------------------------------


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


def test_the_raw_gram_of_a_stack_is_the_same_when_done_in_chunks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # raw_gram bounds its float64 copy of a stack by doing a few modules at a time; the
    # result is the same matrices, bit for bit (each chunk is the same kernels on its modules).
    from glora_math import implicit

    g = torch.Generator().manual_seed(0)
    Xs = [torch.randn(5, 30, 3, generator=g) for _ in range(4)]
    whole = implicit.raw_gram(Xs)
    monkeypatch.setattr(implicit, "RAW_GRAM_CHUNK_BYTES", 8 * 30 * 12 * 2)  # two modules a time
    assert torch.equal(implicit.raw_gram(Xs), whole)
    X = torch.cat(Xs, dim=-1).to(torch.float64)
    # The Gram itself, to the rounding of 30-term float64 sums.
    tol = eigenvalue_error(float((X.mT @ X).abs().max()), 30, torch.float64)
    assert float((whole - X.mT @ X).abs().max()) <= tol
