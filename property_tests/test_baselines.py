"""Tests of ``glora_math.baselines``.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``baselines.py`` that survived the property suite.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from glora_math import LoRAFactors, ShapeMismatchError
from glora_math import baselines as bl
from glora_math.errors import ProtocolError
from glora_math.linalg import lowrank_fro_norm
from glora_math.metrics import mean_update
from glora_math.testing.helpers import best_rank_error, f64, n_dims
from glora_math.testing.strategies import gaussian_clients
from glora_math.tolerances import orthonormality_tol, product_tol, storage_tol


def _clients(dtype: torch.dtype = torch.float64) -> list[LoRAFactors]:
    g = torch.Generator().manual_seed(0)
    fs = gaussian_clients(3, 8, [1, 2, 3], 6, generator=g)
    return [LoRAFactors(f.B.to(dtype), f.A.to(dtype)) for f in fs]


def _mean(fs: list[LoRAFactors]) -> torch.Tensor:
    return sum((f64(f.B) @ f64(f.A) for f in fs), torch.zeros(8, 6, dtype=torch.float64)) / len(fs)


def test_flexlora_gives_each_client_its_own_rank_by_default() -> None:
    # client_ranks=None: client i gets the best rank-r_i approximation of the mean (Eckart-Young),
    # with every singular value in B and orthonormal rows in A (split="left", the published code).
    fs = _clients()
    W = _mean(fs)
    s0 = float(torch.linalg.svdvals(W)[0])
    n = n_dims(8, 6, [f.rank for f in fs])
    outs = bl.flexlora(fs)
    assert [o.rank for o in outs] == [f.rank for f in fs]
    for o, f in zip(outs, fs, strict=True):
        err = float(torch.linalg.matrix_norm(f64(o.B) @ f64(o.A) - W))
        assert abs(err - best_rank_error(W, f.rank)) <= product_tol(torch.float64, n=n, scale=s0)
        A = f64(o.A)
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        assert float(torch.linalg.matrix_norm(A @ A.mT - eye)) <= orthonormality_tol(
            torch.float64, n=n
        )


def test_flexlora_returns_the_clients_dtype() -> None:
    # Half-precision clients are computed in float32 and get factors in their own dtype back.
    for dtype in (torch.float16, torch.bfloat16):
        fs = _clients(dtype)
        outs = bl.flexlora(fs, client_ranks=[2, 2, 2])
        assert all(o.B.dtype == dtype and o.A.dtype == dtype for o in outs)
        W = _mean([LoRAFactors(f64(f.B), f64(f.A)) for f in fs])
        err = float(torch.linalg.matrix_norm(f64(outs[0].B) @ f64(outs[0].A) - W))
        scale = float(torch.linalg.matrix_norm(W))
        # Computed in float32 (product_tol), then rounded to the half dtype (storage_tol).
        tol = product_tol(dtype, n=n_dims(8, 6, [1, 2, 3]), scale=scale)
        assert abs(err - best_rank_error(W, 2)) <= tol + storage_tol(dtype, scale=scale)


def _equal_rank_clients(dtype: torch.dtype = torch.float64) -> list[LoRAFactors]:
    # Three rank-2 clients with one shared A (FFA-LoRA's and RoLoRA's protocol).
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 6, generator=g, dtype=torch.float64)
    return [
        LoRAFactors(torch.randn(8, 2, generator=g, dtype=torch.float64).to(dtype), A.to(dtype))
        for _ in range(3)
    ]


_WEIGHTS = [1.0, 2.0, 5.0]  # p = (1/8, 2/8, 5/8): exact in binary


def _p() -> list[float]:
    return [w / sum(_WEIGHTS) for w in _WEIGHTS]


def test_equal_rank_methods_name_themselves_when_ranks_differ() -> None:
    g = torch.Generator().manual_seed(2)
    fs = gaussian_clients(3, 8, [2, 2, 3], 6, generator=g)
    calls = {
        "FedIT": lambda: bl.fedit(fs),
        "FFA-LoRA": lambda: bl.ffa_lora(fs),
        "RoLoRA": lambda: bl.rolora(fs, trained="B"),
        "FedSA-LoRA": lambda: bl.fedsa_lora(fs),
        "FedEx-LoRA": lambda: bl.fedex_lora(fs),
        "FedRot-LoRA": lambda: bl.fedrot_lora(fs, reference=None, round_index=1),
        "LoRA-FAIR": lambda: bl.lora_fair(fs),
        "FLoRA-NA": lambda: bl.flora_na(fs),
    }
    for method, call in calls.items():
        with pytest.raises(ShapeMismatchError) as info:
            call()
        assert info.value.client == 2
        assert info.value.message == f"{method} needs equal ranks: rank 3 differs from client 0's 2"


def test_fedsa_lora_shares_the_weighted_mean_of_the_as() -> None:
    g = torch.Generator().manual_seed(3)
    fs = gaussian_clients(3, 8, 2, 6, generator=g)
    A_bar, per = bl.fedsa_lora(fs, _WEIGHTS)
    ref = sum(
        (p * f.A for p, f in zip(_p(), fs, strict=True)), torch.zeros(2, 6, dtype=torch.float64)
    )
    scale = sum(p * float(torch.linalg.matrix_norm(f.A)) for p, f in zip(_p(), fs, strict=True))
    assert float(torch.linalg.matrix_norm(A_bar - ref)) <= product_tol(
        torch.float64, n=3, scale=scale
    )
    for f, o in zip(fs, per, strict=True):
        assert torch.equal(o.B, f.B)
        assert torch.equal(o.A, A_bar)


def test_hetlora_averages_the_padded_factors_with_the_plain_weights_by_default() -> None:
    # The default (the public codes): sum_i p_i pad(B_i), sum_i p_i pad(A_i), not weighted by
    # the update norms (which differ here).
    g = torch.Generator().manual_seed(4)
    fs = gaussian_clients(3, 8, [1, 2, 3], 6, generator=g)
    fs[2] = LoRAFactors(fs[2].B * 10.0, fs[2].A)
    glob, per = bl.hetlora(fs, _WEIGHTS)
    B_ref = torch.zeros(8, 3, dtype=torch.float64)
    A_ref = torch.zeros(3, 6, dtype=torch.float64)
    scale_b = scale_a = 0.0
    for p, f in zip(_p(), fs, strict=True):
        B_ref[:, : f.rank] += p * f.B
        A_ref[: f.rank] += p * f.A
        scale_b += p * float(torch.linalg.matrix_norm(f.B))
        scale_a += p * float(torch.linalg.matrix_norm(f.A))
    assert float(torch.linalg.matrix_norm(glob.B - B_ref)) <= product_tol(
        torch.float64, n=3, scale=scale_b
    )
    assert float(torch.linalg.matrix_norm(glob.A - A_ref)) <= product_tol(
        torch.float64, n=3, scale=scale_a
    )
    assert [o.rank for o in per] == [1, 2, 3]


def test_hetlora_truncates_to_the_requested_client_ranks() -> None:
    g = torch.Generator().manual_seed(5)
    fs = gaussian_clients(3, 8, [1, 2, 3], 6, generator=g)
    glob, per = bl.hetlora(fs, client_ranks=[3, 1, 2])
    assert [o.rank for o in per] == [3, 1, 2]
    for o in per:
        assert torch.equal(o.B, glob.B[:, : o.rank])
        assert torch.equal(o.A, glob.A[: o.rank])


def test_norm_weighted_hetlora_of_zero_updates_falls_back_to_the_plain_weights() -> None:
    # Every B_i = 0: every update norm is 0, the norm weights are undefined, and the plain
    # weights are used (documented in the code); the result is finite.
    g = torch.Generator().manual_seed(6)
    fs = [
        LoRAFactors(torch.zeros_like(f.B), f.A) for f in gaussian_clients(3, 8, 2, 6, generator=g)
    ]
    glob, _ = bl.hetlora(fs, _WEIGHTS, norm_weighted=True)
    plain, _ = bl.hetlora(fs, _WEIGHTS)
    assert torch.equal(glob.A, plain.A)
    assert torch.equal(glob.B, plain.B)


def test_every_baseline_returns_factors_in_the_clients_dtype() -> None:
    # Half-precision clients are computed in float32 (the working dtype) and cast back.
    for dtype in (torch.float16, torch.bfloat16):
        fs = _equal_rank_clients(dtype)
        outs: dict[str, list[LoRAFactors]] = {
            "fedit": [bl.fedit(fs)],
            "ffa_lora": [bl.ffa_lora(fs)],
            "rolora": [bl.rolora(fs, trained="B")],
            "fedex_lora": [bl.fedex_lora(fs)[0]],
            "flora_stack": [bl.flora_stack(fs)],
            "flexlora": bl.flexlora(fs),
            "fedrot_lora": [bl.fedrot_lora(fs, reference=None, round_index=1)[0]],
            "lora_fair": [bl.lora_fair(fs, steps=2)[0]],
            "flora_na": [bl.flora_na(fs, steps=1)],
        }
        A_bar, per = bl.fedsa_lora(fs)
        outs["fedsa_lora"] = [LoRAFactors(fs[0].B, A_bar), *per]
        glob, per = bl.hetlora(fs, client_ranks=[1, 2, 2])
        outs["hetlora"] = [glob, *per]
        for name, fl in outs.items():
            for o in fl:
                assert o.B.dtype == dtype, name
                assert o.A.dtype == dtype, name


def test_fedex_lora_returns_the_residual_in_nn_linears_layout_by_default() -> None:
    # layout="out_in" (torch.nn.Linear) by default: the residual W_bar - B_bar A_bar is d by k.
    fs = _equal_rank_clients()
    fs = [LoRAFactors(f.B, f.A * (i + 1)) for i, f in enumerate(fs)]  # the A's differ
    (avg, residual) = bl.fedex_lora(fs, _WEIGHTS)
    W = sum(
        (p * (f.B @ f.A) for p, f in zip(_p(), fs, strict=True)),
        torch.zeros(8, 6, dtype=torch.float64),
    )
    ref = W - avg.B @ avg.A
    scale = sum(
        p * float(torch.linalg.matrix_norm(f.B) * torch.linalg.matrix_norm(f.A))
        for p, f in zip(_p(), fs, strict=True)
    )
    assert residual.shape == (8, 6)
    n = n_dims(8, 6, [2, 2, 2])
    assert float(torch.linalg.matrix_norm(residual - ref)) <= product_tol(
        torch.float64, n=n, scale=2.0 * scale
    )


def test_flora_na_takes_three_steps_by_default() -> None:
    # The signature's default: the same as steps=3 (deterministic), and not the same as 4 steps.
    g = torch.Generator().manual_seed(7)
    fs = gaussian_clients(3, 8, 2, 6, generator=g)
    default = bl.flora_na(fs, _WEIGHTS)
    three = bl.flora_na(fs, _WEIGHTS, steps=3)
    four = bl.flora_na(fs, _WEIGHTS, steps=4)
    assert torch.equal(default.B, three.B)
    assert torch.equal(default.A, three.A)
    assert not torch.equal(default.B, four.B)


def test_fedex_lora_in_out_layout_is_the_transposed_residual() -> None:
    # layout="in_out" (GPT-2's Conv1D): the same residual, k by d; other layouts are refused.
    fs = _equal_rank_clients()
    fs = [LoRAFactors(f.B, f.A * (i + 1)) for i, f in enumerate(fs)]
    avg, residual = bl.fedex_lora(fs, _WEIGHTS, layout="out_in")
    avg_t, residual_t = bl.fedex_lora(fs, _WEIGHTS, layout="in_out")
    assert torch.equal(avg_t.B, avg.B)
    assert torch.equal(avg_t.A, avg.A)
    assert torch.equal(residual_t, residual.mT)
    with pytest.raises(ValueError, match="unknown layout 'IN_OUT'; expected 'out_in' or 'in_out'"):
        bl.fedex_lora(fs, layout="IN_OUT")  # type: ignore[arg-type]


def test_equal_weights_by_default_are_exactly_one_over_n() -> None:
    # weights=None means p_i = 1/N in the working dtype (float64 here): the same bits as the
    # explicit equal weights, not a float32 rounding of 1/3.
    g = torch.Generator().manual_seed(8)
    fs = gaussian_clients(3, 8, 2, 6, generator=g)
    default, explicit = bl.fedit(fs), bl.fedit(fs, [1.0, 1.0, 1.0])
    assert torch.equal(default.B, explicit.B)
    assert torch.equal(default.A, explicit.A)


def test_rolora_names_the_frozen_factor_and_the_client_that_changed_it() -> None:
    fs = _equal_rank_clients()
    moved_a = [fs[0], fs[1], LoRAFactors(fs[2].B, fs[2].A + 1.0)]
    with pytest.raises(ProtocolError) as info:
        bl.rolora(moved_a, trained="B")
    assert info.value.client == 2
    assert info.value.message == "A differs from client 0's; this RoLoRA round freezes A"
    # Training A: the B's are the frozen, shared factor.
    B = fs[0].B
    g = torch.Generator().manual_seed(9)
    As = [torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    moved_b = [LoRAFactors(B, As[0]), LoRAFactors(B + 1.0, As[1]), LoRAFactors(B, As[2])]
    with pytest.raises(ProtocolError) as info:
        bl.rolora(moved_b, trained="A")
    assert info.value.client == 1
    assert info.value.message == "B differs from client 0's; this RoLoRA round freezes B"


def test_svd_of_mean_returns_the_leading_rank_triplets() -> None:
    fs = _clients()
    W = _mean(fs)
    U, s, Vh = bl.svd_of_mean(fs, rank=2)
    assert U.shape == (8, 2)
    assert s.shape == (2,)
    assert Vh.shape == (2, 6)
    s_ref = torch.linalg.svdvals(W)[:2]
    n = n_dims(8, 6, [1, 2, 3])
    assert float((s - s_ref).abs().max()) <= product_tol(torch.float64, n=n, scale=float(s_ref[0]))
    with pytest.raises(ValueError, match="rank"):
        bl.svd_of_mean(fs, rank=0)


def test_truncate_svd_shares_the_singular_values_between_the_factors_by_default() -> None:
    # split="balanced" by default: B = U_r sqrt(s_r), A = sqrt(s_r) Vh_r.
    U, s, Vh = bl.svd_of_mean(_clients(), rank=3)
    out = bl.truncate_svd(U, s, Vh, 2, torch.float64)
    root = s[:2].sqrt()
    assert torch.equal(out.B, U[:, :2] * root)
    assert torch.equal(out.A, Vh[:2] * root[:, None])


def test_truncate_svd_splits_one_product_three_ways() -> None:
    # The broadcast-split arm of the experiments hands one update back as each split: the
    # products agree to rounding; "left" has orthonormal rows of A, "right" orthonormal
    # columns of B; asking for more rank than there is pads with zeros.
    U, s, Vh = bl.svd_of_mean(_clients(), rank=3)
    n = n_dims(int(U.shape[0]), int(Vh.shape[1]), [3])
    ref = bl.truncate_svd(U, s, Vh, 3, torch.float64).delta()
    tol = product_tol(torch.float64, n=n, scale=float(s[0]))
    eye = torch.eye(3, dtype=torch.float64)
    for split in ("balanced", "left", "right"):
        out = bl.truncate_svd(U, s, Vh, 3, torch.float64, split=split)
        assert float(torch.linalg.matrix_norm(out.delta() - ref)) <= tol, split
    left = bl.truncate_svd(U, s, Vh, 3, torch.float64, split="left")
    right = bl.truncate_svd(U, s, Vh, 3, torch.float64, split="right")
    ortho = product_tol(torch.float64, n=n, scale=1.0)
    assert float(torch.linalg.matrix_norm(left.A @ left.A.T - eye)) <= ortho
    assert float(torch.linalg.matrix_norm(right.B.T @ right.B - eye)) <= ortho
    padded = bl.truncate_svd(U, s, Vh, 5, torch.float64, split="right")
    assert padded.rank == 5
    assert not padded.A[3:].any()  # zero rows: the padding is exact
    with pytest.raises(ValueError, match="split"):
        bl.truncate_svd(U, s, Vh, 2, torch.float64, split="top")  # type: ignore[arg-type]


def _rot(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def test_soft_fedrot_rotation_moves_a_fraction_towards_the_proper_rotation() -> None:
    # A_i A_ref^T = Rot(theta) diag(2, -1): its polar factor Rot(theta) diag(1, -1) is a
    # reflection; the closest rotation (SO(2), Kabsch) is R* = Rot(theta). Soft alignment is
    # polar((1 - lam) I + lam R*) = Rot(phi), phi = atan2(lam sin theta, 1 - lam + lam cos theta).
    theta = 0.7
    A_ref = torch.eye(2, 5, dtype=torch.float64)
    A_i = _rot(theta) @ torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64)) @ A_ref
    B = torch.ones(4, 2, dtype=torch.float64)
    client, reference = LoRAFactors(B, A_i), LoRAFactors(B, A_ref)
    tol = product_tol(torch.float64, n=n_dims(2, 5, [2]), scale=1.0)
    for lam in (0.3, 0.5, 0.9):
        R = bl.fedrot_rotation(client, reference, align="A", lam=lam)
        phi = math.atan2(lam * math.sin(theta), 1.0 - lam + lam * math.cos(theta))
        assert float(torch.linalg.matrix_norm(R - _rot(phi))) <= tol, lam
    # lam = 1 is the plain Procrustes solution in O(r): here the reflection.
    R1 = bl.fedrot_rotation(client, reference, align="A", lam=1.0)
    reflection = _rot(theta) @ torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert float(torch.linalg.matrix_norm(R1 - reflection)) <= tol
    with pytest.raises(ValueError, match=r"alignment strength must be in \[0, 1\], got 1.5"):
        bl.fedrot_rotation(client, reference, align="A", lam=1.5)


def test_soft_fedrot_rotation_of_a_half_turn_is_a_proper_rotation() -> None:
    # R* a half-turn in a plane and lam = 1/2: (I + R*) / 2 is singular, its polar factor is
    # not unique, and the SO(r) restriction picks one of determinant +1.
    g = torch.Generator().manual_seed(10)
    A_ref = torch.eye(5, 7, dtype=torch.float64)
    B = torch.ones(4, 5, dtype=torch.float64)
    n = n_dims(5, 7, [5])
    for _ in range(8):
        Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
        half_turn = Q @ torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0])).double() @ Q.mT
        R = bl.fedrot_rotation(
            LoRAFactors(B, half_turn @ A_ref), LoRAFactors(B, A_ref), align="A", lam=0.5
        )
        eye = torch.eye(5, dtype=torch.float64)
        assert float(torch.linalg.matrix_norm(R.mT @ R - eye)) <= orthonormality_tol(
            torch.float64, n=n
        )
        assert float(torch.linalg.det(R)) > 0.0


def test_fedrot_lora_averages_with_the_given_weights() -> None:
    g = torch.Generator().manual_seed(11)
    fs = gaussian_clients(3, 8, 2, 6, generator=g)
    glob, _ = bl.fedrot_lora(fs, _WEIGHTS, reference=None, round_index=1)
    fedit = bl.fedit(fs, _WEIGHTS)
    assert torch.equal(glob.B, fedit.B)
    assert torch.equal(glob.A, fedit.A)


def test_fedrot_lora_refuses_a_reference_of_another_rank() -> None:
    g = torch.Generator().manual_seed(12)
    fs = gaussian_clients(3, 8, 2, 6, generator=g)
    wider = gaussian_clients(1, 8, 3, 6, generator=g)[0]  # the same shape (8, 6), rank 3
    with pytest.raises(ShapeMismatchError) as info:
        bl.fedrot_lora(fs, reference=wider, round_index=2)
    assert info.value.message == (
        "reference factors (8, 3)x(3, 6) do not match the clients' rank 2 and shape (8, 6)"
    )


def test_fedrot_lora_takes_last_rounds_half_precision_global_as_the_reference() -> None:
    # The previous round's global factors come back in the clients' dtype (here float16); the
    # rotations are computed in float32 and keep every client's product.
    g = torch.Generator().manual_seed(13)
    fs = [LoRAFactors(f.B.half(), f.A.half()) for f in gaussian_clients(3, 8, 2, 6, generator=g)]
    reference, _ = bl.fedrot_lora(fs, reference=None, round_index=1)
    assert reference.B.dtype == torch.float16
    for round_index in (2, 3):  # aligns A, then B
        glob, aligned = bl.fedrot_lora(fs, reference=reference, round_index=round_index)
        assert glob.B.dtype == torch.float16
        for f, a in zip(fs, aligned, strict=True):
            W = f64(f.B) @ f64(f.A)
            scale = float(torch.linalg.matrix_norm(f64(f.B)) * torch.linalg.matrix_norm(f64(f.A)))
            err = float(torch.linalg.matrix_norm(f64(a.B) @ f64(a.A) - W))
            assert err <= product_tol(torch.float32, n=n_dims(8, 6, [2]), scale=scale)


# LoRA-FAIR. Its line search branches on comparisons, so these tests rebuild the documented
# objective (FairProblem) from the same sums, in the same order, and run the documented
# search: gradient steps with Armijo backtracking (sufficient-decrease constant 1e-4, first
# trial step 1, halved on rejection down to 1e-12, doubled after each accepted step).


def _fair_reference(fs: list[LoRAFactors], lam: float, steps: int) -> tuple[torch.Tensor, float]:
    # Two clients with equal weights (p = 1/2, exact), listed in lora_fair's canonical order.
    (B0, A0), (B1, A1) = fs
    B_bar = B0 * 0.5
    B_bar.add_(B1, alpha=0.5)
    A_bar = A0 * 0.5
    A_bar.add_(A1, alpha=0.5)
    M = (B0 @ (A0 @ A_bar.mT)) * 0.5
    M.add_(B1 @ (A1 @ A_bar.mT), alpha=0.5)
    mean = mean_update(fs, [1.0, 1.0])
    problem = bl.FairProblem(M, A_bar @ A_bar.mT, B_bar, lowrank_fro_norm(mean.B, mean.A), lam)
    dB = torch.zeros_like(B_bar)
    value, grad = problem.value_and_grad(dB)
    step = 1.0
    for _ in range(steps):
        g2 = float((grad * grad).sum())
        if g2 == 0.0:
            break
        while step > 1e-12:
            trial = dB - step * grad
            new_value, new_grad = problem.value_and_grad(trial)
            if new_value <= value - 1e-4 * step * g2:
                break
            step *= 0.5
        else:
            break
        dB, value, grad = trial, new_value, new_grad
        step *= 2.0
    return B_bar + dB, value


def _two_clients(seed: int, scale: float, *, shared_a: bool = False) -> list[LoRAFactors]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, 5, generator=g, dtype=torch.float64)
    fs = [
        LoRAFactors(
            torch.randn(6, 2, generator=g, dtype=torch.float64) * scale,
            A if shared_a else torch.randn(2, 5, generator=g, dtype=torch.float64),
        )
        for _ in range(2)
    ]
    return sorted(fs, key=lambda f: float(f.B.sum()))  # lora_fair's order for equal weights


def test_lora_fair_takes_armijo_gradient_steps_from_fedit() -> None:
    cases = [
        # large factors: small gradients, every trial accepted and the step keeps doubling
        (_two_clients(0, 30.0), 0.01, 4),
        # ... and over 50 steps, where some trial would raise the discrepancy a little
        (_two_clients(1, 30.0), 0.01, 50),
        # small factors: large gradients, the search backtracks
        (_two_clients(0, 0.05), 0.01, 4),
        (_two_clients(1, 0.05), 0.01, 4),
        # a shared A: FedIT is exact and a step that keeps the discrepancy is accepted
        (_two_clients(2, 1.0, shared_a=True), 0.01, 50),
        # B_bar = (1, 0) is orthogonal to W_bar = (0, 2): the first gradient has norm exactly 1
        (
            sorted(
                [
                    LoRAFactors(
                        torch.tensor([[0.0], [2.0]]).double(), torch.tensor([[2.0]]).double()
                    ),
                    LoRAFactors(
                        torch.tensor([[2.0], [-2.0]]).double(), torch.tensor([[0.0]]).double()
                    ),
                ],
                key=lambda f: float(f.B.sum()),
            ),
            0.01,
            1,
        ),
    ]
    # W_bar = (0, 1) has norm exactly 1 and is orthogonal to B_bar = (1, 0): the cosine is 0,
    # well defined, and the search improves on FedIT.
    unit_mean = [
        LoRAFactors(torch.tensor([[0.0], [1.0]]).double(), torch.tensor([[2.0]]).double()),
        LoRAFactors(torch.tensor([[2.0], [-1.0]]).double(), torch.tensor([[0.0]]).double()),
    ]
    cases.append((sorted(unit_mean, key=lambda f: float(f.B.sum())), 0.01, 3))
    for fs, lam, steps in cases:
        B_ref, value_ref = _fair_reference(fs, lam, steps)
        out, before, after = bl.lora_fair(fs, lam=lam, steps=steps)
        # The reference repeats the library's operations in the same order on the same machine,
        # so the two agree bit for bit wherever they run (the comparison is of one computation
        # done twice, not of an inexact result against an exact one).
        assert torch.equal(out.B, B_ref)
        assert after == value_ref
        # Armijo acceptance never raises the computed value (value - 1e-4 t g2 <= value holds in
        # floating point), so the search never ends above where it started, on any machine.
        assert after <= before
        # Strict progress is asserted only where FedIT's discrepancy lies above the rounding
        # floor of a computed 1 - cos (a relative quantity: scale 1 over the d + k + r terms).
        # With a shared A FedIT is exact and its discrepancy is rounding noise, exactly 0.0 on
        # some machines (AMD EPYC with MKL), so no strict decrease can be asked of it.
        d, r = fs[0].B.shape
        floor = product_tol(torch.float64, n=d + fs[0].A.shape[1] + r, scale=1.0)
        if before > floor:
            assert after < before
        else:
            assert after <= floor
    # The discrepancy floor is reached exactly by the shared-A case and by no other.
    shared = _two_clients(2, 1.0, shared_a=True)
    assert bl.lora_fair(shared, lam=0.01, steps=0)[1] <= product_tol(torch.float64, n=13, scale=1.0)


def test_lora_fair_defaults_are_lam_one_hundredth_and_fifty_steps() -> None:
    fs = _two_clients(3, 1.0)
    default = bl.lora_fair(fs)
    explicit = bl.lora_fair(fs, lam=0.01, steps=50)
    assert torch.equal(default[0].B, explicit[0].B)
    assert default[1:] == explicit[1:]
    # Neither setting is immaterial here: another lam or one more step changes the result.
    assert not torch.equal(bl.lora_fair(fs, lam=1.01)[0].B, default[0].B)
    assert not torch.equal(bl.lora_fair(fs, steps=51)[0].B, default[0].B)


def test_lora_fair_discrepancy_is_measured_against_the_weighted_mean() -> None:
    # before = 1 - cos(W_bar, B_bar A_bar) with W_bar = sum_i p_i B_i A_i for the given weights.
    g = torch.Generator().manual_seed(14)
    fs = gaussian_clients(3, 8, 2, 6, generator=g)
    _, before, _ = bl.lora_fair(fs, _WEIGHTS, steps=0)
    p = _p()
    W = sum((pi * (f.B @ f.A) for pi, f in zip(p, fs, strict=True)), torch.zeros(8, 6).double())
    B_bar = sum((pi * f.B for pi, f in zip(p, fs, strict=True)), torch.zeros(8, 2).double())
    A_bar = sum((pi * f.A for pi, f in zip(p, fs, strict=True)), torch.zeros(2, 6).double())
    F = B_bar @ A_bar
    cos = float((W * F).sum() / (torch.linalg.matrix_norm(W) * torch.linalg.matrix_norm(F)))
    scale = sum(
        pi * float(torch.linalg.matrix_norm(f.B) * torch.linalg.matrix_norm(f.A))
        for pi, f in zip(p, fs, strict=True)
    ) / float(torch.linalg.matrix_norm(W))
    assert abs(before - (1.0 - cos)) <= product_tol(
        torch.float64, n=n_dims(8, 6, [2] * 3), scale=scale
    )


def test_lora_fair_checks_lam_and_steps() -> None:
    fs = _two_clients(4, 1.0)
    for lam, steps in ((-0.5, 3), (math.inf, 3), (math.nan, 3), (0.01, -1)):
        with pytest.raises(ValueError, match="lam must be >= 0 and steps >= 0"):
            bl.lora_fair(fs, lam=lam, steps=steps)
    # steps=0 is allowed: FedIT's factors, unchanged.
    out, before, after = bl.lora_fair(fs, steps=0)
    fedit = bl.fedit(fs)
    assert torch.equal(out.B, fedit.B)
    assert torch.equal(out.A, fedit.A)
    assert before == after


def test_lora_fair_keeps_fedit_when_the_cosine_is_undefined() -> None:
    # If B_bar A_bar = 0 the cosine is undefined: the discrepancy counts as 1 and the gradient
    # at dB = 0 is zero. If W_bar = 0 (its computed norm may be a rounding residue, but
    # <W_bar, B' A_bar> = 0 exactly) the cosine is 0. Either way lora_fair returns FedIT.
    b = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    a = torch.tensor([[0.5, -1.0, 2.0, 1.0]], dtype=torch.float64)
    zero_fedit = [LoRAFactors(b, a), LoRAFactors(-b, -a)]  # B_bar = 0, W_bar = b a
    zero_mean = [LoRAFactors(b, a), LoRAFactors(2.0 * b, -0.5 * a)]  # W_bar = 0, B_bar A_bar != 0
    for fs in (zero_fedit, zero_mean):
        out, before, after = bl.lora_fair(fs)
        fedit = bl.fedit(fs)
        assert torch.equal(out.B, fedit.B)
        assert torch.equal(out.A, fedit.A)
        assert before == after == 1.0


def test_lora_fair_is_exactly_invariant_to_the_clients_order() -> None:
    # Clients that tie on weight and on the sums of B and A, and differ only in the sum of
    # squares of B (first set) or of A (second): the canonical order still tells them apart.
    g = torch.Generator().manual_seed(3)
    Bs = [
        [[0.125, 0.5], [0.5, 0.25], [0.375, -0.75]],
        [[0.25, 0.25], [0.25, 0.5], [0.5, -0.75]],
        [[0.75, -0.5], [0.125, 1.0], [0.125, -0.5]],
    ]
    A = torch.randn(2, 5, generator=g, dtype=torch.float64)
    first = [LoRAFactors(torch.tensor(b, dtype=torch.float64) * 1.1, A) for b in Bs]
    B = torch.randn(3, 2, generator=g, dtype=torch.float64)
    As = [[[b[0][0], b[1][0], b[2][0]], [b[0][1], b[1][1], b[2][1]]] for b in Bs]  # B^T, sums kept
    second = [LoRAFactors(B, torch.tensor(a, dtype=torch.float64)) for a in As]
    for fs in (first, second):
        out, before, after = bl.lora_fair(fs, steps=5)
        for perm in itertools.permutations(range(3)):
            o, b, a = bl.lora_fair([fs[i] for i in perm], steps=5)
            assert torch.equal(o.B, out.B), perm
            assert torch.equal(o.A, out.A), perm
            assert (b, a) == (before, after), perm
