"""Tests written for surviving mutants of ``aggregate.py`` (docs/mutation.md)."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from glora_math import (
    GloraError,
    LoRAFactors,
    NonFiniteError,
    Sketch,
    ZeroEigengapWarning,
    glora_aggregate,
)
from glora_math.aggregate import _overflow
from glora_math.errors import ResidualWarning
from glora_math.testing.strategies import gaussian_clients
from glora_math.tolerances import certificate_tol, eigenvalue_error


def _clients() -> list[LoRAFactors]:
    return [
        LoRAFactors(
            torch.full((4, 1), 1.0, dtype=torch.float64),
            torch.full((1, 3), 1.0, dtype=torch.float64),
        ),
        LoRAFactors(
            torch.full((4, 1), 5.0, dtype=torch.float64),
            torch.full((1, 3), 1.0, dtype=torch.float64),
        ),
    ]


def test_an_overflow_error_keeps_the_cause_of_a_non_finite_certificate() -> None:
    # A NonFiniteError without a client (the certificate's) keeps its own text: it did not come
    # from a failed kernel. The largest client (1) is named.
    err = _overflow(NonFiniteError("the certificate overflowed"), _clients())
    assert isinstance(err, NonFiniteError)
    assert err.client == 1
    assert err.message.startswith("the certificate overflowed; the largest client update")


def test_an_overflow_error_says_which_kernel_failed() -> None:
    # A kernel error (LinAlgError, OverflowError) has no .message: its text is quoted.
    for kernel_error in (torch.linalg.LinAlgError("svd did not converge"), OverflowError("big")):
        err = _overflow(kernel_error, _clients())
        assert isinstance(err, NonFiniteError)
        assert err.client == 1
        assert err.message.startswith(f"a kernel failed ({kernel_error}); the largest client")


def test_a_certificate_overflow_is_reported_as_such() -> None:
    # float32, one rank-1 client B = c 1, A = c 1 with c = 1e19: every entry of W = c^2 and of
    # S = U^T W is finite, but ||W||_F = 4 c^2 = 4e38 exceeds float32's largest value 3.4e38.
    c = 1e19
    clients = [
        LoRAFactors(
            torch.full((4, 1), c, dtype=torch.float32), torch.full((1, 4), c, dtype=torch.float32)
        )
    ]
    with pytest.raises(NonFiniteError) as info:
        glora_aggregate(clients, rank=1)
    assert info.value.client == 0
    assert info.value.message.startswith("the certificate overflowed torch.float32")


# --- Survivors of the full run (group B): the public operator's settings and messages. ---

E4 = torch.eye(4, dtype=torch.float64)


def _axis_client(i: int, j: int, scale: float) -> LoRAFactors:
    """``B = scale e_i``, ``A = e_j^T`` (4 by 4): a rank-1 update with one entry."""
    return LoRAFactors(E4[:, i : i + 1] * scale, E4[j : j + 1, :])


def _random_clients(dtype: torch.dtype = torch.float64, *, seed: int = 0) -> list[LoRAFactors]:
    fs = gaussian_clients(3, 6, 2, 5, generator=torch.Generator().manual_seed(seed))
    return [LoRAFactors(f.B.to(dtype), f.A.to(dtype)) for f in fs]


def _stack(dtype: torch.dtype = torch.float64, *, scale: float = 1.0) -> list[LoRAFactors]:
    """Two clients, each a stack of two modules (6 by 2 and 2 by 5 per module)."""
    g = torch.Generator().manual_seed(1)
    return [
        LoRAFactors(
            (scale * torch.randn(2, 6, 2, generator=g, dtype=torch.float64)).to(dtype),
            (scale * torch.randn(2, 2, 5, generator=g, dtype=torch.float64)).to(dtype),
        )
        for _ in range(2)
    ]


def _message(exc: pytest.ExceptionInfo[GloraError]) -> str:
    return exc.value.message


def test_max_residual_is_any_positive_finite_threshold_below_1e300() -> None:
    # Documented: max_residual is a threshold on the relative residual; values above 1 are
    # accepted (they never warn), 0, 1e300 and beyond are refused with the range in the text.
    clients = _random_clients()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = glora_aggregate(clients, rank=2, max_residual=2.0)
    assert state.rank == 2
    for bad in (0.0, 1e300, math.inf, -1.0):
        with pytest.raises(GloraError) as info:
            glora_aggregate(clients, rank=2, max_residual=bad)
        assert _message(info) == f"max_residual must be a float in (0, 1e+300), got {bad!r}"


@pytest.mark.parametrize("bad", [0.0, 1.0])
def test_tol_of_the_auto_rank_lies_strictly_between_0_and_1(bad: float) -> None:
    with pytest.raises(GloraError) as info:
        glora_aggregate(_random_clients(), rank="auto", tol=bad)
    assert _message(info) == f"tol must be a float in (0, 1), got {bad!r}"


def test_the_errors_of_the_settings_say_what_is_wrong() -> None:
    clients = _random_clients()
    cases: list[tuple[dict[str, object], str]] = [
        (
            {"rank": "auto", "tol": 0.5, "sketch": Sketch(seed=0)},
            "rank='auto' needs the exact consensus (sketch=None)",
        ),
        ({"rank": 2, "tol": 0.5}, "tol is only used with rank='auto'"),
        (
            {"rank": 2, "side": "auto", "certify": False},
            "side='auto', rank='auto' and max_residual decide by the certificate",
        ),
        (
            {"rank": 2, "route": "gram", "gauge": "svd"},
            "route='gram' computes qr-gauge bases; it needs gauge='qr'",
        ),
    ]
    for kwargs, text in cases:
        with pytest.raises(GloraError) as info:
            glora_aggregate(clients, **kwargs)  # type: ignore[arg-type]
        assert _message(info) == text


@pytest.mark.parametrize("kwargs", [{"side": "auto", "rank": 2}, {"rank": "auto", "tol": 0.5}])
def test_a_stack_refuses_the_per_module_choices_and_says_why(kwargs: dict[str, object]) -> None:
    with pytest.raises(GloraError) as info:
        glora_aggregate(_stack(), **kwargs)  # type: ignore[arg-type]
    assert _message(info) == (
        "side='auto' and rank='auto' choose per module, which gives modules states of "
        "different shapes: aggregate a stack with a fixed side and rank, or pass the "
        "modules one by one"
    )


def test_a_stack_warns_when_a_modules_residual_exceeds_max_residual() -> None:
    # Rank 1 of a rank-4 mean update misses part of it in every module.
    with pytest.warns(ResidualWarning, match="side=left, R=1"):
        state = glora_aggregate(_stack(), rank=1, max_residual=1e-3)
    assert state.module_certificates is not None
    assert all(c.relative_residual > 1e-3 for c in state.module_certificates)


def test_a_stacks_certificate_overflow_is_reported_as_such() -> None:
    # As for one module (test_a_certificate_overflow_is_reported_as_such): ||W||_F = 4e38 per
    # module is beyond float32, every entry of the result is not.
    c = 1e19
    clients = [
        LoRAFactors(
            torch.full((2, 4, 1), c, dtype=torch.float32),
            torch.full((2, 1, 4), c, dtype=torch.float32),
        )
    ]
    with pytest.raises(NonFiniteError) as info:
        glora_aggregate(clients, rank=1)
    assert info.value.client == 0
    assert info.value.message.startswith("the certificate overflowed torch.float32")


@pytest.mark.parametrize("batch", [(), (2,)])
def test_a_result_beyond_the_working_dtype_names_the_operator_and_the_client(
    batch: tuple[int, ...],
) -> None:
    # Without the certificate, S = U^T W has entries 2 c^2 = 8e38: beyond float32.
    c = 2e19
    clients = [
        LoRAFactors(
            torch.full((*batch, 4, 1), c, dtype=torch.float32),
            torch.full((*batch, 1, 4), c, dtype=torch.float32),
        )
    ]
    with pytest.raises(NonFiniteError) as info:
        glora_aggregate(clients, rank=1, certify=False)
    assert info.value.client == 0
    assert info.value.message.startswith(
        "glora_aggregate overflowed: the result has Inf/NaN entries; the largest client update"
    )


def _exact_clients() -> tuple[list[LoRAFactors], list[float]]:
    # p = (3/4, 1/4): W = diag(3, 4) on e_0, e_1; K = diag(3/4, 1/4) keeps e_0, so rank 1
    # misses 4 of ||W|| = 5: relative residual 0.8, exactly, and so is its square 0.64.
    return [_axis_client(0, 0, 4.0), _axis_client(1, 1, 16.0)], [3.0, 1.0]


def test_a_tolerance_met_exactly_is_met() -> None:
    # Documented: rank='auto' is the smallest R whose certified residual is AT MOST tol.
    clients, w = _exact_clients()
    fixed = glora_aggregate(clients, w, rank=1)
    assert fixed.relative_residual == 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ResidualWarning: tol is met
        state = glora_aggregate(clients, w, rank="auto", tol=0.8)
    assert state.rank == 1
    assert state.relative_residual == 0.8


def test_auto_side_with_auto_rank_takes_the_side_that_meets_tol_at_the_smaller_rank() -> None:
    # Left: the B's span e_1, e_2 with weights 5/6, 1/6; rank 1 meets tol (set to its residual,
    # 1/sqrt(101)). Right: the A's span e_0, e_2 with weights 1/2 each; neither direction
    # alone meets tol, so the right side needs rank 2 (where it is exact).
    clients = [_axis_client(1, 2, 2.0), _axis_client(1, 0, 4.0), _axis_client(2, 0, 1.0)]
    w = [3.0, 2.0, 1.0]
    left = glora_aggregate(clients, w, rank="auto", tol=0.5, side="left")
    assert left.rank == 1
    tol = left.relative_residual
    assert tol > 0.0
    right = glora_aggregate(clients, w, rank="auto", tol=tol, side="right")
    assert right.rank == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroEigengapWarning)  # the right side's tie
        state = glora_aggregate(clients, w, rank="auto", tol=tol, side="auto")
    assert (state.side, state.rank, state.relative_residual) == ("left", 1, tol)


def _deficient_client() -> LoRAFactors:
    # W = q_0 e_0^T + q_1 e_1^T from B = [q_0, 1e-20 q_1], A = [e_0; 1e20 e_1]: B's second
    # singular value is below the rank threshold, so the left side keeps q_0 only and misses
    # half of ||W||^2 at every rank (relative residual 1/sqrt(2)).
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64))[0]
    B = torch.stack([q[:, 0], 1e-20 * q[:, 1]], dim=1)
    return LoRAFactors(B, torch.stack([E4[0], 1e20 * E4[1]]))


def test_the_auto_rank_warns_when_no_rank_meets_tol() -> None:
    with pytest.warns(ResidualWarning, match="rank='auto' could not meet tol=1.000e-03"):
        state = glora_aggregate([_deficient_client()], rank="auto", tol=1e-3)
    assert state.rank == 1
    assert abs(state.relative_residual - math.sqrt(0.5)) <= certificate_tol(
        torch.float64, n=4 + 4 + 2, scale=1.0
    )


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add a stack frame"
)
def test_the_auto_rank_warning_that_tol_was_missed_points_at_the_caller() -> None:
    with pytest.warns(ResidualWarning, match="could not meet tol") as rec:
        glora_aggregate([_deficient_client()], rank="auto", tol=1e-3)
    assert [r.filename for r in rec] == [__file__]


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add a stack frame"
)
@pytest.mark.parametrize("stack", [False, True])
def test_the_max_residual_warning_points_at_the_caller(stack: bool) -> None:
    clients = _stack() if stack else _random_clients()
    with pytest.warns(ResidualWarning) as rec:
        glora_aggregate(clients, rank=1, max_residual=1e-3)
    assert rec[0].filename == __file__


def test_a_residual_equal_to_max_residual_does_not_warn() -> None:
    # Documented: the warning is for a residual that EXCEEDS max_residual.
    clients = _random_clients()
    rho = glora_aggregate(clients, rank=2).relative_residual
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = glora_aggregate(clients, rank=2, max_residual=rho)
    assert state.relative_residual == rho


def test_the_auto_rank_of_one_rank_one_client_is_capped_at_one() -> None:
    # Documented: rank='auto' is capped by the clients' total rank (here 1).
    g = torch.Generator().manual_seed(5)
    client = LoRAFactors(
        torch.randn(5, 1, generator=g, dtype=torch.float64),
        torch.randn(1, 3, generator=g, dtype=torch.float64),
    )
    state = glora_aggregate([client], rank="auto", tol=0.5)
    assert (state.requested_rank, state.rank, state.rank_rule) == (1, 1, "auto")


def test_a_fixed_rank_state_records_the_fixed_rule() -> None:
    state = glora_aggregate(_random_clients(), rank=2)
    assert (state.rank_rule, state.tol) == ("fixed", None)


def test_zero_updates_give_the_auto_rank_zero() -> None:
    # W = 0 (every A is zero): rank 0 already meets any tol, with a zero certificate.
    g = torch.Generator().manual_seed(6)
    clients = [
        LoRAFactors(
            torch.randn(5, 2, generator=g, dtype=torch.float64),
            torch.zeros(2, 3, dtype=torch.float64),
        )
        for _ in range(2)
    ]
    state = glora_aggregate(clients, rank="auto", tol=0.5)
    assert state.rank == 0
    assert (state.certificate.relative_residual, state.certificate.mean_norm) == (0.0, 0.0)


@pytest.mark.parametrize("which", ["B", "A", "both"])
def test_clients_that_require_grad_are_aggregated_without_autograd(which: str) -> None:
    g = torch.Generator().manual_seed(7)
    clients = []
    for _ in range(2):
        B = torch.randn(6, 2, generator=g, dtype=torch.float64)
        A = torch.randn(2, 5, generator=g, dtype=torch.float64)
        clients.append(
            LoRAFactors(B.requires_grad_(which in ("B", "both")), A.requires_grad_(which != "B"))
        )
    plain = glora_aggregate([LoRAFactors(f.B.detach(), f.A.detach()) for f in clients], rank=2)
    state = glora_aggregate(clients, rank=2)
    assert not state.U.requires_grad
    assert not state.S.requires_grad
    assert torch.equal(state.U, plain.U)
    assert torch.equal(state.S, plain.S)


def test_clients_at_the_lora_start_seen_from_the_right_keep_their_weights() -> None:
    # Every B is zero (LoRA's start): on the right every client's other factor is zero, so
    # none is singled out; the consensus is that of the A's row spaces with the weights p.
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    clients = [LoRAFactors(torch.zeros(6, 2, dtype=torch.float64), A) for A in As]
    state = glora_aggregate(clients, [3.0, 1.0], rank=1, side="right")
    projectors = [torch.linalg.qr(A.mT)[0] for A in As]
    K = 0.75 * projectors[0] @ projectors[0].mT + 0.25 * projectors[1] @ projectors[1].mT
    expected = torch.linalg.eigvalsh(K).flip(0)[: state.eigvals.numel()]
    assert state.eigvals.numel() == 4
    tol = eigenvalue_error(1.0, 5 + 4, torch.float64)
    assert torch.allclose(state.eigvals, expected, rtol=0.0, atol=tol)
    assert not bool(state.S.any())


def test_the_auto_rank_warns_of_a_zero_eigengap_at_the_rank_it_chose() -> None:
    # d = 2 and total client rank 4: K = (1/3)(e_0 e_0^T + e_1 e_1^T + I) = (2/3) I, a tie at
    # every rank. Rank 1 meets tol=0.99; its gap is zero, which the state must say.
    # W = (2/3) diag(1, 1, 0): rank 1 misses 1/sqrt(2) of it whichever direction it keeps.
    e = torch.eye(2, dtype=torch.float64)
    a = torch.eye(2, 3, dtype=torch.float64)
    clients = [
        LoRAFactors(e[:, 0:1], a[0:1]),
        LoRAFactors(e[:, 1:2], a[1:2]),
        LoRAFactors(e, a),
    ]
    with pytest.warns(ZeroEigengapWarning):
        state = glora_aggregate(clients, rank="auto", tol=0.99)
    assert state.rank == 1


def test_auto_side_prefers_a_side_that_meets_tol_to_one_that_cannot() -> None:
    # Client 1 has weight 1e-40 and an update 1e40 times larger: its part of W is as large as
    # the others', but sqrt(1e-40) is below the rank threshold of K's spectrum, so its own
    # direction is dropped from the consensus. On the right that direction (e_3) is its own:
    # the right side cannot meet tol at any rank. On the left its column is client 0's, and
    # the left side reaches all of W (to rounding) at rank 2.
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    clients = [
        LoRAFactors(q[:, 0:1], E4[0:1]),
        LoRAFactors(1e40 * q[:, 0:1], E4[3:4]),
        LoRAFactors(q[:, 1:2], E4[0:1]),
    ]
    w = [1.0, 1e-40, 1.0]
    with pytest.warns(ResidualWarning, match="could not meet tol"):
        right = glora_aggregate(clients, w, rank="auto", tol=1e-3, side="right")
    assert right.rank == 1
    assert right.relative_residual > 0.5
    left = glora_aggregate(clients, w, rank="auto", tol=1e-3, side="left")
    assert left.rank == 2
    assert left.relative_residual <= 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = glora_aggregate(clients, w, rank="auto", tol=1e-3, side="auto")
    assert (state.side, state.rank) == ("left", 2)
