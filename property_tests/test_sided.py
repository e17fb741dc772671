"""The side-aware consensus, the certificate and the auto-rank rule (SPEC extensions, ours).

P11: the right-side state is the projection of the mean from the right, ``W_bar V V^T``, and
is gauge invariant. P12: the certificate equals the measured relative error. P13: rank="auto"
is the smallest certified rank. P14: side="auto" keeps the better side. Dense float64
references throughout; tolerances from :mod:`glora_math.tolerances`.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from glora_math import (
    GloraError,
    LoRAFactors,
    RankClampedWarning,
    apply_gauge,
    eckart_young_error,
    fedit,
    glora_aggregate,
    readouts,
    relative_error,
    state_factors,
)
from glora_math.errors import ResidualWarning, ZeroEigengapWarning
from glora_math.linalg import projector_distance
from glora_math.operators import get_operator
from glora_math.tolerances import (
    certificate_tol,
    orthonormality_tol,
    product_tol,
    subspace_tol,
)

from .helpers import (
    best_rank_error,
    cond,
    f64,
    n_dims,
    orth,
    state_tol,
    top_eigenspace,
    unique_or_reject,
)
from .strategies import Problem, gauges_for, problems

MODES = st.sampled_from(["qr", "svd"])
SIDES = st.sampled_from(["left", "right", "auto"])


def _row_union(pb: Problem) -> int:
    """dim sum_i row(p_i B_i A_i): a rank every side and gauge mode can reach."""
    rows = [f64(f.delta()) for i, f in enumerate(pb.factors) if float(pb.p[i]) > 0]
    return int(torch.linalg.matrix_rank(torch.cat(rows, dim=0))) if rows else 0


def _measured(pb: Problem, delta: torch.Tensor) -> float:
    W = pb.mean()
    den = float(W.norm())
    return float((W - f64(delta)).norm()) / den if den > 0 else 0.0


def _cert_tol(pb: Problem, rho: float) -> float:
    """Certificate vs measured: scale = sum_i p_i ||B_i|| ||A_i|| / ||W_bar||."""
    den = float(pb.mean().norm())
    scale = pb.scale() / den if den > 0 else 1.0
    return certificate_tol(pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), scale=scale)


@given(problems(weights="with_zeros", zero_updates=True, deficient=True), MODES, st.data())
def test_P11_right_side_is_the_projection_of_the_mean(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    union = min(_row_union(pb), pb.union_dim())
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")
    state = unique_or_reject(
        lambda: glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode, side="right")
    )
    assert state.side == "right"
    assert state.U.shape == (pb.k, R)
    assert state.S.shape == (R, pb.d)
    assert state.shape == (pb.d, pb.k)
    V = f64(state.U)
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=1.0, scale=pb.scale()
    )
    expected = pb.mean() @ V @ V.mT
    assert float((f64(state.delta()) - expected).norm()) <= tol
    # V spans the top-R eigenspace of K_R = sum p_i V_i V_i^T over the clients with an update.
    live = [i for i, f in enumerate(pb.factors) if float(pb.p[i]) > 0 and bool(f.B.any())]
    KR = torch.zeros(pb.k, pb.k, dtype=torch.float64)
    for i in live:
        f = pb.factors[i]
        Vi = orth(f.A.mT) if mode == "qr" else orth(f64(f.delta()).mT)
        KR += float(pb.p[i]) * (Vi @ Vi.mT)
    top, _ = top_eigenspace(KR, R)
    kappa = max((cond(pb.factors[i].A) for i in live), default=1.0)
    if mode == "svd":
        kappa *= max((cond(pb.factors[i].B) for i in live), default=1.0)
    n = n_dims(pb.d, pb.k, pb.ranks)
    assert (
        projector_distance(V, top)
        <= subspace_tol(pb.dtype, n=n, kappa=kappa, gap=state.gap) * (2 * R) ** 0.5
    )
    f = state_factors(state)  # the update's own factors, d-by-R and R-by-k
    assert f.B.shape == (pb.d, R)
    assert float((f64(f.delta()) - expected).norm()) <= tol


@given(problems(weights="random"), MODES, st.data())
def test_P11_right_side_exact_when_R_spans_the_row_union(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    A_union = int(
        torch.linalg.matrix_rank(torch.cat([f64(f.A) for f in pb.factors], dim=0))
    )  # qr mode: the row spaces of the A_i
    R = A_union if mode == "qr" else _row_union(pb)
    if R == 0:
        return
    state = glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode, side="right")
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=pb.cond, gap=state.gap, scale=pb.scale()
    )
    assert float((f64(state.delta()) - pb.mean()).norm()) <= tol


@given(problems(weights="random"), MODES, st.data())
def test_P11_right_side_gauge_invariance(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    union = min(_row_union(pb), pb.union_dim())
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")
    Gs, _ = data.draw(gauges_for(pb.ranks, kind="invertible"), label="gauges")
    gauged = [apply_gauge(f, G.to(pb.dtype)) for f, G in zip(pb.factors, Gs, strict=True)]
    s0 = unique_or_reject(
        lambda: glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode, side="right")
    )
    s1 = unique_or_reject(
        lambda: glora_aggregate(gauged, pb.weights, rank=R, gauge=mode, side="right")
    )
    # The transposed problem's left factor is A^T: its conditioning drives the basis error.
    kappa = max(max(cond(f.A), cond(h.A)) for f, h in zip(pb.factors, gauged, strict=True))
    if mode == "svd":
        kappa *= max(max(cond(f.B), cond(h.B)) for f, h in zip(pb.factors, gauged, strict=True))
    scale = sum(
        float(pb.p[i]) * max(float(f.B.norm() * f.A.norm()), float(h.B.norm() * h.A.norm()))
        for i, (f, h) in enumerate(zip(pb.factors, gauged, strict=True))
    )
    n = n_dims(pb.d, pb.k, pb.ranks)
    gap = min(s0.gap, s1.gap)
    assert (
        projector_distance(f64(s0.U), f64(s1.U))
        <= subspace_tol(pb.dtype, n=n, kappa=kappa, gap=gap) * (2 * R) ** 0.5
    )
    tol = state_tol(pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=kappa, gap=gap, scale=scale)
    assert float((f64(s0.delta()) - f64(s1.delta())).norm()) <= tol
    # The certificate is a function of the update: gauges leave it alone too.
    assert abs(s0.relative_residual - s1.relative_residual) <= tol / max(
        float(pb.mean().norm()), 1e-300
    ) + _cert_tol(pb, s0.relative_residual)


@given(
    st.sampled_from([torch.float64, torch.float32]).flatmap(
        lambda dt: problems(dtype=dt, weights="with_zeros", zero_updates=True, deficient=True)
    ),
    MODES,
    SIDES,
    st.data(),
)
def test_P12_certificate_equals_the_measured_error(pb, mode, side, data) -> None:  # type: ignore[no-untyped-def]
    union = min(_row_union(pb), pb.union_dim())
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")
    with warnings.catch_warnings():
        # float32's numerical rank may fall below the float64 reference's: the certificate
        # holds for the clamped state all the same.
        warnings.simplefilter("ignore", RankClampedWarning)
        state = unique_or_reject(
            lambda: glora_aggregate(pb.factors, pb.weights, rank=R, gauge=mode, side=side)
        )
    cert = state.certificate
    assert cert is not None
    rho = _measured(pb, state.delta())
    assert abs(cert.relative_residual - rho) <= _cert_tol(pb, rho)
    W = float(pb.mean().norm())
    assert abs(cert.mean_norm - W) <= product_tol(
        pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), scale=pb.scale()
    )
    assert state.relative_residual == cert.relative_residual
    # The public metric from factors agrees as well.
    assert abs(relative_error(state_factors(state), pb.factors, pb.weights) - rho) <= _cert_tol(
        pb, rho
    )


@given(problems(weights="random"), st.floats(0.02, 0.9), st.data())
def test_P13_auto_rank_is_the_smallest_certified_rank(pb, tol, data) -> None:  # type: ignore[no-untyped-def]
    if pb.union_dim() == 0:
        return
    side = data.draw(st.sampled_from(["left", "right"]), label="side")
    state = unique_or_reject(
        lambda: glora_aggregate(pb.factors, pb.weights, rank="auto", tol=tol, side=side)
    )
    assert state.rank_rule == "auto"
    assert state.tol == tol
    R = state.rank
    assert R <= sum(pb.ranks)
    ctol = _cert_tol(pb, tol)
    # Meets the tolerance (measured densely) ...
    assert _measured(pb, state.delta()) <= tol + ctol
    # ... and the next smaller rank of the same nested basis does not, ...
    W = pb.mean()
    if R >= 1:
        U = f64(state.U[:, : R - 1])
        below = (W - U @ (U.mT @ W)) if side == "left" else (W - (W @ U) @ U.mT)
        assert float(below.norm()) / float(W.norm()) > tol - ctol
    # ... nor does the operator itself at R - 1 (the top eigenvectors, not any nested basis).
    if R >= 2:
        smaller = unique_or_reject(
            lambda: glora_aggregate(pb.factors, pb.weights, rank=R - 1, side=side)
        )
        assert _measured(pb, smaller.delta()) > tol - ctol
    # The reported eigengap is the one at the chosen rank.
    lam = f64(state.eigvals)
    nxt = float(lam[R]) if lam.numel() > R else 0.0
    if R >= 1:
        assert state.gap == float(lam[R - 1]) - nxt


@given(problems(weights="random"), st.floats(0.02, 0.9))
def test_P13_auto_rank_with_auto_side_takes_the_smaller_rank(pb, tol) -> None:  # type: ignore[no-untyped-def]
    if pb.union_dim() == 0:
        return
    s = {
        side: unique_or_reject(
            lambda side=side: glora_aggregate(
                pb.factors, pb.weights, rank="auto", tol=tol, side=side
            )
        )
        for side in ("left", "right", "auto")
    }
    assert s["auto"].rank == min(s["left"].rank, s["right"].rank)


@given(problems(weights="random"), MODES, st.data())
def test_P14_auto_side_is_the_better_side(pb, mode, data) -> None:  # type: ignore[no-untyped-def]
    union = min(_row_union(pb), pb.union_dim())
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")

    def run(side: str, fs: list[LoRAFactors] = pb.factors):  # type: ignore[no-untyped-def]
        return unique_or_reject(
            lambda: glora_aggregate(fs, pb.weights, rank=R, gauge=mode, side=side)  # type: ignore[arg-type]
        )

    left, right, auto = run("left"), run("right"), run("auto")
    best = min(left.relative_residual, right.relative_residual)
    assert auto.relative_residual == best
    assert auto.side == ("left" if left.relative_residual <= right.relative_residual else "right")
    # The choice is gauge invariant where the two residuals are told apart.
    ctol = _cert_tol(pb, best)
    assume(abs(left.relative_residual - right.relative_residual) > 4 * ctol + 1e-6)
    Gs, _ = data.draw(gauges_for(pb.ranks, kind="invertible"), label="gauges")
    gauged = [apply_gauge(f, G.to(pb.dtype)) for f, G in zip(pb.factors, Gs, strict=True)]
    assert run("auto", gauged).side == auto.side


@given(problems(weights="random"), SIDES, st.sampled_from(["balanced", "left", "right"]), st.data())
def test_readout_of_either_side_is_best_and_nested(pb, side, split, data) -> None:  # type: ignore[no-untyped-def]
    union = min(_row_union(pb), pb.union_dim())
    if union == 0:
        return
    R = data.draw(st.integers(1, union), label="R")
    state = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R, side=side))
    X = f64(state.delta())
    tol = product_tol(pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), scale=float(X.norm()))
    outs = readouts(state, list(range(1, R + 1)), split=split)
    eye_tol = orthonormality_tol(pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks))
    for r, ro in enumerate(outs, start=1):
        assert ro.B.shape == (pb.d, r)
        assert ro.A.shape == (r, pb.k)
        err = float((f64(ro.delta()) - X).norm())
        assert abs(err - best_rank_error(X, r)) <= tol
        assert abs(err - eckart_young_error(state, r)) <= tol
        # "left" puts the singular values in B (A has orthonormal rows), "right" in A.
        rr = min(r, int(torch.linalg.matrix_rank(X)))
        eye = torch.eye(rr, dtype=torch.float64)
        if split == "left":
            assert float((f64(ro.A[:rr]) @ f64(ro.A[:rr]).mT - eye).norm()) <= eye_tol
        elif split == "right":
            assert float((f64(ro.B[:, :rr]).mT @ f64(ro.B[:, :rr]) - eye).norm()) <= eye_tol


def _trap(d: int = 96, n: int = 3, r: int = 4, seed: int = 0) -> list[LoRAFactors]:
    """The shared-init regime: A_i = A_0 + 1% noise, independent small B_i (issue 16)."""
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(r, d, generator=g, dtype=torch.float64)
    return [
        LoRAFactors(
            0.01 * torch.randn(d, r, generator=g, dtype=torch.float64),
            A0 + 0.01 * torch.randn(r, d, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("d", [96, 384])
def test_shared_init_trap_is_certified_and_avoided(d: int) -> None:
    clients = _trap(d)
    paper = glora_aggregate(clients, rank=4)
    auto = glora_aggregate(clients, rank=4, side="auto")
    # The paper's left consensus misses most of the mean here, and its certificate says so.
    assert paper.relative_residual > 0.3
    assert auto.side == "right"
    assert auto.relative_residual <= 0.05
    fed = relative_error(fedit(clients, None), clients)
    assert auto.relative_residual <= 2 * fed
    for st_ in (paper, auto):
        rho = relative_error(state_factors(st_), clients)
        assert abs(st_.relative_residual - rho) <= 1e-12 + 1e-7 * rho
    ranked = glora_aggregate(clients, rank="auto", tol=0.05, side="auto")
    assert ranked.rank == 4
    assert ranked.relative_residual <= 0.05


def test_max_residual_warns_with_the_value() -> None:
    clients = _trap()
    with pytest.warns(ResidualWarning, match=r"side=left, R=4: certified .* exceeds 1\.000e-01"):
        glora_aggregate(clients, rank=4, max_residual=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glora_aggregate(clients, rank=4, side="auto", max_residual=0.1)


def test_auto_side_emits_only_the_kept_sides_warnings() -> None:
    # Left: two equally weighted clients with orthogonal column spaces, so K is flat and the
    # gap at R=2 is zero (a warning). Right: both A_i share one 2-D row space, exact at R=2.
    g = torch.Generator().manual_seed(1)
    eye = torch.eye(10, dtype=torch.float64)
    A0 = torch.randn(2, 8, generator=g, dtype=torch.float64)
    clients = [
        LoRAFactors(eye[:, 2 * i : 2 * i + 2], torch.randn(2, 2, generator=g).double() @ A0)
        for i in range(2)
    ]
    with pytest.warns(ZeroEigengapWarning):
        glora_aggregate(clients, rank=2, side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = glora_aggregate(clients, rank=2, side="auto")
    assert state.side == "right"
    assert state.relative_residual <= 1e-12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "side": "top"}, "side must be"),
        ({"rank": 2, "tol": 0.1}, "tol is only used"),
        ({"rank": "auto"}, "tol must be a float"),
        ({"rank": "auto", "tol": 1.5}, "tol must be a float"),
        ({"rank": "auto", "tol": float("nan")}, "tol must be a float"),
        ({"rank": 2, "max_residual": -1.0}, "max_residual must be"),
        ({"rank": "fast"}, "rank must be a positive int"),
    ],
)
def test_bad_side_rank_and_tolerance_are_typed_errors(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GloraError, match=match):
        glora_aggregate(_trap(), **kwargs)


def test_auto_rank_needs_the_exact_consensus() -> None:
    from glora_math import Sketch

    with pytest.raises(GloraError, match="exact consensus"):
        glora_aggregate(_trap(), rank="auto", tol=0.1, sketch=Sketch())


def test_registry_operators_certify_and_take_options() -> None:
    clients = _trap()
    for name in ("glora", "glora_auto", "glora_auto_rank"):
        res = get_operator(name)(clients, None, rank=4)
        assert res.certificate is not None
        rho = relative_error(res.update, clients)
        assert abs(res.certificate.relative_residual - rho) <= 1e-12 + 1e-7 * rho
    res = get_operator("glora_auto_rank")(clients, None, rank=4, options={"tol": 0.3})
    assert res.certificate is not None
    assert res.certificate.relative_residual <= 0.3
    with pytest.raises(GloraError, match="no option"):
        get_operator("fedit")(clients, None, options={"tol": 0.3})


def test_a_certificate_beyond_float32_is_computed_at_unit_scale() -> None:
    # Factors at 1e18 in float32: squares of the certificate's products are beyond float32;
    # at unit scale (exact powers of 2) the certificate is the unit problem's. (At 1e20 the
    # update itself is beyond float32: a typed overflow, test_hostile.)
    unit = [LoRAFactors(f.B.float(), f.A.float()) for f in _trap()]
    big = [LoRAFactors(f.B * 1e18, f.A * 1e18) for f in unit]
    got, ref = glora_aggregate(big, rank=4, side="auto"), glora_aggregate(unit, rank=4, side="auto")
    assert got.side == ref.side
    assert got.relative_residual == pytest.approx(ref.relative_residual, rel=1e-4)


def test_auto_side_reemits_the_kept_sides_warning_once_at_the_caller() -> None:
    # Right: both A_i share one 2-D row space, so R=3 is clamped (a warning) and exact. Left:
    # independent column spaces, R=3 fits and misses part of the mean.
    g = torch.Generator().manual_seed(2)
    A0 = torch.randn(2, 8, generator=g, dtype=torch.float64)
    clients = [
        LoRAFactors(
            torch.randn(10, 2, generator=g).double(), torch.randn(2, 2, generator=g).double() @ A0
        )
        for _ in range(2)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = glora_aggregate(clients, rank=3, side="auto")
    assert state.side == "right"
    assert [w.category for w in caught] == [RankClampedWarning]
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add a stack frame
        assert caught[0].filename == __file__


def test_exact_ties_go_left() -> None:
    # B_i = A_i^T: the left and the right problems are the same numbers.
    g = torch.Generator().manual_seed(4)
    clients = []
    for _ in range(3):
        X = torch.randn(6, 2, generator=g, dtype=torch.float64)
        clients.append(LoRAFactors(X, X.mT.contiguous()))
    left = glora_aggregate(clients, rank=2, side="left")
    right = glora_aggregate(clients, rank=2, side="right")
    assert left.relative_residual == right.relative_residual
    assert glora_aggregate(clients, rank=2, side="auto").side == "left"


def test_zero_update_clients_do_not_dilute_the_right_consensus() -> None:
    # LoRA's start: B = 0. Seen from the right, such a client's A_i carries no update.
    g = torch.Generator().manual_seed(0)
    a = LoRAFactors(
        torch.randn(10, 2, generator=g).double(), torch.randn(2, 8, generator=g).double()
    )
    z = LoRAFactors(torch.zeros(10, 2).double(), torch.randn(2, 8, generator=g).double())
    for side in ("left", "right"):
        assert glora_aggregate([a, z], [1.0, 2.0], rank=2, side=side).relative_residual < 1e-12
    ranked = glora_aggregate([a, z], [1.0, 2.0], rank="auto", tol=0.01, side="right")
    assert ranked.rank == 2


def test_right_side_readouts_come_back_in_the_clients_half_dtype() -> None:
    clients = [LoRAFactors(f.B.half(), f.A.half()) for f in _trap()]
    state = glora_aggregate(clients, rank=4, side="right")
    ro = readouts(state, [2, 4])
    assert all(f.B.dtype == torch.float16 and f.A.dtype == torch.float16 for f in ro)


@pytest.mark.filterwarnings("ignore::glora_math.ZeroEigengapWarning")
def test_unreachable_tolerance_warns_with_the_reached_residual() -> None:
    clients = [LoRAFactors(f.B.float(), f.A.float()) for f in _trap()]
    with pytest.warns(ResidualWarning, match="could not meet tol=1.000e-12"):
        state = glora_aggregate(clients, rank="auto", tol=1e-12, side="auto")
    assert state.rank == 12  # the cap: the clients' total rank
    assert state.relative_residual > 1e-12


def test_certify_false_skips_the_certificate_and_refuses_what_needs_it() -> None:
    clients = _trap()
    state = glora_aggregate(clients, rank=4, certify=False)
    assert state.certificate is None
    assert state.relative_residual != state.relative_residual  # NaN
    same = glora_aggregate(clients, rank=4)
    assert torch.equal(state.U, same.U)
    assert torch.equal(state.S, same.S)
    for kwargs in ({"side": "auto"}, {"max_residual": 0.5}):
        with pytest.raises(GloraError, match="decide by the certificate"):
            glora_aggregate(clients, rank=4, certify=False, **kwargs)
    with pytest.raises(GloraError, match="decide by the certificate"):
        glora_aggregate(clients, rank="auto", tol=0.1, certify=False)


def test_the_sketch_is_reachable_through_the_registry_options() -> None:
    from glora_math import Sketch

    g = torch.Generator().manual_seed(7)
    clients = [
        LoRAFactors(torch.randn(64, 3, generator=g), torch.randn(3, 48, generator=g))
        for _ in range(6)
    ]
    opts = {"sketch": 1.0, "oversample": 4.0, "power_iters": 1.0, "sketch_seed": 3.0}
    want = glora_aggregate(clients, rank=4, sketch=Sketch(oversample=4, power_iters=1, seed=3))
    for name in ("glora", "glora_auto"):
        res = get_operator(name)(clients, None, rank=4, options=opts)
        got = res.update.B @ res.update.A
        if name == "glora":  # the same subspace and update as the core's sketched call
            assert torch.allclose(got, want.delta(), atol=1e-5)
        assert res.certificate is not None
    grouped = get_operator("glora").aggregate_group([clients, clients], None, rank=4, options=opts)
    assert torch.allclose(grouped[0].update.B @ grouped[0].update.A, want.delta(), atol=1e-4)
    with pytest.raises(GloraError, match="whole number"):
        get_operator("glora")(clients, None, rank=4, options={"sketch": 1.0, "oversample": 2.5})
