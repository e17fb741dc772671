"""Bad input gets a typed GloraError naming the client and what is wrong."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glora_math import (
    DtypeError,
    EmptyClientsError,
    GloraError,
    LoRAFactors,
    NonFiniteError,
    RankError,
    ShapeMismatchError,
    WeightError,
    fedit,
    gauge_fix,
    glora_aggregate,
    readout,
)

from .strategies import problems


@given(
    problems(min_clients=2),
    st.data(),
    st.sampled_from(["B", "A"]),
    st.sampled_from([float("nan"), float("inf"), -float("inf")]),
)
def test_non_finite_entries_name_the_client(pb, data, which, bad) -> None:  # type: ignore[no-untyped-def]
    j = data.draw(st.integers(0, pb.n - 1), label="client")
    f = pb.factors[j]
    X = (f.B if which == "B" else f.A).clone()
    X.view(-1)[data.draw(st.integers(0, X.numel() - 1), label="entry")] = bad
    clients = list(pb.factors)
    clients[j] = LoRAFactors(X, f.A) if which == "B" else LoRAFactors(f.B, X)
    with pytest.raises(NonFiniteError, match=rf"client {j}: {which} has 1 NaN/Inf") as info:
        glora_aggregate(clients, rank=1)
    assert info.value.client == j


@given(problems(min_clients=2), st.data())
def test_shape_mismatch_names_the_client(pb, data) -> None:  # type: ignore[no-untyped-def]
    j = data.draw(st.integers(1, pb.n - 1), label="client")
    f = pb.factors[j]
    clients = list(pb.factors)
    clients[j] = LoRAFactors(torch.cat([f.B, f.B[:1]]), f.A)  # d + 1 rows
    with pytest.raises(ShapeMismatchError, match=rf"client {j}: update shape") as info:
        glora_aggregate(clients, rank=1)
    assert info.value.client == j


@given(problems(min_clients=2), st.data(), st.sampled_from([-1.0, float("nan"), float("inf")]))
def test_bad_weights_name_the_client(pb, data, bad) -> None:  # type: ignore[no-untyped-def]
    j = data.draw(st.integers(0, pb.n - 1), label="client")
    w = [1.0] * pb.n
    w[j] = bad
    with pytest.raises(WeightError, match=rf"client {j}: weight") as info:
        glora_aggregate(pb.factors, w, rank=1)
    assert info.value.client == j


def test_inner_dimension_and_matrix_checks() -> None:
    with pytest.raises(ShapeMismatchError, match="inner dimensions differ"):
        LoRAFactors(torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(ShapeMismatchError, match="must be a matrix"):
        LoRAFactors(torch.zeros(4, 2, 1), torch.zeros(2, 5))
    with pytest.raises(DtypeError, match="floating point"):
        LoRAFactors(torch.zeros(4, 2, dtype=torch.int64), torch.zeros(2, 5))
    with pytest.raises(DtypeError, match=r"torch\.Tensor"):
        LoRAFactors([[1.0]], torch.zeros(1, 5))  # type: ignore[arg-type]


def test_tuples_are_accepted_and_bad_tuples_name_the_client() -> None:
    good = (torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    state = glora_aggregate([good, good], rank=2)  # type: ignore[list-item]
    assert state.shape == (4, 3)
    with pytest.raises(ShapeMismatchError, match="client 1: inner dimensions differ"):
        glora_aggregate([good, (torch.zeros(4, 2), torch.zeros(3, 3))], rank=1)  # type: ignore[list-item]
    with pytest.raises(ShapeMismatchError, match="client 0: expected LoRAFactors"):
        glora_aggregate(["nope"], rank=1)  # type: ignore[list-item]


def test_weights_rules() -> None:
    fs = [
        LoRAFactors(torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    ] * 2
    with pytest.raises(WeightError, match="got 3 weights for 2 clients"):
        glora_aggregate(fs, [1.0, 1.0, 1.0], rank=1)
    with pytest.raises(WeightError, match=r"^all weights are zero$"):
        glora_aggregate(fs, [0.0, 0.0], rank=1)
    # Renormalisation: weights (2, 6) act as (1/4, 3/4).
    a = glora_aggregate(fs, [2.0, 6.0], rank=2)
    assert torch.allclose(
        a.weights, torch.tensor([0.25, 0.75], dtype=torch.float64), rtol=0, atol=0
    )


@pytest.mark.parametrize("bad", [5, None, [torch.ones(2, 1), torch.ones(1, 2)]])
def test_a_client_that_is_not_a_pair_names_its_type(bad: object) -> None:
    good = LoRAFactors(torch.ones(2, 1), torch.ones(1, 2))
    with pytest.raises(ShapeMismatchError, match=rf"client 1: .* got {type(bad).__name__}$"):
        glora_aggregate([good, bad], rank=1)  # type: ignore[list-item]


def test_weights_are_normalised_in_float64_whatever_their_type() -> None:
    from glora_math.validation import normalize_weights

    want = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) / 7.0
    for w in ([1, 2, 4], [1.0, 2.0, 4.0], torch.tensor([1.0, 2.0, 4.0])):
        got = normalize_weights(w, 3, dtype=torch.float64, device=torch.device("cpu"))
        assert got.dtype == torch.float64
        assert float((got - want).abs().max()) <= 2 * torch.finfo(torch.float64).eps


def test_empty_client_list() -> None:
    with pytest.raises(EmptyClientsError, match=r"^no client factors were given$"):
        glora_aggregate([], rank=1)
    with pytest.raises(EmptyClientsError):
        fedit([])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3", None])
def test_rank_must_be_a_positive_int(bad: object) -> None:
    fs = [
        LoRAFactors(torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    ]
    with pytest.raises(RankError, match="rank must be"):
        glora_aggregate(fs, rank=bad)  # type: ignore[arg-type]


def test_readout_rank_above_R_is_an_error() -> None:
    fs = [
        LoRAFactors(torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    ]
    state = glora_aggregate(fs, rank=3)
    with pytest.raises(RankError, match="exceeds the server rank R=3"):
        readout(state, 4)
    with pytest.raises(ValueError, match="unknown split"):
        readout(state, 2, split="middle")  # type: ignore[arg-type]


def test_unknown_gauge_mode_and_fedit_rank_mismatch() -> None:
    f2 = LoRAFactors(torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))
    f3 = LoRAFactors(torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown gauge mode"):
        gauge_fix(f2, "lu")  # type: ignore[arg-type]
    with pytest.raises(ShapeMismatchError, match="client 1: FedIT needs equal ranks"):
        fedit([f2, f3])


def test_errors_carry_module_context() -> None:
    err = NonFiniteError("B has 1 NaN/Inf entries", client=2).with_context(module="q_proj")
    assert isinstance(err, NonFiniteError)
    assert isinstance(err, GloraError)
    assert str(err) == "module 'q_proj', client 2: B has 1 NaN/Inf entries"


@pytest.mark.parametrize(
    "name", ["fro_norm", "singular_values", "best_rank_approx", "fro_distance"]
)
def test_single_module_metrics_refuse_a_stack_with_a_typed_error(name: str) -> None:
    # They raised raw torch errors (a shape mismatch, a tensor converted to float) on stacks.
    from glora_math import metrics
    from glora_math.errors import ShapeMismatchError

    x = LoRAFactors(
        torch.randn(3, 8, 2, dtype=torch.float64), torch.randn(3, 2, 6, dtype=torch.float64)
    )
    call = {
        "fro_norm": lambda: metrics.fro_norm(x),
        "singular_values": lambda: metrics.singular_values(x),
        "best_rank_approx": lambda: metrics.best_rank_approx(x, 1),
        "fro_distance": lambda: metrics.fro_distance(x, x),
    }[name]
    with pytest.raises(ShapeMismatchError, match=f"{name} takes one module"):
        call()


def test_warnings_keep_their_modules_through_pickling_and_copies() -> None:
    import copy
    import pickle

    from glora_math.errors import GloraWarning, UnderflowWarning

    w = UnderflowWarning("the update underflows", modules=["q_proj", 3])
    assert str(w) == "modules 'q_proj', 3: the update underflows"
    # (our own object, pickled here: never a client payload)
    for back in (pickle.loads(pickle.dumps(w)), copy.deepcopy(w)):
        assert type(back) is UnderflowWarning
        assert (back.message, back.modules, str(back)) == (w.message, w.modules, str(w))
    assert str(GloraWarning()) == ""
    # stack positions become names; a name stays; a position outside the names stays a position
    assert GloraWarning("x", modules=[1, "o", 5]).named(["q", "v"]).modules == ("v", "o", 5)
    assert GloraWarning("x").named(["q", "v"]).modules == ("q", "v")
    assert GloraWarning("x", modules=[0]).located([2]).modules == (0,)
