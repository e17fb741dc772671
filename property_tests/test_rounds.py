"""One round over a whole adapter in the core: ``glora_math.aggregate_modules``.

It must equal the operator called module by module, validate each module's clients and
normalise the weights exactly once (counted here), look the operator up once, and name the
module in every error and warning.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import glora_math as gm
from glora_math import validation
from glora_math.compare import round_error
from glora_math.errors import (
    EmptyClientsError,
    NonFiniteError,
    OptionError,
    ResidualWarning,
    ShapeMismatchError,
)
from glora_math.operators import get_operator, list_operators
from glora_math.testing.strategies import gaussian_clients
from glora_math.tolerances import product_tol

#: Three modules: two of one shape (batched together where the operator can) and one other.
_SHAPES = {"q": (8, 6), "v": (8, 6), "o": (5, 7)}
_WEIGHTS = [3.0, 1.0, 2.0]


def _modules(name: str, seed: int = 0) -> dict[str, list[gm.LoRAFactors]]:
    op = get_operator(name)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d, k) in _SHAPES.items():
        out[m] = op.protocol(gaussian_clients(3, d, 2, k, generator=g))
    return out


class _Counter:
    def __init__(self, fn: object) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self.fn(*args, **kwargs)  # type: ignore[operator]


@pytest.mark.parametrize("name", list_operators())
def test_one_validation_per_module_and_one_normalisation_per_round(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = _modules(name)
    checks = _Counter(validation._check_clients)
    norms = _Counter(validation._normalize)
    monkeypatch.setattr(validation, "_check_clients", checks)
    monkeypatch.setattr(validation, "_normalize", norms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.GloraWarning)
        rnd = gm.aggregate_modules(modules, _WEIGHTS, operator=name, rank=2)
    assert checks.calls == len(modules)
    assert norms.calls == 1
    assert list(rnd.results) == list(modules)
    assert rnd.operator is get_operator(name)


@pytest.mark.parametrize("name", list_operators())
def test_the_round_equals_the_operator_module_by_module(name: str) -> None:
    modules = _modules(name, seed=1)
    op = get_operator(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.GloraWarning)
        rnd = gm.aggregate_modules(modules, _WEIGHTS, operator=op, rank=2)
        for m, fs in modules.items():
            alone = op(fs, _WEIGHTS, rank=2)
            got = rnd.results[m]
            d, k = _SHAPES[m]
            scale = sum(float(f.B.norm() * f.A.norm()) for f in fs)
            # Same mathematics; the weights and the batched route round differently.
            tol = product_tol(torch.float64, n=d + k + 6, scale=scale, kappa=1e3)
            assert float((got.dense() - alone.dense()).norm()) <= tol
            if alone.client_factors is None:
                assert rnd.client_modules == [None] * 3
                continue
            for i, cf in enumerate(alone.client_factors):
                mine = rnd.client_modules[i]
                assert mine is not None
                assert float((mine[m].delta() - cf.delta()).norm()) <= tol


@pytest.mark.parametrize("name", list_operators())
def test_the_round_measures_every_operator_against_each_module_mean(name: str) -> None:
    """``errors()``: per module ``||update - W_bar|| / ||W_bar||`` for every operator, certified
    or not, equal to the dense computation and, for the GLoRA family, to the certificate (of the
    low-rank update)."""
    modules = _modules(name, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.GloraWarning)
        rnd = gm.aggregate_modules(modules, _WEIGHTS, operator=name, rank=2)
    errors = rnd.errors()
    assert list(errors) == list(modules)
    p = [w / sum(_WEIGHTS) for w in _WEIGHTS]
    num = den = worst_tol = 0.0
    for m, fs in modules.items():
        mean = sum(pi * (f.B.double() @ f.A.double()) for pi, f in zip(p, fs, strict=True))
        assert isinstance(mean, torch.Tensor)
        res = rnd.results[m]
        dense = float((res.dense().double() - mean).norm() / mean.norm())
        d, k = _SHAPES[m]
        dtype = fs[0].B.dtype
        scale = sum(pi * float(f.B.norm() * f.A.norm()) for pi, f in zip(p, fs, strict=True))
        scale += float(res.update.B.norm() * res.update.A.norm())
        # Two roundings of one difference (from factors; densely): each within product_tol of
        # the norms involved, relative to ||W_bar||.
        dims = d + k + sum(f.rank for f in fs) + res.update.rank
        tol = 2 * product_tol(dtype, n=dims, scale=scale) / float(mean.norm())
        assert abs(errors[m] - dense) <= tol, (m, errors[m], dense)
        if res.certificate is not None and res.residual is None:
            # The certificate is of the low-rank update; a folded dense residual (the
            # ``_residual`` variants) is counted by errors() only.
            assert abs(errors[m] - res.certificate.relative_residual) <= tol
        num += (dense * float(mean.norm())) ** 2
        den += float(mean.norm()) ** 2
        worst_tol = max(worst_tol, tol)
    # The whole round's error pools the modules by their mean's norm (server metrics).
    whole = round_error(rnd.results, rnd.clients, rnd.weights)
    assert abs(whole.worst_module - max(errors.values())) <= worst_tol
    assert abs(whole.relative - (num / den) ** 0.5) <= worst_tol


def test_errors_and_warnings_name_the_module() -> None:
    modules = _modules("glora")
    bad = dict(modules)
    bad["o"] = [modules["o"][0], modules["o"][1], gm.LoRAFactors(
        modules["o"][2].B * float("nan"), modules["o"][2].A)]  # fmt: skip
    with pytest.raises(NonFiniteError) as err:
        gm.aggregate_modules(bad, operator="glora", rank=2)
    assert (err.value.module, err.value.client) == ("o", 2)
    short = dict(modules, v=modules["v"][:2])
    with pytest.raises(ShapeMismatchError) as err2:
        gm.aggregate_modules(short, operator="fedit", rank=2)
    assert err2.value.module == "v"
    with pytest.raises(OptionError, match="bogus"):
        gm.aggregate_modules(modules, operator="glora", rank=2, options={"bogus": 1.0})
    with pytest.raises(EmptyClientsError):
        gm.aggregate_modules({}, operator="glora", rank=2)
    with pytest.raises(gm.GloraError, match="unknown operator"):
        gm.aggregate_modules(modules, operator="nope", rank=2)
    # Independent clients at R = r keep little of the mean: one warning per module, by name,
    # pointing at the caller.
    with pytest.warns(ResidualWarning) as caught:
        gm.aggregate_modules(modules, operator="glora", rank=2, options={"max_residual": 1e-3})
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        "module 'o'",
        "module 'q'",
        "module 'v'",
    ]
    assert {w.filename for w in caught} == {__file__}
    assert "worst certified residual" in repr(
        gm.aggregate_modules(modules, operator="glora", rank=2)
    )


@pytest.mark.parametrize("name", ["glora", "glora_auto", "flexlora"])
def test_an_operators_own_warnings_name_the_module_and_point_at_the_caller(name: str) -> None:
    # Inside a batched call the operator knows modules only by stack position; the round
    # names them. q and v (one shape: batched together where the operator can) and o: R = 7
    # exceeds what the clients span (6 in q and v, at most 6 in o); v's float32 entries of
    # 1e-23 give a mean (about 1e-46) below float32's smallest number. (FlexLoRA returns that
    # mean, split between B and A; it loses part of it from subnormal clients, 1e-44.)
    g = torch.Generator().manual_seed(0)
    tiny = 1e-44 if name == "flexlora" else 1e-23
    modules = {
        m: [
            gm.LoRAFactors(f.B.float() * (tiny if m == "v" else 1.0),
                           f.A.float() * (tiny if m == "v" else 1.0))
            for f in gaussian_clients(3, d, 2, k, generator=g)
        ]
        for m, (d, k) in _SHAPES.items()
    }  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm.aggregate_modules(modules, operator=name, rank=7)
    said = sorted((w.category.__name__, w.message.modules) for w in caught)  # type: ignore[union-attr]
    lost = ("UnderflowWarning", ("v",))
    if name == "flexlora":  # truncates at the clients' span without a warning
        assert said == [lost]
    else:
        assert said == sorted(
            [("RankClampedWarning", ("q", "v")), ("RankClampedWarning", ("o",)), lost]
        )
    assert {w.filename for w in caught} == {__file__}
    for w in caught:
        where = ", ".join(repr(m) for m in w.message.modules)  # type: ignore[union-attr]
        assert str(w.message).startswith(f"module{'s' * (len(w.message.modules) > 1)} {where}: ")  # type: ignore[union-attr]


def test_other_warnings_meet_the_filters_where_they_were_raised() -> None:
    # aggregate_modules records an operator's warnings to name them; a warning that is not
    # glora-math's must still meet a module= filter where it was raised (re-emitted with
    # warn_explicit it was matched against the file name instead, and shown). A GloraWarning
    # subclass with its own signature comes out as it was, not as an error in the round.
    base = get_operator("fedit")

    class Odd(gm.GloraWarning):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"odd {a} {b}")

    def fn(fs, p, ctx):  # type: ignore[no-untyped-def]
        warnings.warn("from the operator", UserWarning, stacklevel=1)
        warnings.warn(Odd(1, 2), stacklevel=1)
        return base.fn(fs, p, ctx)

    op = dataclasses.replace(base, name="noisy", fn=fn)
    modules = _modules("fedit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "from the operator", UserWarning, module=__name__)
        gm.aggregate_modules(modules, operator=op, rank=2)
    assert [str(w.message) for w in caught] == ["odd 1 2"] * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm.aggregate_modules(modules, operator=op, rank=2)
    plain = [w for w in caught if w.category is UserWarning]
    assert [(str(w.message), w.filename) for w in plain] == [("from the operator", __file__)] * 3


def test_results_print_shapes_never_entries() -> None:
    """A printed round, result or factor names shapes and the certificate, not the tensors."""
    g = torch.Generator().manual_seed(3)
    clients = [(torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g)) for _ in "abc"]
    modules = {"q": [gm.LoRAFactors(B, A) for B, A in clients]}
    rnd = gm.aggregate_modules(modules, operator="fedex_lora", rank=4)
    text = repr(rnd.results["q"])
    assert text.startswith("AggregateResult(update=LoRAFactors(d=64, r=4, k=48, dtype=float32)")
    assert "residual=(64, 48)" in text
    assert "tensor(" not in text
    stack = gm.LoRAFactors(torch.zeros(5, 64, 4), torch.zeros(5, 4, 48))
    assert repr(stack) == "LoRAFactors(stack=(5,), d=64, r=4, k=48, dtype=float32)"
    cert = repr(gm.aggregate_modules(modules, operator="glora", rank=4).results["q"])
    assert "certificate=" in cert
    assert "tensor(" not in cert


def test_options_from_a_command_line() -> None:
    from glora_math.operators import parse_options

    assert parse_options("lam=0.02, steps=10") == {"lam": 0.02, "steps": 10.0}
    assert parse_options("") == {}
    for bad in ("lam", "lam=x", "=1", "lam=1,lam=2", "lam=nan", "2x=1"):
        with pytest.raises(OptionError):
            parse_options(bad)


def test_the_old_registry_name_is_a_deprecated_alias() -> None:
    import importlib
    import sys

    sys.modules.pop("glora_math.registry", None)
    with pytest.warns(DeprecationWarning, match="glora_math.operators"):
        registry = importlib.import_module("glora_math.registry")
    assert registry.get_operator is get_operator
    assert registry.list_operators() == list_operators()
