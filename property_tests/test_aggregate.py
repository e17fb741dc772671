"""Tests of ``glora_math.aggregate``: the operator on one module, then on a stack of same-shape
modules.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``aggregate.py`` that survived the property suite.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings

import pytest
import torch

from glora_math import (
    GloraError,
    LoRAFactors,
    NonFiniteError,
    RankClampedWarning,
    ServerState,
    Sketch,
    ZeroEigengapWarning,
    glora_aggregate,
)
from glora_math.aggregate import _overflow
from glora_math.errors import ResidualWarning
from glora_math.testing.helpers import f64, state_tol
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


def test_a_norm_beyond_float32_is_certified_at_unit_scale() -> None:
    # float32, one rank-1 client B = c 1, A = c 1 with c = 1e19: every entry of W = c^2 and of
    # S = U^T W is finite, but ||W||_F = 4 c^2 = 4e38 exceeds float32's largest value 3.4e38.
    # The state is computed at unit scale (exact powers of 2) and scaled back: a finite, exact
    # result whose certificate holds the norm as a Python float (the old code raised here).
    c = 1e19
    clients = [
        LoRAFactors(
            torch.full((4, 1), c, dtype=torch.float32), torch.full((1, 4), c, dtype=torch.float32)
        )
    ]
    state = glora_aggregate(clients, rank=1)
    assert bool(torch.isfinite(state.S).all())
    # One client of rank 1 at R = 1: exact, to float32 rounding.
    assert state.relative_residual <= certificate_tol(torch.float32, n=4 + 4 + 1, scale=1.0)
    assert state.certificate is not None
    assert state.certificate.mean_norm == pytest.approx(4 * float(torch.tensor(c).float()) ** 2)


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
        "different shapes: glora_aggregate_stack gives each module its own state "
        "(side='auto' in batched kernels); rank='auto' takes the modules one by one"
    )


def test_a_stack_warns_when_a_modules_residual_exceeds_max_residual() -> None:
    # Rank 1 of a rank-4 mean update misses part of it in every module.
    with pytest.warns(ResidualWarning, match="side=left, R=1"):
        state = glora_aggregate(_stack(), rank=1, max_residual=1e-3)
    assert state.module_certificates is not None
    assert all(c.relative_residual > 1e-3 for c in state.module_certificates)


def test_a_stacks_norm_beyond_float32_is_certified_at_unit_scale() -> None:
    # As for one module: ||W||_F = 4e38 per module is beyond float32, every entry is not.
    c = 1e19
    clients = [
        LoRAFactors(
            torch.full((2, 4, 1), c, dtype=torch.float32),
            torch.full((2, 1, 4), c, dtype=torch.float32),
        )
    ]
    state = glora_aggregate(clients, rank=1)
    assert bool(torch.isfinite(state.S).all())
    assert state.module_certificates is not None
    tol = certificate_tol(torch.float32, n=4 + 4 + 1, scale=1.0)
    assert all(m.relative_residual <= tol for m in state.module_certificates)


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


# --- A stack of same-shape modules ---------------------------------------------------------------
# A stack of same-shape modules (B_i ``(L, d, r_i)``, A_i ``(L, r_i, k)``) is aggregated module by
# module in batched kernels; modules the kernels cannot treat uniformly are redone by the
# per-module operator. Every module must equal ``glora_aggregate`` on its own clients, and the
# stack's warnings, certificate, spectrum and settings are the per-module operator's, per module
# (docs/mutation.md).


F64 = torch.float64
UNDER_MUTMUT = "MUTANT_UNDER_TEST" in os.environ  # mutmut's trampolines add stack frames


def _random_stack(L: int, d: int, k: int, ranks: list[int], *, dtype=F64, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return [
        LoRAFactors(
            torch.randn(L, d, r, generator=g, dtype=F64).to(dtype),
            torch.randn(L, r, k, generator=g, dtype=F64).to(dtype),
        )
        for r in ranks
    ]


def _module(fs: list[LoRAFactors], layer: int) -> list[LoRAFactors]:
    return [LoRAFactors(f.B[layer], f.A[layer]) for f in fs]


def _quiet(fn):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _assert_modules_match(state: ServerState, fs: list[LoRAFactors], R: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """Each module's update and spectrum equal the per-module operator's."""
    weights = kwargs.pop("weights", None)
    for layer in range(state.U.shape[0]):
        mods = _module(fs, layer)
        ref = _quiet(lambda mods=mods: glora_aggregate(mods, weights, rank=R, **kwargs))
        d, k = ref.shape
        scale = sum(float(f64(f.B).norm() * f64(f.A).norm()) for f in mods)
        tol = state_tol(
            ref.U.dtype, d=d, k=k, ranks=[f.rank for f in mods], kappa=1.0, gap=ref.gap, scale=scale
        )
        assert float((f64(state.module(layer).delta()) - f64(ref.delta())).norm()) <= tol
        # The spectrum of a module is the per-module operator's, zero-padded to the stack's width.
        row = state.eigvals[layer]
        e = ref.eigvals.numel()
        assert row.numel() >= e
        n = d + k + sum(f.rank for f in mods)
        err = eigenvalue_error(1.0, n, ref.U.dtype)
        pairs = zip(f64(row[:e]).tolist(), f64(ref.eigvals).tolist(), strict=True)
        assert all(abs(a - b) <= err for a, b in pairs)
        assert bool((row[e:] == 0).all())


def _caller_line(fn) -> int:  # type: ignore[no-untyped-def]
    """The line of the first ``glora_aggregate(`` call in ``fn``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, s in enumerate(lines) if "glora_aggregate(" in s)


# --- The rank clamp ---------------------------------------------------------------------------


def test_a_stack_of_one_rank_one_client_is_clamped_to_one_direction() -> None:
    fs = _random_stack(2, 5, 4, [1])
    with pytest.warns(RankClampedWarning) as rec:
        state = glora_aggregate(fs, rank=2)
    assert str(rec[0].message) == (
        "server rank R=2 exceeds what the clients can span (1): clamped to 1"
    )
    if not UNDER_MUTMUT:
        assert rec[0].filename == __file__
    assert state.U.shape == (2, 5, 1)
    assert state.requested_rank == 2
    _assert_modules_match(state, fs, 1)


def test_a_right_side_stack_is_clamped_to_the_width_k_of_the_row_spaces() -> None:
    # k = 3 < d = 8 and the clients' total rank 4: the row spaces span at most 3 directions.
    fs = _random_stack(2, 8, 3, [2, 2])
    with pytest.warns(RankClampedWarning, match=r"the clients can span \(3\): clamped to 3"):
        state = glora_aggregate(fs, rank=4, side="right")
    assert state.U.shape == (2, 3, 3)
    assert state.S.shape == (2, 3, 8)


# --- Clients whose other factor is exactly zero in one module -----------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_client_with_a_zero_other_factor_in_one_module_drops_out_of_that_module(
    side: str,
) -> None:
    # Left: client 0's A is zero in module 1 (right: its B), so its update there is zero and
    # the per-module operator gives it no consensus weight; module 0 keeps all three clients.
    fs = _random_stack(2, 8, 7, [2, 2, 2], seed=3)
    if side == "left":
        fs[0].A[1] = 0.0
    else:
        fs[0].B[1] = 0.0
    state = glora_aggregate(fs, rank=2, side=side)
    _assert_modules_match(state, fs, 2, side=side)


# --- The route ----------------------------------------------------------------------------------


def test_route_gram_is_refused_for_a_float64_stack() -> None:
    fs = _random_stack(2, 8, 5, [2, 2])
    with pytest.raises(GloraError, match="route='gram' is not available for these stacked"):
        glora_aggregate(fs, rank=2, route="gram")


def test_route_gram_takes_the_batched_gram_route_for_a_float32_stack() -> None:
    fs = _random_stack(2, 8, 5, [2, 2], dtype=torch.float32)
    state = glora_aggregate(fs, rank=2, route="gram")
    assert state.route == "stacked-gram"
    _assert_modules_match(state, fs, 2)


def test_route_gram_is_refused_for_a_redone_module_the_gram_route_cannot_take() -> None:
    # Module 1 has a zero update (every B is zero): it is redone per module, where
    # route='gram' is not accurate, so the stack is refused as the module alone would be.
    fs = _random_stack(2, 8, 5, [2, 2], dtype=torch.float32)
    for f in fs:
        f.B[1] = 0.0
    with pytest.raises(GloraError, match="route='gram' is not accurate for these clients"):
        _quiet(lambda: glora_aggregate(_module(fs, 1), rank=1, route="gram"))
    with pytest.raises(GloraError, match="route='gram' is not accurate for these clients"):
        _quiet(lambda: glora_aggregate(fs, rank=1, route="gram"))


# --- The svd gauge: every module redone per module ---------------------------------------------


def test_an_svd_gauge_stack_keeps_its_settings_and_each_modules_spectrum() -> None:
    fs = _random_stack(3, 6, 5, [2, 3], seed=1)
    state = glora_aggregate(fs, [1.0, 2.0], rank=2, gauge="svd")
    assert state.route == "stacked-householder"
    assert state.gauge == "svd"
    assert state.dtype == F64
    assert state.eigvals.dtype == F64
    assert state.eigvals.shape == (3, 5)
    _assert_modules_match(state, fs, 2, weights=[1.0, 2.0], gauge="svd")


def test_an_svd_gauge_stack_of_zero_updates_has_an_empty_spectrum() -> None:
    fs = [LoRAFactors(torch.zeros(2, 5, 2, dtype=F64), torch.zeros(2, 2, 4, dtype=F64))] * 2
    with pytest.warns(RankClampedWarning) as rec:
        state = glora_aggregate(fs, rank=1, gauge="svd")
    assert [str(w.message).split(";")[0] for w in rec] == [
        f"module {i}: all client updates are zero" for i in range(2)
    ]
    assert state.eigvals.shape == (2, 0)


def test_a_half_precision_stack_records_the_clients_dtype() -> None:
    fs = _random_stack(2, 6, 5, [2, 2], dtype=torch.bfloat16)
    for gauge in ("qr", "svd"):
        assert glora_aggregate(fs, rank=2, gauge=gauge).dtype == torch.bfloat16  # type: ignore[arg-type]


def test_a_sketched_stack_redoes_its_modules_with_the_same_sketch() -> None:
    # svd gauge: every module is redone per module, with the sketch (not the exact consensus).
    fs = _random_stack(2, 20, 6, [3, 3, 3, 3], seed=5)
    sketch = Sketch(oversample=0, power_iters=0, seed=0)
    state = glora_aggregate(fs, rank=2, gauge="svd", sketch=sketch)
    _assert_modules_match(state, fs, 2, gauge="svd", sketch=sketch)


# --- The zero-gap warning of the batched kernels -------------------------------------------------


def test_a_numerically_zero_gap_is_reported_for_exactly_the_modules_that_have_it() -> None:
    # d = 2, two rank-1 clients with equal weights: in modules 0..5 their directions are
    # orthogonal (K = I / 2, a zero gap at R = 1 up to rounding, computed either sign); in
    # module 6 they coincide (K = e e^T, gap 1).
    L = 7
    g = torch.Generator().manual_seed(11)
    Q = torch.linalg.qr(torch.randn(L, 2, 2, generator=g, dtype=F64)).Q
    Q[6, :, 1] = Q[6, :, 0]
    A = torch.randn(L, 1, 3, generator=g, dtype=F64)
    fs = [LoRAFactors(Q[:, :, :1].clone(), A), LoRAFactors(Q[:, :, 1:].clone(), A.clone())]

    def run() -> ServerState:
        return glora_aggregate(fs, rank=1)

    with pytest.warns(ZeroEigengapWarning) as rec:
        state = run()
    assert len(rec) == 1
    assert str(rec[0].message) == (
        "modules 0, 1, 2, 3, 4, 5: consensus eigengap at R=1 is numerically zero: the "
        "server subspace is not unique"
    )
    assert rec[0].message.modules == (0, 1, 2, 3, 4, 5)  # type: ignore[union-attr]
    if not UNDER_MUTMUT:
        assert (rec[0].filename, rec[0].lineno) == (__file__, _caller_line(run))
    assert state.route == "stacked-householder"
    assert state.module_gaps is not None
    assert float(state.module_gaps[6]) == pytest.approx(1.0)


def test_a_uniform_stack_at_the_full_width_reports_gaps_in_the_working_dtype() -> None:
    # R equal to the stacked width: the gap is the last eigenvalue (the next one is zero).
    fs = _random_stack(2, 8, 5, [2, 2], dtype=torch.float32)
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        state = glora_aggregate(fs, rank=4)
    finally:
        torch.set_default_dtype(old)
    assert state.route == "stacked-gram"
    assert state.module_gaps is not None
    assert state.module_gaps.dtype == torch.float32
    assert state.eigvals.dtype == torch.float32


# --- The certificate of a stack --------------------------------------------------------------


def test_the_certificate_of_a_stack_is_the_relative_error_of_all_modules_together() -> None:
    fs = _random_stack(3, 8, 6, [2, 3], seed=2)
    state = glora_aggregate(fs, [1.0, 3.0], rank=2)
    certs = state.module_certificates
    assert certs is not None
    total = state.certificate
    assert total is not None
    means = [ct.mean_norm for ct in certs]
    residuals = [ct.relative_residual * ct.mean_norm for ct in certs]
    mean = math.sqrt(sum(m * m for m in means))
    tol = certificate_tol(F64, n=8 + 6 + 5, scale=1.0)
    assert total.mean_norm == pytest.approx(mean, rel=tol)
    rel = math.sqrt(sum(r * r for r in residuals)) / mean
    assert abs(total.relative_residual - rel) <= tol
    assert total.relative_residual > 0.0


def test_a_stack_of_zero_updates_is_certified_exact() -> None:
    fs = [LoRAFactors(torch.zeros(2, 5, 2, dtype=F64), torch.zeros(2, 2, 4, dtype=F64))] * 2
    state = _quiet(lambda: glora_aggregate(fs, rank=1))
    assert state.certificate is not None
    assert state.certificate.relative_residual == 0.0
    assert state.certificate.mean_norm == 0.0


def test_an_uncertified_stack_has_no_certificate() -> None:
    fs = _random_stack(2, 8, 5, [2, 2])
    state = glora_aggregate(fs, rank=2, certify=False)
    assert state.certificate is None
    assert math.isnan(state.relative_residual)
    assert state.module_certificates is None


def test_an_uncertified_stack_does_not_certify_its_redone_modules() -> None:
    # float32, client 0 with B = c 1, A = c 1 (c = 1e19): its state is finite, but the norm
    # of its update, 4 c^2 = 4e38, overflows float32, so certifying it would fail. Module 1
    # (client 1's A is zero there) is redone per module, without a certificate.
    c = 1e19
    fs = [
        LoRAFactors(torch.full((2, 4, 1), c), torch.full((2, 1, 4), c)),
        LoRAFactors(torch.ones(2, 4, 1), torch.ones(2, 1, 4)),
    ]
    fs[1].A[1] = 0.0
    state = glora_aggregate(fs, rank=1, certify=False)
    assert bool(state.U.isfinite().all())
    assert bool(state.S.isfinite().all())


def test_max_residual_names_each_module_that_exceeds_it() -> None:
    # Rank 1 of two independent rank-1 clients: every module misses part of its mean update.
    fs = _random_stack(2, 6, 5, [1, 1], seed=4)

    def run() -> ServerState:
        return glora_aggregate(fs, rank=1, max_residual=1e-3)

    with pytest.warns(ResidualWarning) as rec:
        state = run()
    certs = state.module_certificates
    assert certs is not None
    assert [str(w.message) for w in rec] == [
        f"module {i}: side=left, R=1: certified relative residual "
        f"{certs[i].relative_residual:.3e} exceeds 1.000e-03"
        for i in range(2)
    ]
    assert [w.message.modules for w in rec] == [(0,), (1,)]  # type: ignore[union-attr]
    if not UNDER_MUTMUT:
        assert {(w.filename, w.lineno) for w in rec} == {(__file__, _caller_line(run))}


def test_the_warning_of_a_redone_module_names_the_module() -> None:
    # Module 1 spans one direction (client 0's B is zero there): it is redone and clamped.
    fs = _random_stack(2, 6, 4, [1, 1], seed=6)
    fs[0].B[1] = 0.0

    def run() -> ServerState:
        return glora_aggregate(fs, rank=2)

    with pytest.warns(RankClampedWarning) as rec:
        run()
    assert [str(w.message).startswith("module 1: ") for w in rec] == [True]
