"""Tests written for surviving mutants of the stacked operator in ``aggregate.py``.

A stack of same-shape modules (B_i ``(L, d, r_i)``, A_i ``(L, r_i, k)``) is aggregated module
by module in batched kernels; modules the kernels cannot treat uniformly are redone by the
per-module operator. Every module must equal ``glora_aggregate`` on its own clients, and the
stack's warnings, certificate, spectrum and settings are the per-module operator's, per module
(docs/mutation.md).
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
    RankClampedWarning,
    ServerState,
    Sketch,
    ZeroEigengapWarning,
    glora_aggregate,
)
from glora_math.errors import ResidualWarning
from glora_math.testing.helpers import f64, state_tol
from glora_math.tolerances import certificate_tol, eigenvalue_error

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
        "consensus eigengap at R=1 is numerically zero in modules [0, 1, 2, 3, 4, 5]: the "
        "server subspace is not unique"
    )
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
        f"module {i}, side=left, R=1: certified relative residual "
        f"{certs[i].relative_residual:.3e} exceeds 1.000e-03"
        for i in range(2)
    ]
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
