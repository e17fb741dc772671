"""Exactness identities of the baselines (SPEC P7, P9, P10) and operator state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from glora_math import LoRAFactors, random_orthogonal
from glora_math import baselines as bl
from glora_math.errors import ProtocolError
from glora_math.operators import OperatorState, get_operator, list_operators
from glora_math.tolerances import orthonormality_tol, product_tol

from .helpers import cond, f64, n_dims
from .strategies import SEEDS, conditioned_factors, gaussian_clients, problems


def _tol(pb, kappa: float | None = None) -> float:  # type: ignore[no-untyped-def]
    return product_tol(
        pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), scale=pb.scale(), kappa=kappa or pb.cond
    )


@given(problems(equal_ranks=True, weights="random"))
def test_P7_factor_averaging_error_identity(pb) -> None:  # type: ignore[no-untyped-def]
    # sum p_i B_i A_i - B_bar A_bar = sum p_i (B_i - B_bar)(A_i - A_bar) when sum p_i = 1.
    g = bl.fedit(pb.factors, pb.weights)
    lhs = pb.mean() - f64(g.delta())
    Bb, Ab = f64(g.B), f64(g.A)
    rhs = sum(
        (float(pb.p[i]) * (f64(f.B) - Bb) @ (f64(f.A) - Ab) for i, f in enumerate(pb.factors)),
        start=torch.zeros(pb.d, pb.k, dtype=torch.float64),
    )
    assert float((lhs - rhs).norm()) <= _tol(pb)


@given(problems(weights="with_zeros"))
def test_P10_stacking_is_exact(pb) -> None:  # type: ignore[no-untyped-def]
    s = bl.flora_stack(pb.factors, pb.weights)
    assert s.rank == sum(pb.ranks)
    assert float((f64(s.delta()) - pb.mean()).norm()) <= _tol(pb)


@given(problems(equal_ranks=True, weights="random"))
def test_P10_shared_A_averaging_is_exact_and_requires_a_shared_A(pb) -> None:  # type: ignore[no-untyped-def]
    A = pb.factors[0].A
    shared = [LoRAFactors(f.B, A) for f in pb.factors]
    g = bl.ffa_lora(shared, pb.weights)
    W = sum(
        (float(pb.p[i]) * f64(f.delta()) for i, f in enumerate(shared)),
        start=torch.zeros(pb.d, pb.k, dtype=torch.float64),
    )
    assert float((f64(g.delta()) - W).norm()) <= _tol(pb)
    if pb.n > 1:
        with pytest.raises(ProtocolError, match="client 1: A differs"):
            bl.ffa_lora([shared[0], pb.factors[1]] if pb.factors[1].A is not A else shared)


@given(problems(equal_ranks=True, weights="random"), st.integers(1, 4))
def test_P10_fedex_residual_in_the_base_weight_layout(pb, batch) -> None:  # type: ignore[no-untyped-def]
    # nn.Linear(in=k, out=d): y = x W0^T with W0 of shape (d, k); the adapter adds x (B A)^T.
    g, residual = bl.fedex_lora(pb.factors, pb.weights, layout="out_in")
    x = torch.randn(
        batch, pb.k, dtype=torch.float64, generator=torch.Generator().manual_seed(pb.seed)
    )
    W0 = torch.randn(pb.d, pb.k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = x @ (W0 + pb.mean()).mT  # base + the exact mean update
    tol = _tol(pb) * float(x.norm())

    def forward_error(res: torch.Tensor) -> float:
        lin = torch.nn.Linear(pb.k, pb.d, bias=False, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(W0)
            lin.weight += res  # the fold FedEx-LoRA prescribes
        with torch.no_grad():
            return float((lin(x) + x @ f64(g.delta()).mT - expected).norm())

    assert forward_error(f64(residual)) <= tol
    # The transposed residual (what FedEx's public code adds) must fail this check: it does not
    # fit an nn.Linear weight unless d == k, and when it fits its error is ||x (R - R^T)||.
    _, transposed = bl.fedex_lora(pb.factors, pb.weights, layout="in_out")
    assert torch.equal(transposed, residual.mT)
    if pb.d != pb.k:
        with pytest.raises(RuntimeError):
            forward_error(f64(transposed))
    else:
        visible = float((x @ (f64(residual) - f64(residual).mT)).norm())
        if visible > 2 * tol:
            assert forward_error(f64(transposed)) > tol


@given(problems(weights="random"), st.data())
def test_flexlora_from_factors_equals_the_dense_truncated_svd(pb, data) -> None:  # type: ignore[no-untyped-def]
    want = data.draw(
        st.lists(st.integers(1, min(pb.d, pb.k)), min_size=pb.n, max_size=pb.n), label="ranks"
    )
    outs = bl.flexlora(pb.factors, pb.weights, client_ranks=want)
    W = pb.mean()
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    for r, f in zip(want, outs, strict=True):
        dense = (U[:, :r] * s[:r]) @ Vh[:r]
        # Truncations are unique up to rounding when s_r > s_{r+1}; compare the products.
        gap = float(s[r - 1] - s[r]) / float(s[0]) if r < s.numel() and float(s[0]) > 0 else 1.0
        from glora_math.tolerances import aggregate_tol

        tol = aggregate_tol(
            pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), kappa=pb.cond, gap=gap, scale=pb.scale()
        )
        assert f.rank == r
        assert float((f64(f.delta()) - dense).norm()) <= tol


@given(problems(equal_ranks=True), SEEDS, st.sampled_from(["A", "B"]))
def test_P9_procrustes_preserves_products_and_minimises(pb, seed, side) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    r = pb.ranks[0]
    ref = conditioned_factors(pb.d, pb.k, r, cond=3.0, generator=g, dtype=pb.dtype)
    f = pb.factors[0]
    R = bl.fedrot_rotation(f, ref, align=side)
    eye = torch.eye(r, dtype=torch.float64)
    n = n_dims(pb.d, pb.k, pb.ranks)
    assert float((f64(R).mT @ f64(R) - eye).norm()) <= product_tol(pb.dtype, n=n, scale=1.0)
    aligned = LoRAFactors(f.B @ R, R.mT @ f.A)
    scale = float(f.B.norm() * f.A.norm())
    assert float((f64(aligned.delta()) - f64(f.delta())).norm()) <= product_tol(
        pb.dtype, n=n, scale=scale, kappa=pb.cond
    )

    def misfit(Q: torch.Tensor) -> float:
        if side == "A":
            return float((Q.mT @ f.A - ref.A).norm())
        return float((f.B @ Q - ref.B).norm())

    best = misfit(R)
    slack = product_tol(pb.dtype, n=n, scale=float(f.A.norm() + f.B.norm() + 2.0))
    for _ in range(8):
        assert best <= misfit(random_orthogonal(r, generator=g).to(pb.dtype)) + slack
    assert best <= misfit(eye.to(pb.dtype)) + slack


@given(problems(equal_ranks=True), SEEDS, st.floats(0.0, 1.0))
def test_P9_soft_alignment_bound(pb, seed, lam) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    r = pb.ranks[0]
    ref = conditioned_factors(pb.d, pb.k, r, cond=3.0, generator=g, dtype=pb.dtype)
    f = pb.factors[0]
    Rstar = bl.procrustes(f.A @ ref.A.mT, special=True)
    Rsoft = bl.fedrot_rotation(f, ref, align="A", lam=lam) if lam < 1.0 else Rstar
    eye = torch.eye(r, dtype=f.A.dtype)
    assert float(torch.linalg.det(Rsoft)) > 0  # in SO(r)
    tol = product_tol(pb.dtype, n=2 * r, scale=1.0, kappa=cond(f.A @ ref.A.mT))
    assert float((Rsoft - eye).norm()) <= 2 * lam * float((Rstar - eye).norm()) + tol


@given(problems(equal_ranks=True, weights="random"), st.integers(0, 5))
def test_flora_na_never_does_worse_than_fedit(pb, steps) -> None:  # type: ignore[no-untyped-def]
    W = pb.mean()
    base = float((f64(bl.fedit(pb.factors, pb.weights).delta()) - W).norm())
    est = float((f64(bl.flora_na(pb.factors, pb.weights, steps=steps).delta()) - W).norm())
    assert est <= base + _tol(pb, kappa=pb.cond**2)


@given(problems(weights="random"), st.booleans())
def test_hetlora_pads_averages_and_truncates(pb, norm_weighted) -> None:  # type: ignore[no-untyped-def]
    # Default: the public zero-padding codes' plain weights p_i; norm_weighted: the paper's
    # p_i ||B_i A_i|| rule.
    glob, per = bl.hetlora(pb.factors, pb.weights, norm_weighted=norm_weighted)
    rmax = max(pb.ranks)
    assert glob.rank == rmax
    for f, out in zip(pb.factors, per, strict=True):
        assert out.rank == f.rank
        assert torch.equal(out.B, glob.B[:, : f.rank])
    norms = torch.tensor([float(f64(f.delta()).norm()) for f in pb.factors], dtype=torch.float64)
    norms = norms * pb.p
    w = norms / norms.sum() if norm_weighted and float(norms.sum()) > 0 else pb.p
    B = sum(
        (
            float(w[i])
            * torch.cat([f64(f.B), torch.zeros(pb.d, rmax - f.rank, dtype=torch.float64)], 1)
            for i, f in enumerate(pb.factors)
        ),
        start=torch.zeros(pb.d, rmax, dtype=torch.float64),
    )
    assert float((f64(glob.B) - B).norm()) <= _tol(pb)


def test_fedrot_alternates_and_carries_its_reference() -> None:
    op = get_operator("fedrot_lora")
    clients = gaussian_clients(3, 7, 2, 5, generator=torch.Generator().manual_seed(3))
    first = op(clients)
    assert first.state is not None
    assert first.state.round_index == 2
    second = op(clients, state=first.state)  # round 2 aligns A, as the published code
    assert second.state is not None
    assert second.state.round_index == 3
    ref_B, ref_A = first.state.tensors["B_ref"], first.state.tensors["A_ref"]
    ref = LoRAFactors(ref_B, ref_A)
    assert [bl.aligned_side(t) for t in (2, 3, 4)] == ["A", "B", "A"]
    assert [bl.aligned_side(t, "B") for t in (2, 3, 4)] == ["B", "A", "B"]
    glob, aligned = bl.fedrot_lora(clients, reference=ref, round_index=2)
    # The published rule from its formula: R_i = polar(A_i A_ref^T), A_i <- R_i^T A_i.
    for c, a in zip(clients, aligned, strict=True):
        U, _, Vh = torch.linalg.svd(c.A @ ref_A.mT)
        R = U @ Vh
        assert torch.allclose(a.A, R.mT @ c.A, atol=1e-12)
        slack = product_tol(torch.float64, n=7 + 2, scale=float(c.A.norm() + ref_A.norm()))
        assert float((a.A - ref_A).norm()) <= float((c.A - ref_A).norm()) + slack
    assert torch.allclose(second.update.A, glob.A, atol=1e-12)
    # The other order, through the registry option: B first.
    other = op(clients, state=first.state, options={"first_aligned_b": 1.0})
    _, aligned = bl.fedrot_lora(clients, reference=ref, round_index=2, first="B")
    assert torch.allclose(other.update.B, sum(a.B for a in aligned) / 3, atol=1e-12)
    for c, a in zip(clients, aligned, strict=True):
        slack = product_tol(torch.float64, n=7 + 2, scale=float(c.B.norm() + ref_B.norm()))
        assert float((a.B - ref_B).norm()) <= float((c.B - ref_B).norm()) + slack
        assert torch.allclose(
            a.delta(),
            c.delta(),
            rtol=0,
            atol=product_tol(torch.float64, n=14, scale=float(c.B.norm() * c.A.norm())),
        )


def test_operator_state_round_trips_through_flat_tensors() -> None:
    st0 = OperatorState(5, {"B_ref": torch.randn(4, 2), "A_ref": torch.randn(2, 3)})
    flat = st0.to_tensors()
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    back = OperatorState.from_tensors(flat)
    assert back.round_index == 5
    assert set(back.tensors) == {"B_ref", "A_ref"}
    assert all(torch.equal(back.tensors[k], st0.tensors[k]) for k in st0.tensors)


def test_registry_metadata() -> None:
    names = list_operators()
    assert len(names) == len(set(names)) >= 14
    for n in names:
        op = get_operator(n)
        assert op.paper, n
        c = op.communication(d=64, k=32, client_rank=4, rank=8, n_clients=10)
        assert c.up > 0
        assert c.down > 0
    with pytest.raises(KeyError, match="unknown operator 'nope'"):
        get_operator("nope")
    assert get_operator("flora").communication(64, 32, 4, n_clients=10).down == 10 * 4 * 96
    assert get_operator("fedex_lora").communication(64, 32, 4).down == 4 * 96 + 64 * 32


@given(problems(weights="random", equal_ranks=True))
def test_flexlora_sends_the_published_factors_u_s_and_v(pb) -> None:  # type: ignore[no-untyped-def]
    # FlexLoRA's code: lora_B = U_r S_r, lora_A = V_r^T (orthonormal rows); the balanced option
    # shares sqrt(S). The products are the same best rank-r approximation of the mean.
    op = get_operator("flexlora")
    pub = op(pb.factors, pb.weights)
    bal = op(pb.factors, pb.weights, options={"balanced_split": 1.0})
    s0 = float(torch.linalg.svdvals(pb.mean())[0])
    n = n_dims(pb.d, pb.k, pb.ranks)
    for f, g in zip(pub.client_factors or [], bal.client_factors or [], strict=True):
        A = f64(f.A)[f64(f.A).norm(dim=1) > 0]  # rows beyond the mean's rank are zero padding
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        assert float((A @ A.mT - eye).norm()) <= orthonormality_tol(pb.dtype, n=n)
        assert float((f64(f.delta()) - f64(g.delta())).norm()) <= _tol(pb)
        G = f64(g.B).mT @ f64(g.B) - f64(g.A) @ f64(g.A).mT  # balanced: B^T B = A A^T = S
        assert float(G.norm()) <= product_tol(pb.dtype, n=n, scale=s0)


@given(problems(weights="random", equal_ranks=True), st.floats(0.0, 1.0))
def test_lora_fair_discrepancy_gradient_and_descent_from_factors(pb, lam) -> None:  # type: ignore[no-untyped-def]
    # The factor formulas of the discrepancy and its gradient equal the dense definitions
    # (autograd on d-by-k matrices), and the correction never makes it worse than FedIT's.
    fs = bl._prepare(pb.factors, pb.weights)[2]
    p = pb.p.to(fs[0].B.dtype)
    B_bar = sum((float(p[i]) * f.B for i, f in enumerate(fs)), torch.zeros_like(fs[0].B))
    A_bar = sum((float(p[i]) * f.A for i, f in enumerate(fs)), torch.zeros_like(fs[0].A))
    W = pb.mean()
    assume(float(W.norm()) > 0 and float((B_bar @ A_bar).norm()) > 0)
    M = f64(W) @ f64(A_bar).mT
    prob = bl.FairProblem(M, f64(A_bar) @ f64(A_bar).mT, f64(B_bar), float(W.norm()), lam)
    g = torch.Generator().manual_seed(pb.seed)
    dB = 0.1 * torch.randn(B_bar.shape, generator=g, dtype=torch.float64) * float(B_bar.norm())
    x = dB.clone().requires_grad_()
    Y = (f64(B_bar) + x) @ f64(A_bar)
    dense = 1 - (W * Y).sum() / (W.norm() * Y.norm()) + lam * (x * x).sum() / (B_bar.norm() ** 2)
    dense.backward()  # type: ignore[no-untyped-call]
    value, grad = prob.value_and_grad(dB)
    n = n_dims(pb.d, pb.k, pb.ranks)
    assert abs(value - float(dense.detach())) <= product_tol(torch.float64, n=n, scale=2.0 + lam)
    assert x.grad is not None
    scale = float(x.grad.norm()) + float(M.norm()) / (float(W.norm()) * float(Y.detach().norm()))
    assert float((grad - x.grad).norm()) <= product_tol(torch.float64, n=n, scale=scale)
    out, before, after = bl.lora_fair(pb.factors, pb.weights, lam=lam)
    assert after <= before
    cos = float((f64(out.delta()) * W).sum() / (f64(out.delta()).norm() * W.norm()))
    fedit = f64(B_bar @ A_bar)
    cos0 = float((fedit * W).sum() / (fedit.norm() * W.norm()))
    assert 1 - cos <= 1 - cos0 + product_tol(pb.dtype, n=n, scale=2.0)
    # Clients keep A_bar (FedIT's, to rounding of the weighted sum).
    err_a = float((f64(out.A) - f64(A_bar)).norm())
    assert err_a <= product_tol(pb.dtype, n=n, scale=float(f64(A_bar).norm()) + 1.0)
