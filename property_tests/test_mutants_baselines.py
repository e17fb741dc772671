"""Tests written for surviving mutants of ``baselines.py`` (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch

from glora_math import LoRAFactors, ShapeMismatchError
from glora_math import baselines as bl
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
