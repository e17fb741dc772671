"""Tests of ``glora_math.types``.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``types.py`` that survived the property suite.

``ServerState.module(i)`` is module i's state of a stack: its own basis, coordinates, spectrum, gap
and certificate, and every setting of the stack (requested rank, weights, gauge, dtype, side, rank
rule, tolerance, route).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from glora_math import GloraError, LoRAFactors, ServerState, ShapeMismatchError, glora_aggregate
from glora_math.errors import DtypeError
from glora_math.types import GaugeFixed


def _stack(batch: tuple[int, ...], *, certify: bool = True, dtype=torch.float64) -> ServerState:  # type: ignore[no-untyped-def]
    # Two clients of ranks 2 and 3 (stacked width m = 5), d = 7, k = 6, R = 2.
    g = torch.Generator().manual_seed(11)
    fs = [
        LoRAFactors(
            torch.randn(*batch, 7, r, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(*batch, r, 6, generator=g, dtype=torch.float64).to(dtype),
        )
        for r in (2, 3)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a zero eigengap is irrelevant here
        return glora_aggregate(fs, [1.0, 3.0], rank=2, certify=certify)


def test_a_module_state_carries_its_own_spectrum_gap_and_certificate() -> None:
    # A 2-D batch (2, 3) whose spectra are 5 wide: module i is entry i in flattened order.
    state = _stack((2, 3))
    assert state.module_gaps is not None
    assert state.module_certificates is not None
    eig = state.eigvals.reshape(6, -1)
    gaps = state.module_gaps.flatten()
    for i in range(6):
        one = state.module(i)
        assert one.batch_shape == ()
        assert torch.equal(one.U, state.U.reshape(6, 7, 2)[i])
        assert torch.equal(one.S, state.S.reshape(6, 2, 6)[i])
        assert torch.equal(one.eigvals, eig[i])
        assert one.gap == float(gaps[i])
        assert one.certificate == state.module_certificates[i]
    # The modules' gaps differ, so none is the stack's (smallest) gap in disguise.
    assert len({float(x) for x in gaps}) > 1


def test_a_module_state_keeps_the_stacks_settings() -> None:
    for dtype in (torch.float64, torch.float32):
        state = _stack((3,), dtype=dtype)
        # rank='auto' is refused for stacks; a state may still carry the rule (hand-made).
        for st in (state, dataclasses.replace(state, rank_rule="auto", tol=0.25)):
            one = st.module(1)
            for name in ("requested_rank", "gauge", "dtype", "side", "rank_rule", "tol", "route"):
                assert getattr(one, name) == getattr(st, name), name
            assert torch.equal(one.weights, st.weights)


def test_a_module_of_an_uncertified_stack_has_no_certificate() -> None:
    state = _stack((2,), certify=False)
    assert state.module_certificates is None
    assert state.module(0).certificate is None


def test_a_stack_state_without_module_gaps_gives_each_module_the_stack_gap() -> None:
    # module_gaps is optional on a hand-made stacked state: then every module has state.gap.
    state = dataclasses.replace(_stack((2,)), module_gaps=None)
    assert state.module(1).gap == state.gap


def test_module_indices_are_ints_in_range() -> None:
    state = _stack((2,))
    for bad in (True, 1.0, "0", -1, 2):
        with pytest.raises(GloraError, match="module index must be an int in"):
            state.module(bad)  # type: ignore[arg-type]


# The containers' own checks: each names the offending field exactly as the dataclass does.


def _error_text(exc: pytest.ExceptionInfo[GloraError]) -> str:
    return exc.value.message


def test_lora_factors_name_a_field_that_is_not_a_tensor() -> None:
    A = torch.zeros(2, 3)
    with pytest.raises(DtypeError) as exc:
        LoRAFactors([[0.0, 0.0]], A)  # type: ignore[arg-type]
    assert _error_text(exc) == "B must be a torch.Tensor, got list"
    with pytest.raises(DtypeError) as exc:
        LoRAFactors(torch.zeros(4, 2), (1.0, 2.0))  # type: ignore[arg-type]
    assert _error_text(exc) == "A must be a torch.Tensor, got tuple"


def test_lora_factors_name_a_field_that_is_not_floating_point() -> None:
    with pytest.raises(DtypeError) as exc:
        LoRAFactors(torch.zeros(4, 2, dtype=torch.int64), torch.zeros(2, 3))
    assert _error_text(exc) == "B must be floating point, got torch.int64"
    with pytest.raises(DtypeError) as exc:
        LoRAFactors(torch.zeros(4, 2), torch.zeros(2, 3, dtype=torch.int32))
    assert _error_text(exc) == "A must be floating point, got torch.int32"


def test_gauge_fixed_names_its_fields_in_its_errors() -> None:
    U, C = torch.zeros(4, 2), torch.zeros(2, 3)
    with pytest.raises(DtypeError) as exc:
        GaugeFixed([[1.0]], C)  # type: ignore[arg-type]
    assert _error_text(exc) == "U must be a torch.Tensor, got list"
    with pytest.raises(DtypeError) as exc:
        GaugeFixed(U, torch.zeros(2, 3, dtype=torch.int64))
    assert _error_text(exc) == "C must be floating point, got torch.int64"
    with pytest.raises(DtypeError) as exc:
        GaugeFixed(U.to(torch.int16), C)
    assert _error_text(exc) == "U must be floating point, got torch.int16"
    with pytest.raises(DtypeError) as exc:
        GaugeFixed(U, None)  # type: ignore[arg-type]
    assert _error_text(exc) == "C must be a torch.Tensor, got NoneType"


def test_a_gauge_fixed_client_is_one_matrix_pair_never_a_stack() -> None:
    # Only LoRAFactors take stacks (leading batch dimensions); GaugeFixed is one module's.
    with pytest.raises(ShapeMismatchError) as exc:
        GaugeFixed(torch.zeros(2, 4, 2), torch.zeros(2, 2, 3))
    assert _error_text(exc) == "U must be a matrix (2-D), got shape (2, 4, 2)"
    with pytest.raises(ShapeMismatchError) as exc:
        GaugeFixed(torch.zeros(4, 2), torch.zeros(1, 2, 3))
    assert _error_text(exc) == "C must be a matrix (2-D), got shape (1, 2, 3)"
