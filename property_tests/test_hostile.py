"""The adversarial corpus of the core: every registered operator against hostile input.

For every case the outcome is a typed :class:`~glora_math.errors.GloraError` (naming the
client where one client is to blame) or a correct, finite result; never a raw exception, a
hang or an Inf/NaN in the output. Classes (issue 19): weights, finite but huge values,
unusual tensors, ranks, lookups. The fixed cases run by default; the hypothesis test draws
random hostile combinations, more of them under the nightly profile.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import glora_math as gm
from glora_math.errors import (
    GloraError,
    NonFiniteError,
    OptionError,
    ResidualWarning,
    UnknownOperatorError,
    WeightError,
)
from glora_math.operators import AggregateResult, get_operator, list_operators
from glora_math.tolerances import aggregate_tol, certificate_tol, storage_tol

OPERATORS = list_operators()


def _clients(
    dtype: torch.dtype = torch.float64, scale: float = 1.0, n: int = 3, r: int = 2, seed: int = 0
) -> list[gm.LoRAFactors]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        B = scale * torch.randn(12, r, generator=g, dtype=torch.float64)
        A = torch.randn(r, 10, generator=g, dtype=torch.float64)
        out.append(gm.LoRAFactors(B.to(dtype), A.to(dtype)))
    return out


def _finite(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    if isinstance(x, gm.LoRAFactors):
        return _finite(x.B) and _finite(x.A)
    if isinstance(x, AggregateResult):
        parts = [x.update, *(x.client_factors or [])]
        return all(_finite(p) for p in parts) and (x.residual is None or _finite(x.residual))
    if isinstance(x, gm.ServerState):
        return _finite(x.U) and _finite(x.S) and not math.isnan(x.relative_residual)
    return True


def _outcome(call: Callable[[], Any]) -> GloraError | Any:
    """The typed error or the result; anything else fails the test with the raw exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call()
        except GloraError as err:
            return err


def _shared_a(op_name: str, fs: list[Any]) -> list[Any]:
    """FFA-LoRA's protocol: every client sends the one shared A."""
    if get_operator(op_name).frozen_factor(1) != "A":
        return fs
    A0 = fs[0][1] if isinstance(fs[0], tuple) else fs[0].A
    out: list[Any] = []
    for f in fs:
        B = f[0] if isinstance(f, tuple) else f.B
        if B.shape[-1] != A0.shape[0]:  # a client of another rank keeps its own A
            out.append(f)
        else:
            out.append((B, A0) if isinstance(f, tuple) else gm.LoRAFactors(B, A0))
    return out


# ---------------------------------------------------------------------------------- weights

WEIGHTS = {
    "near the float64 limit": [1e308, 1e308, 1e308],
    "None entry": [None, 1.0, 1.0],
    "string entry": ["a", 1.0, 1.0],
    "complex entry": [1 + 2j, 1.0, 1.0],
    "int beyond float64": [10**400, 1, 1],
    "NaN entry": [1.0, math.nan, 1.0],
    "negative entry": [1.0, 1.0, -1.0],
    "all zero": [0.0, 0.0, 0.0],
    "wrong length": [1.0, 1.0],
    "a string": "abc",
    "bool entries": [True, False, True],
}


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", list(WEIGHTS))
def test_weights(op_name: str, case: str) -> None:
    fs = _shared_a(op_name, _clients())
    out = _outcome(lambda: get_operator(op_name)(fs, WEIGHTS[case], rank=4))  # type: ignore[arg-type]
    if case == "near the float64 limit":  # equal weights: a correct result, no overflow
        assert not isinstance(out, GloraError), out
        ref = get_operator(op_name)(fs, None, rank=4)
        assert torch.allclose(out.update.delta(), ref.update.delta())
        return
    assert isinstance(out, WeightError), out
    if case not in ("all zero", "wrong length", "a string"):
        assert out.client is not None, out


# ------------------------------------------------------------------- finite but huge values

HUGE = {
    "float32 1e30": (torch.float32, 1e30),
    "float32 1e19": (torch.float32, 1e19),
    "float64 1e200": (torch.float64, 1e200),
    "float64 1e150": (torch.float64, 1e150),
    "float16 3000": (torch.float16, 3000.0),
}


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", list(HUGE))
def test_huge_values(op_name: str, case: str) -> None:
    dtype, scale = HUGE[case]
    fs = _shared_a(op_name, _clients(dtype, scale))
    out = _outcome(lambda: get_operator(op_name)(fs, None, rank=4))
    if isinstance(out, GloraError):
        assert isinstance(out, NonFiniteError), out
        assert out.client is not None, out
    else:
        assert _finite(out), f"{op_name}: non-finite output for {case}"


@pytest.mark.parametrize("case", list(HUGE))
@pytest.mark.parametrize("stacked", [False, True])
def test_huge_values_in_glora_and_its_readouts(case: str, stacked: bool) -> None:
    dtype, scale = HUGE[case]
    fs = _clients(dtype, scale)
    if stacked:
        fs = [gm.LoRAFactors(torch.stack([f.B, f.B]), torch.stack([f.A, f.A])) for f in fs]
    state = _outcome(lambda: gm.glora_aggregate(fs, rank=3))
    if isinstance(state, GloraError):
        assert isinstance(state, NonFiniteError), state
        assert state.client is not None, state
        return
    assert _finite(state)
    ro = _outcome(lambda: gm.readout(state, 2))
    assert isinstance(ro, NonFiniteError) or _finite(ro), ro


# ------------------------------------------------------------------------ unusual tensors


def _rank0() -> list[gm.LoRAFactors]:
    z = gm.LoRAFactors(
        torch.zeros(12, 0, dtype=torch.float64), torch.zeros(0, 10, dtype=torch.float64)
    )
    return [*_clients()[:2], z]


TENSORS: dict[str, Callable[[], list[Any]]] = {
    "requires_grad": lambda: [
        gm.LoRAFactors(f.B.clone().requires_grad_(), f.A.clone().requires_grad_())
        for f in _clients()
    ],
    "(B, A) tuples": lambda: [(f.B, f.A) for f in _clients()],
    "a rank-0 client": _rank0,
    "non-contiguous": lambda: [
        gm.LoRAFactors(f.B.mT.contiguous().mT, f.A.mT.contiguous().mT) for f in _clients()
    ],
    "mixed float32/float64": lambda: [_clients()[0], *_clients(torch.float32)[1:]],
}


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", list(TENSORS))
def test_unusual_tensors(op_name: str, case: str) -> None:
    fs = _shared_a(op_name, TENSORS[case]())
    out = _outcome(lambda: get_operator(op_name)(fs, None, rank=4))
    if isinstance(out, GloraError):  # e.g. equal-rank operators and the rank-0 client
        assert out.client is not None, out
        assert case in ("a rank-0 client", "mixed float32/float64"), out
    else:
        assert _finite(out)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: gm.LoRAFactors(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(2, 4)),
            "floating point",
        ),
        (
            lambda: gm.LoRAFactors(torch.zeros(3, 2, dtype=torch.bool), torch.zeros(2, 4)),
            "floating point",
        ),
        (
            lambda: gm.LoRAFactors(
                torch.zeros(3, 2, device="meta"), torch.zeros(2, 4, device="meta")
            ),
            "meta",
        ),
        (
            lambda: gm.LoRAFactors(torch.zeros(3, 2, dtype=torch.complex64), torch.zeros(2, 4)),
            "floating point",
        ),
        (lambda: gm.LoRAFactors(torch.zeros(2, 3, 2), torch.zeros(3, 2, 4)), "matrix"),
    ],
)
def test_factor_types_are_typed_errors(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(GloraError, match=match):
        make()


# ------------------------------------------------------------------------------------ ranks


@pytest.mark.parametrize("rank", [0, -1, True, 2.5, "4", None, 10**6, 10**9])
@pytest.mark.parametrize("stacked", [False, True])
def test_server_ranks(rank: object, stacked: bool) -> None:
    fs = _clients()
    if stacked:
        fs = [gm.LoRAFactors(torch.stack([f.B] * 3), torch.stack([f.A] * 3)) for f in fs]
    out = _outcome(lambda: gm.glora_aggregate(fs, rank=rank))  # type: ignore[arg-type]
    if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1:
        assert not isinstance(out, GloraError), out
        assert out.rank <= 6  # clamped to what 3 clients of rank 2 can span: nothing huge
        assert _finite(out)
    else:
        assert isinstance(out, GloraError), out


def test_a_rank_zero_client_is_named_by_the_registry() -> None:
    out = _outcome(lambda: get_operator("glora")(_clients(), None, rank=4, client_ranks=[2, 0, 2]))
    assert isinstance(out, GloraError)
    assert out.client == 1


# ---------------------------------------------------------------------------------- lookups


def test_unknown_operators_and_bad_gauge_fixed_input() -> None:
    for name in ("nope", "", None, 3):
        with pytest.raises(UnknownOperatorError, match="unknown operator"):
            get_operator(name)  # type: ignore[arg-type]
    with pytest.raises(KeyError):  # still a lookup error for code that catches KeyError
        get_operator("nope")
    fixed = [gm.gauge_fix(f) for f in _clients()]
    bad = gm.GaugeFixed(2.0 * fixed[1].U, fixed[1].C)  # not orthonormal
    with pytest.raises(gm.GaugeError, match=r"client 1: basis columns are not orthonormal"):
        gm.consensus_basis([fixed[0], bad, fixed[2]], rank=2)
    with pytest.raises(GloraError, match="client 1: expected GaugeFixed"):
        gm.consensus_basis([fixed[0], _clients()[1]], rank=2)  # type: ignore[list-item]
    nan = gm.GaugeFixed(fixed[2].U, fixed[2].C * math.nan)
    with pytest.raises(NonFiniteError, match="client 2"):
        gm.consensus_basis([*fixed[:2], nan], rank=2)


# ------------------------------------------------------------------ random hostile mixtures


@given(
    op_name=st.sampled_from(OPERATORS),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
    exponent=st.integers(-30, 300),
    weights=st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**400)),
        min_size=3,
        max_size=3,
    ),
    seed=st.integers(0, 2**16),
)
def test_random_hostile_mixtures(
    op_name: str, dtype: torch.dtype, exponent: int, weights: list[float], seed: int
) -> None:
    scale = 10.0 ** min(exponent, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs = _clients(torch.float64, scale, seed=seed)
        fs = [gm.LoRAFactors(f.B.to(dtype), f.A.to(dtype)) for f in fs]
    fs = _shared_a(op_name, fs)
    out = _outcome(lambda: get_operator(op_name)(fs, weights, rank=3))
    assert isinstance(out, GloraError) or _finite(out)


def test_an_overflow_in_a_group_of_modules_names_the_client_not_the_flat_index() -> None:
    from glora_math.validation import overflow_error

    # Two modules of three clients each, module after module; client 1 of module 2 is largest.
    fs = [*_clients(n=3), *_clients(n=3, seed=1)]
    fs[4] = gm.LoRAFactors(fs[4].B * 1e6, fs[4].A)
    assert overflow_error("test", fs, clients=3).client == 1
    assert overflow_error("test", fs).client == 4


# ------------------------------------------------- round two: containers, layouts, settings

_NOT_CLIENTS: dict[str, Callable[[], Any]] = {
    "None": lambda: None,
    "a string": lambda: "clients",
    "an int": lambda: 5,
    "one LoRAFactors": lambda: _clients()[0],
    "a tensor": lambda: torch.zeros(3, 2),
    "sparse factors": lambda: [gm.LoRAFactors(f.B.to_sparse(), f.A) for f in _clients()],
}


@pytest.mark.parametrize("op_name", OPERATORS)
@pytest.mark.parametrize("case", list(_NOT_CLIENTS))
def test_what_is_not_a_list_of_clients(op_name: str, case: str) -> None:
    # A typed error (building the sparse factors already refuses them), never a raw one.
    out = _outcome(lambda: get_operator(op_name)(_NOT_CLIENTS[case](), None, rank=2))
    assert isinstance(out, GloraError), out
    assert isinstance(
        _outcome(lambda: gm.glora_aggregate(_NOT_CLIENTS[case](), rank=2)), GloraError
    )


def test_a_stack_of_no_modules_and_unknown_settings_are_typed() -> None:
    empty = [gm.LoRAFactors(torch.zeros(0, 8, 2), torch.zeros(0, 2, 5))] * 2
    with pytest.raises(gm.ShapeMismatchError, match="a stack of no modules"):
        gm.glora_aggregate(empty, rank=2)
    fs = _clients()
    # Typed, and still ValueErrors for code that caught those.
    with pytest.raises(OptionError, match="unknown gauge mode"):
        gm.gauge_fix(fs[0], mode="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown split"):
        gm.readout(gm.glora_aggregate(fs, rank=2), 2, split="x")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="lam"):
        gm.baselines.lora_fair(fs, lam=-1.0)


@pytest.mark.parametrize("kind", ["half", "requires_grad"])
def test_consensus_of_half_and_differentiable_bases(kind: str) -> None:
    fixed = [gm.gauge_fix(f) for f in _clients()]
    ref = gm.consensus_basis(fixed, rank=2)
    if kind == "half":
        given_ = [gm.GaugeFixed(f.U.half(), f.C.half()) for f in fixed]
    else:
        given_ = [gm.GaugeFixed(f.U.clone().requires_grad_(), f.C) for f in fixed]
    got = gm.consensus_basis(given_, rank=2)
    assert not got.U.requires_grad
    assert got.U.dtype == (torch.float32 if kind == "half" else ref.U.dtype)
    # The same subspace, to the precision the bases were stored in.
    P, Q = got.U.double() @ got.U.double().mT, ref.U @ ref.U.mT
    storage = torch.float16 if kind == "half" else ref.U.dtype
    assert float((P - Q).norm()) <= storage_tol(storage, scale=2.0 * 2) / max(ref.gap, 1e-3)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 1e-21),
        (torch.float32, 1e-19),
        (torch.float32, 1e18),
        (torch.float64, 1e-160),
        (torch.float64, 1e150),
    ],
)
def test_the_certificate_holds_near_the_ends_of_the_range(dtype: torch.dtype, scale: float) -> None:
    # Relative residuals do not depend on the scale of the factors: the one at unit scale in
    # float64 is the reference, to the rounding of the dtype the clients are in.
    fs = _clients()
    ref = gm.glora_aggregate(fs, rank=2)
    tiny = [gm.LoRAFactors((f.B * scale).to(dtype), (f.A * scale).to(dtype)) for f in fs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gm.glora_aggregate(tiny, rank=2)
    tol = certificate_tol(dtype, n=2 * (10 + 7 + 6), scale=1.0 / (1.0 - ref.relative_residual))
    if scale * scale >= torch.finfo(got.S.dtype).tiny:
        assert not caught
        assert abs(got.relative_residual - ref.relative_residual) <= tol
    else:  # a subnormal update: the certificate includes what rounding it lost (and a warning
        # says so where that is more than the state dtype's unit roundoff of the mean)
        assert {w.category for w in caught} <= {gm.UnderflowWarning}
        assert abs(got.relative_residual - _measured_at_unit_scale(tiny, got)) <= tol
    assert got.certificate is not None
    want = float(ref.certificate.mean_norm) * scale * scale  # type: ignore[union-attr]
    assert got.certificate.mean_norm == pytest.approx(want, rel=tol)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e-23), (torch.float64, 1e-200)])
def test_an_update_that_underflows_is_certified_as_zero(dtype: torch.dtype, scale: float) -> None:
    # Factors of normal size whose products lie below the dtype's smallest number.
    fs = [gm.LoRAFactors((f.B * scale).to(dtype), (f.A * scale).to(dtype)) for f in _clients()]
    with pytest.warns(gm.UnderflowWarning, match=f"underflows {dtype}"):
        got = gm.glora_aggregate(fs, rank=2)
    assert not bool(got.S.any())  # the update is zero ...
    assert got.relative_residual == 1.0  # ... and its certificate says so
    # Inside the comfortable band nothing is rescaled: results stay bit for bit.
    from glora_math.scaling import shift as _shift

    assert _shift(_clients(), torch.float64) == (0, 0)
    assert _shift(_clients(), torch.float32) == (0, 0)


@pytest.mark.parametrize(
    ("dtype", "scale"), [(torch.float32, 1e19), (torch.bfloat16, 1e30), (torch.float64, 1e200)]
)
def test_gauge_fix_of_an_update_beyond_the_dtype_is_a_typed_error(
    dtype: torch.dtype, scale: float
) -> None:
    f = _clients()[0]
    big = gm.LoRAFactors((f.B * scale).to(dtype), (f.A * scale).to(dtype))
    with pytest.raises(NonFiniteError, match="overflow"):
        gm.gauge_fix(big)


def test_flora_na_with_unbalanced_scales_is_no_worse_than_fedit() -> None:
    # B ~ 1e-200 and A ~ 1e200: B^T B underflows unless the scalar gauge is balanced first;
    # ALS is monotone from FedIT's start, so its error never exceeds FedIT's (its docstring).
    from glora_math.metrics import relative_error

    fs = [gm.LoRAFactors(f.B * 1e-200, f.A * 1e200) for f in _clients()]
    na, fe = gm.baselines.flora_na(fs), gm.baselines.fedit(fs)
    assert relative_error(na, fs) <= relative_error(fe, fs)
    # The same clients at unit scale give the same relative error (to float64 rounding).
    unit = gm.baselines.flora_na(_clients())
    tol = certificate_tol(torch.float64, n=12 + 10 + 6, scale=10.0)
    assert abs(relative_error(na, fs) - relative_error(unit, _clients())) <= tol


def _stacked(modules: list[list[gm.LoRAFactors]]) -> list[gm.LoRAFactors]:
    """Module j's clients as the j-th entry of a stack (clients in the same order)."""
    return [
        gm.LoRAFactors(
            torch.stack([m[i].B for m in modules]), torch.stack([m[i].A for m in modules])
        )
        for i in range(len(modules[0]))
    ]


@pytest.mark.parametrize(
    ("dtype", "scale"),
    # outside the comfortable band; at 1e-160 the update (scale^2) is subnormal in float64
    [
        (torch.float32, 1e-17),
        (torch.float32, 1e18),
        (torch.float64, 1e-150),
        (torch.float64, 1e-160),
        (torch.float64, 1e150),
    ],
)
def test_each_module_of_a_stack_is_rescaled_on_its_own(dtype: torch.dtype, scale: float) -> None:
    # One power of 2 for a whole stack left a module far smaller than the others outside the
    # comfortable band: next to a unit-size module, float64 clients of 1e-160 entries were
    # certified 0.725368 for 0.725355, and of 1e-162 entries 1.0 with half the mean norm.
    # Each module is now rescaled on its own: its relative residual is the one at unit scale
    # in float64, to the dtype's rounding.
    unit = [_clients(seed=0), _clients(seed=1)]
    scaled = [
        [gm.LoRAFactors(f.B.to(dtype), f.A.to(dtype)) for f in unit[0]],
        [gm.LoRAFactors((f.B * scale).to(dtype), (f.A * scale).to(dtype)) for f in unit[1]],
    ]
    refs = [gm.glora_aggregate(m, rank=2, side="left") for m in unit]
    for ref in refs:
        assert ref.certificate is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        each = gm.glora_aggregate_stack(_stacked(scaled), rank=2, side="left")
        whole = gm.glora_aggregate(_stacked(scaled), rank=2, side="left")
    # nothing to say, but that a subnormal update rounds (module 1, once per call)
    subnormal = scale * scale < torch.finfo(dtype).tiny
    said = [(w.category, w.message.modules) for w in caught]  # type: ignore[union-attr]
    assert said == ([(gm.UnderflowWarning, (1,))] * 2 if subnormal else [])
    assert whole.module_certificates is not None
    assert whole.certificate is not None
    for j, (ref, c) in enumerate(zip(refs, (1.0, scale * scale), strict=True)):
        tol = certificate_tol(dtype, n=2 * (12 + 10 + 6), scale=1.0 / (1.0 - ref.relative_residual))
        for cert, state in (
            (each[j].certificate, each[j]),
            (whole.module_certificates[j], whole.module(j)),
        ):
            assert cert is not None
            assert cert.mean_norm == pytest.approx(ref.certificate.mean_norm * c, rel=tol)  # type: ignore[union-attr]
            # the certificate is the returned update's error ...
            assert abs(cert.relative_residual - _measured_at_unit_scale(scaled[j], state)) <= tol
            if c >= torch.finfo(dtype).tiny:  # ... which, in the normal range, is the unit one's
                assert abs(cert.relative_residual - ref.relative_residual) <= tol, (j, cert)
        if c < torch.finfo(dtype).tiny:  # a subnormal update keeps only some of its digits
            continue
        # the update itself, scaled back to unit size (scale is not a power of 2: the scaled
        # clients are rounded in dtype, which the tolerance covers)
        got = each[j].delta().double() / c
        kappa = max(float(torch.linalg.cond(x)) for f in unit[j] for x in (f.B, f.A))
        size = sum(float(f.B.norm() * f.A.norm()) for f in unit[j]) / len(unit[j])
        utol = aggregate_tol(dtype, n=12 + 10 + 6, kappa=kappa, gap=ref.gap, scale=size)
        assert float((got - ref.delta()).norm()) <= utol, j
    # The stack's certificate combines the modules' at their own scales.
    n = [r.certificate.mean_norm * c for r, c in zip(refs, (1.0, scale * scale), strict=True)]  # type: ignore[union-attr]
    res = [r.relative_residual * m for r, m in zip(refs, n, strict=True)]
    want_total = math.hypot(*res) / math.hypot(*n)
    assert abs(whole.certificate.relative_residual - want_total) <= certificate_tol(
        dtype, n=2 * (12 + 10 + 6), scale=2.0
    )


def test_a_module_of_a_stack_that_underflows_is_lost_by_name() -> None:
    # Float32 module 1 of 1e-23 entries: its mean (about 1e-46) is below float32's smallest
    # number; module 0 is of unit size. Module 1 alone is certified lost, and the warning
    # names its position in the stack; module 0 is untouched. (With one shift for the whole
    # stack, module 1 was certified 0.725 with its update lost, and nothing was said.)
    dtype = torch.float32
    unit = [_clients(seed=0), _clients(seed=1)]
    scaled = [
        [gm.LoRAFactors(f.B.to(dtype), f.A.to(dtype)) for f in unit[0]],
        [gm.LoRAFactors((f.B * 1e-23).to(dtype), (f.A * 1e-23).to(dtype)) for f in unit[1]],
    ]
    with pytest.warns(gm.UnderflowWarning, match="underflows torch.float32") as caught:
        each = gm.glora_aggregate_stack(_stacked(scaled), rank=2, side="left")
    assert [w.message.modules for w in caught] == [(1,)]  # type: ignore[union-attr]
    assert str(caught[0].message).startswith("module 1: ")
    assert {w.filename for w in caught} == {__file__}
    assert not bool(each[1].S.any())
    assert each[1].relative_residual == 1.0
    ref = gm.glora_aggregate(unit[0], rank=2, side="left")
    tol = certificate_tol(dtype, n=2 * (12 + 10 + 6), scale=1.0 / (1.0 - ref.relative_residual))
    assert abs(each[0].relative_residual - ref.relative_residual) <= tol


@pytest.mark.parametrize(
    ("dtype", "kb", "ka"),
    [(torch.float32, -100, -60), (torch.float32, 70, 60), (torch.bfloat16, 80, 70),
     (torch.float64, -600, -500), (torch.float64, 500, -400)],
)  # fmt: skip
def test_flora_na_runs_at_unit_scale_and_rescales_exactly(
    dtype: torch.dtype, kb: int, ka: int
) -> None:
    # In float32, clients of 1e-30 entries gave FLoRA-NA a zero update (B^T B underflowed)
    # and 1e30 a typed overflow. Its steps are homogeneous in the B_i and the
    # A_i, so it runs at unit scale: clients whose largest entries are in [1/2, 1) (unit
    # scale exactly), times 2^kb and 2^ka, give that update's product times 2^(kb + ka), bit
    # for bit, its factors balanced.
    from glora_math.scaling import shift, times_pow2

    fs = _clients()
    top_b = max(float(f.B.abs().max()) for f in fs)
    top_a = max(float(f.A.abs().max()) for f in fs)
    eb, ea = math.frexp(top_b)[1], math.frexp(top_a)[1]
    unit = [gm.LoRAFactors((f.B * 2.0**-eb).to(dtype), (f.A * 2.0**-ea).to(dtype)) for f in fs]
    far = [gm.LoRAFactors(times_pow2(f.B, kb), times_pow2(f.A, ka)) for f in unit]
    assert shift(far, torch.float32 if dtype == torch.bfloat16 else dtype) == (kb, ka)
    want = gm.baselines.flora_na(unit)
    got = gm.baselines.flora_na(far)
    # the power of 2 is split so that B and A end balanced
    top = [math.frexp(float(x.abs().max()))[1] for x in (got.B, got.A, want.B)]
    assert abs(top[0] - top[1]) <= 1
    x = top[0] - top[2]
    assert torch.equal(got.B, times_pow2(want.B, x))
    assert torch.equal(got.A, times_pow2(want.A, kb + ka - x))
    assert bool(got.B.any())
    assert bool(got.A.any())


@pytest.mark.parametrize("stacked", [False, True])
def test_an_update_beyond_float64_is_a_typed_error(stacked: bool) -> None:
    # The certificate's mean norm (1e600) was scaled back in Python floats and raised a raw
    # OverflowError before the typed check on the state.
    fs = [gm.LoRAFactors(f.B * 1e300, f.A * 1e300) for f in _clients()]
    if stacked:
        fs = _stacked([_clients(seed=1), fs])
    with pytest.raises(NonFiniteError, match="overflowed"):
        gm.glora_aggregate(fs, rank=2, side="left")
    if stacked:
        with pytest.raises(NonFiniteError, match="overflowed"):
            gm.glora_aggregate_stack(fs, rank=2)


@pytest.mark.parametrize("scale", [1e-158, 1e-160, 1e-161, 1e-162])
def test_an_update_partly_below_the_normal_range_is_certified_with_its_rounding(
    scale: float,
) -> None:
    # Float64 clients of 1e-162 entries: the mean (about 1e-324) keeps a few subnormal
    # entries of S. The certificate of the unit-scale state said 0.574 where the update's
    # error was 0.949. Rounding S loses dS inside the basis, orthogonal to the residual, so
    # the certificate is hypot(residual, ||dS||) / ||W_bar||: the measured error, to rounding.
    fs = [gm.LoRAFactors(f.B * scale, f.A * scale) for f in _clients()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.UnderflowWarning)
        state = gm.glora_aggregate(fs, rank=2, side="left")
    measured = _measured_at_unit_scale(fs, state)
    tol = certificate_tol(torch.float64, n=2 * (12 + 10 + 6), scale=2.0)
    assert abs(state.relative_residual - measured) <= tol


def _measured_at_unit_scale(fs: list[gm.LoRAFactors], state: gm.ServerState) -> float:
    """The relative error of a state's update, measured in float64 after scaling the clients
    and the update to unit size by powers of 2 (exact, also for subnormal S)."""
    from glora_math.scaling import times_pow2

    kb = -math.frexp(max(float(f.B.abs().max()) for f in fs))[1]
    ka = -math.frexp(max(float(f.A.abs().max()) for f in fs))[1]
    W = sum(times_pow2(f.B.double(), kb) @ times_pow2(f.A.double(), ka) for f in fs)
    assert isinstance(W, torch.Tensor)
    W = W / len(fs)
    update = state.U.double() @ times_pow2(state.S.double(), kb + ka)
    err = W - (update if state.side == "left" else update.mT)
    return float(err.norm() / W.norm())


def test_a_stack_whose_modules_are_all_lost_is_certified_lost() -> None:
    # Every module's mean is below float64's range (its norm 0.0, its residual 1): the stack's
    # certificate is 1 too (it was 0.0: no norm weighed), and max_residual says so.
    stack = _stacked([[gm.LoRAFactors(f.B * 1e-200, f.A * 1e-200) for f in _clients(seed=s)]
                      for s in (0, 1)])  # fmt: skip
    for sketch in (None, gm.Sketch(certificate="estimate")):
        with pytest.warns(gm.GloraWarning) as caught:
            st = gm.glora_aggregate(stack, rank=2, side="left", sketch=sketch, max_residual=0.5)
        assert st.certificate is not None
        assert st.certificate.relative_residual == 1.0
        if sketch is not None:
            assert st.certificate.bound == 1.0
        said = sorted((w.category.__name__, w.message.modules) for w in caught)  # type: ignore[union-attr]
        assert said == [("ResidualWarning", (0,)), ("ResidualWarning", (1,)),
                        ("UnderflowWarning", (0,)), ("UnderflowWarning", (1,))]  # fmt: skip
    one = [gm.LoRAFactors(f.B * 1e-200, f.A * 1e-200) for f in _clients()]
    with pytest.warns(gm.GloraWarning) as caught:
        gm.glora_aggregate(one, rank=2, max_residual=0.5)
    assert {w.category for w in caught} == {ResidualWarning, gm.UnderflowWarning}


def test_a_stack_whose_total_mean_norm_exceeds_float64_is_certified() -> None:
    # Two modules whose means have norm 1.5e308 each (finite) and different shifts: their
    # total (2.1e308) is beyond float64, which raised a raw OverflowError. It is infinite, and
    # the stack's relative residual lies between the modules'.
    unit = [_clients(seed=0), _clients(seed=1)]
    modules = []
    for j, clients in enumerate(unit):
        W = sum(f.B @ f.A for f in clients) / len(clients)
        assert isinstance(W, torch.Tensor)
        c = math.sqrt(1.5e308 / float(W.norm()))
        modules.append([gm.LoRAFactors(f.B * c * (1.0 + j), f.A * c / (1.0 + j)) for f in clients])
    st = gm.glora_aggregate(_stacked(modules), rank=2, side="left")
    assert st.certificate is not None
    assert st.module_certificates is not None
    assert st.certificate.mean_norm == math.inf
    rhos = [c.relative_residual for c in st.module_certificates]
    assert min(rhos) <= st.certificate.relative_residual <= max(rhos)


def test_choices_and_totals_are_made_on_the_certificates_as_returned() -> None:
    # Float64 clients of 1e-162 entries: S is partly subnormal, and its rounding changes the
    # certificates. Found by review: side="auto" kept right (0.979) where left certified
    # 0.934, rank="auto" missed tol=0.05 (0.934) without a warning, and a stack's total was
    # combined from scaled-back norms with a bit or two each (0.651 for a measured 0.734).
    fs = [gm.LoRAFactors(f.B * 1e-162, f.A * 1e-162) for f in _clients()]
    tol = certificate_tol(torch.float64, n=2 * (12 + 10 + 6), scale=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.UnderflowWarning)
        both = [gm.glora_aggregate(fs, rank=2, side=s) for s in ("left", "right")]
        auto = gm.glora_aggregate(fs, rank=2, side="auto")
    assert auto.relative_residual == min(s.relative_residual for s in both)
    assert abs(auto.relative_residual - _measured_at_unit_scale(fs, auto)) <= tol
    with pytest.warns(gm.GloraWarning) as caught:
        st = gm.glora_aggregate(fs, rank="auto", tol=0.05)
    assert st.relative_residual > 0.05
    assert any("could not meet tol=5.000e-02" in str(w.message) for w in caught)
    assert any("partly below torch.float64's normal range" in str(w.message) for w in caught)
    # A stack of two such modules: the total is the measured total, at unit scale.
    mods = [fs, [gm.LoRAFactors(f.B * 1e-162, f.A * 1e-162) for f in _clients(seed=1)]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.UnderflowWarning)
        whole = gm.glora_aggregate(_stacked(mods), rank=1, side="left")
    assert whole.certificate is not None
    errs, norms = [], []
    for j, m in enumerate(mods):
        rho = _measured_at_unit_scale(m, whole.module(j))
        W = sum(f.B * 2.0**538 @ (f.A * 2.0**538) for f in m)  # exact powers of 2
        assert isinstance(W, torch.Tensor)
        norms.append(float(W.norm()) / len(m))
        errs.append(rho * norms[-1])
    want = math.hypot(*errs) / math.hypot(*norms)
    assert abs(whole.certificate.relative_residual - want) <= tol


def test_flora_na_keeps_an_update_that_fits_when_its_clients_cancel() -> None:
    # Found by review: float32 clients near 2^120 whose B's cancel to 2^-20 of their size.
    # ALS at unit scale ends with B small and A large; scaled back by the clients' own split,
    # A overflowed to Inf although the update (about 2^220 spread over two factors) fits.
    from glora_math.scaling import times_pow2

    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    B1, A1 = torch.randn(12, 2, generator=g, dtype=f64), torch.randn(2, 10, generator=g, dtype=f64)
    B2 = -B1 + 2.0**-20 * torch.randn(12, 2, generator=g, dtype=f64)
    A2 = A1 + 0.1 * torch.randn(2, 10, generator=g, dtype=f64)
    # largest entries in [1/2, 1): the clients at 2^120 are brought back to exactly these
    eb = math.frexp(float(torch.cat([B1, B2]).abs().max()))[1]
    ea = math.frexp(float(torch.cat([A1, A2]).abs().max()))[1]
    unit = [gm.LoRAFactors(times_pow2(B, -eb).float(), times_pow2(A, -ea).float())
            for B, A in ((B1, A1), (B2, A2))]  # fmt: skip
    far = [gm.LoRAFactors(times_pow2(f.B, 120), times_pow2(f.A, 120)) for f in unit]
    got, want = gm.baselines.flora_na(far), gm.baselines.flora_na(unit)
    assert bool(torch.isfinite(got.B).all())
    assert bool(torch.isfinite(got.A).all())
    # the same product as at unit scale, times 2^240, exactly (scaled down to compare)
    prod = times_pow2(got.B.double(), -120) @ times_pow2(got.A.double(), -120)
    assert torch.equal(prod, want.B.double() @ want.A.double())


@pytest.mark.parametrize("scale", [1e-200, 1e-162, 1e100, 1e150])
def test_round_errors_are_measured_at_unit_scale(scale: float) -> None:
    # Found by review: errors() measured float64 clients as they were: a module of 1e-200
    # entries (its update lost, certified 1) reported 0.0, and round_error summed squared
    # mean norms in Python floats (OverflowError at 1e100 entries). Beyond float64's band the
    # clients are measured at unit scale, and the round pools at one power-of-2 scale.
    from glora_math.compare import round_error

    modules = {"a": _clients(seed=0), "b": [gm.LoRAFactors(f.B * scale, f.A * scale)
                                            for f in _clients(seed=1)]}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.UnderflowWarning)
        rnd = gm.aggregate_modules(modules, operator="glora", rank=2)
    errs = rnd.errors()
    certs = rnd.certificates()
    tol = certificate_tol(torch.float64, n=2 * (12 + 10 + 6), scale=2.0)
    for name in modules:
        assert abs(errs[name] - certs[name]) <= tol, name
    pooled = round_error(rnd.results, modules)
    assert pooled.certified is not None
    assert math.isfinite(pooled.relative)
    assert abs(pooled.relative - pooled.certified) <= tol
    assert pooled.worst_module == max(errs.values())


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 1e-17),
        (torch.float32, 1e18),
        (torch.float64, 1e-160),
        (torch.float64, 1e150),
    ],
)
def test_the_eckart_young_error_holds_at_any_scale(dtype: torch.dtype, scale: float) -> None:
    # Found by review: the tail of the spectrum was squared in the working dtype (0.0 at
    # float32 1e-17, inf at 1e18 though the error fits). It is the tail of S's spectrum
    # computed at unit scale (a power of 2), to the singular values' absolute error.
    from glora_math.scaling import times_pow2

    far = [gm.LoRAFactors((f.B * scale).to(dtype), (f.A * scale).to(dtype)) for f in _clients()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.UnderflowWarning)
        got = gm.glora_aggregate(far, rank=4)
    S = got.S.double()
    e = math.frexp(float(S.abs().max()))[1]
    unit = times_pow2(S, -e)
    want = float(torch.linalg.svdvals(unit)[2:].norm())
    have = math.ldexp(gm.eckart_young_error(got, 2), -e)
    assert want > 0.0
    # the singular values' absolute error, and the spacing of float64 where the result is
    # subnormal (at 1e-160 it is about 1e-320: a float holds it to a few bits)
    tol = certificate_tol(dtype, n=sum(S.shape), scale=1.0) * float(unit.norm())
    assert abs(have - want) <= tol + math.ldexp(math.ulp(0.0), -e)


def test_without_a_certificate_a_lost_or_partly_lost_update_is_still_said() -> None:
    # Found by review: with certify=False the partial loss was measured against no norm and
    # never reported, and a lost update's message gave the mean norm as 0.
    fs = [gm.LoRAFactors(f.B * 1e-162, f.A * 1e-162) for f in _clients()]
    with pytest.warns(gm.UnderflowWarning, match="partly below") as caught:
        gm.glora_aggregate(fs, rank=2, side="left", certify=False)
    assert str(caught[0].message).endswith(" of the update")  # no certificate to include it
    lost = [gm.LoRAFactors(f.B * 1e-200, f.A * 1e-200) for f in _clients()]
    with pytest.warns(gm.UnderflowWarning, match="returned as zero") as caught:
        gm.glora_aggregate(lost, rank=2, side="left", certify=False)
    assert "(the update has norm 0.000e+00" not in str(caught[0].message)


def _unit_errors(
    fs: list[gm.LoRAFactors], update: gm.LoRAFactors, rank: int
) -> tuple[float, float, float]:
    """The relative errors of ``update`` and of the exact rank-``rank`` truncation ``W_R`` of
    the clients' mean, and ``||update - W_R||``: dense in float64 after scaling everything to
    unit size by powers of 2 (exact, also for subnormal entries)."""
    from glora_math.scaling import times_pow2

    kb = -math.frexp(max(float(f.B.abs().max()) for f in fs))[1]
    ka = -math.frexp(max(float(f.A.abs().max()) for f in fs))[1]
    W = sum(times_pow2(f.B.double(), kb) @ times_pow2(f.A.double(), ka) for f in fs)
    assert isinstance(W, torch.Tensor)
    W = W / len(fs)
    mine = times_pow2(update.B.double(), kb + ka) @ update.A.double()
    U, s, Vh = torch.linalg.svd(W)
    W_R = (U[:, :rank] * s[:rank]) @ Vh[:rank]
    norm = float(W.norm())
    return (float((W - mine).norm()) / norm, float(s[rank:].norm()) / norm,
            float((mine - W_R).norm()) / norm)  # fmt: skip


@pytest.mark.parametrize("op_name", ["flexlora", "svd_mean"])
@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float64, 1e-158),
        (torch.float64, 1e-160),
        (torch.float64, 1e-162),
        (torch.float64, 1e150),
        (torch.float32, 1e-21),
        (torch.float32, 1e18),
    ],
)
def test_a_truncation_near_the_ends_of_the_range_is_the_unit_problems(
    op_name: str, dtype: torch.dtype, scale: float
) -> None:
    # Float64 clients of 1e-162 entries: FlexLoRA's U s rounded to subnormals, an error of
    # 1.03 of the mean (worse than a zero update) against 0.615 for the exact truncation,
    # certified but silent. At unit scale, scaled back with the power of 2 split between B
    # and A, the update is the exact truncation to the dtype's rounding, and nothing is said.
    fs = [gm.LoRAFactors((f.B * scale).to(dtype), (f.A * scale).to(dtype)) for f in _clients()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gm.aggregate_modules({"m": fs}, operator=op_name, rank=2).results["m"]
    measured, ideal, moved = _unit_errors(fs, got.update, 2)
    tol = certificate_tol(dtype, n=2 * (12 + 10 + 6), scale=2.0)
    assert got.certificate is not None
    assert abs(got.certificate.relative_residual - measured) <= tol
    assert abs(measured - ideal) <= tol
    # the exact truncation itself, to the rounding of the SVD (a gap of 0.2 or more here)
    assert moved <= aggregate_tol(dtype, n=12 + 10, kappa=1.0, gap=0.2, scale=2.0)


def test_in_band_clients_get_the_same_truncation_bit_for_bit() -> None:
    # Nothing is rescaled inside the comfortable band: the factors are the ones the spectrum
    # of the mean gives directly, for both splits (FlexLoRA's U s, Vh; svd_mean's balanced).
    from glora_math import baselines as bl

    fs = _clients()
    for op_name, split in (("flexlora", "left"), ("svd_mean", "balanced")):
        got = gm.aggregate_modules({"m": fs}, operator=op_name, rank=2).results["m"].update
        U, s, Vh = bl.spectrum_of_mean(fs, None)
        want = bl.truncate_svd(U[:, :2], s[:2], Vh[:2], 2, torch.float64, split=split)
        assert torch.equal(got.B, want.B)
        assert torch.equal(got.A, want.A)


def test_an_update_stored_partly_below_float16s_normal_range_is_said() -> None:
    # Float16 clients of 3e-4 entries: the truncation is computed in float32, and stored in
    # float16 its U s loses 17% of the mean to subnormals. The warning states what storage
    # lost, which the certificate (measured) includes.
    fs = [gm.LoRAFactors((f.B * 3e-4).half(), (f.A * 3e-4).half()) for f in _clients(r=2)]
    with pytest.warns(gm.UnderflowWarning, match="partly below torch.float16's normal range") as w:
        got = gm.aggregate_modules({"m": fs}, operator="flexlora", rank=6).results["m"]
    measured, ideal, _ = _unit_errors(fs, got.update, 6)
    assert ideal <= certificate_tol(torch.float32, n=12 + 10, scale=2.0)  # rank 6 is all of it
    assert got.certificate is not None
    tol = certificate_tol(torch.float32, n=2 * (12 + 10 + 6), scale=2.0)
    assert abs(got.certificate.relative_residual - measured) <= tol
    (said,) = [str(x.message) for x in w if "partly below" in str(x.message)]
    assert said.startswith("module 'm': ")
    lost = float(said.split("lost ")[1].split(" ")[0])
    # what storage lost is the error here (the truncation is exact); printed to 4 digits
    assert lost == pytest.approx(measured, rel=5e-4, abs=tol)
    assert lost > storage_tol(torch.float16, scale=2.0)


@pytest.mark.parametrize(
    ("dtype", "scale", "cancel"),
    [(torch.float64, 1e150, 0.0), (torch.float64, 1e150, 1e-11), (torch.float32, 1e18, 1e-5)],
)
def test_clients_that_cancel_far_from_unit_scale_are_not_said_to_underflow(
    dtype: torch.dtype, scale: float, cancel: float
) -> None:
    # Found by review: a check against a second SVD blamed the range for what cancellation
    # costs (two clients that sum to zero at 1e150: "1.904 of the mean lost").
    c = _clients(n=2)
    other = gm.LoRAFactors(-c[0].B * (1 - cancel) + cancel * c[1].B, c[0].A)
    fs = [gm.LoRAFactors((f.B * scale).to(dtype), f.A.to(dtype)) for f in (c[0], other)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for op_name in ("flexlora", "svd_mean"):
            gm.aggregate_modules({"m": fs}, operator=op_name, rank=2)
