"""Tests of ``glora_math.validation``.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``validation.py`` that survived the property suite.

``largest_client`` names the client an overflow error blames: the client with the largest
``||B||_F ||A||_F``, computed in float64, inf where that overflows.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from glora_math import LoRAFactors, NonFiniteError, WeightError
from glora_math.tolerances import product_tol
from glora_math.validation import (
    check_finite_output,
    largest_client,
    normalize_weights,
    validate_clients,
)


def _size_tol(expected: float, n: int) -> float:
    # Two float64 norms of n entries and one product: backward-stable, relative to the size.
    return product_tol(torch.float64, n=n, scale=expected)


def test_largest_client_is_the_largest_product_of_norms_in_float64() -> None:
    # Client 0's B and client 1's A overflow float32 when their norms are taken in float32
    # (1e20^2 > 3.4e38), not in float64: their sizes are 4 (||B|| = 2e20, ||A|| = 2e-20).
    # Client 2 is the largest: ||B|| = 2, ||A|| = 4, size 8 (exact: constant entries).
    d, r, k = 4, 1, 4
    clients = [
        LoRAFactors(
            torch.full((d, r), 1e20, dtype=torch.float32),
            torch.full((r, k), 1e-20, dtype=torch.float32),
        ),
        LoRAFactors(
            torch.full((d, r), 1e-20, dtype=torch.float32),
            torch.full((r, k), 1e20, dtype=torch.float32),
        ),
        LoRAFactors(
            torch.full((d, r), 1.0, dtype=torch.float32),
            torch.full((r, k), 2.0, dtype=torch.float32),
        ),
    ]
    j, size = largest_client(clients)
    assert j == 2
    assert abs(size - 8.0) <= _size_tol(8.0, d * r + r * k)


def test_largest_client_reports_sizes_below_one() -> None:
    # Every size below 1: the answer is still the largest client and its own size.
    clients = [
        LoRAFactors(
            torch.full((4, 1), 0.25, dtype=torch.float64),
            torch.full((1, 4), 0.25, dtype=torch.float64),
        ),
        LoRAFactors(
            torch.full((4, 1), 0.25, dtype=torch.float64),
            torch.full((1, 4), 0.5, dtype=torch.float64),
        ),
    ]
    j, size = largest_client(clients)
    assert j == 1
    # ||B|| = 0.5, ||A|| = 1: size 0.5.
    assert abs(size - 0.5) <= _size_tol(0.5, 8)


def test_a_zero_update_client_has_size_zero() -> None:
    # A = 0: the size is 0 (no division by ||A||), and the other client is named.
    clients = [
        LoRAFactors(
            torch.full((4, 1), 3.0, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
        ),
        LoRAFactors(
            torch.full((4, 1), 1e-3, dtype=torch.float64),
            torch.full((1, 4), 1e-3, dtype=torch.float64),
        ),
    ]
    j, size = largest_client(clients)
    assert j == 1
    assert abs(size - 4e-6) <= _size_tol(4e-6, 8)


def test_a_norm_beyond_float64_is_inf_never_nan() -> None:
    # ||B||_F of four entries 1e308 overflows float64: the size is inf (documented), even with
    # A = 0 (inf * 0 would be NaN), so that client is the one named.
    clients = [
        LoRAFactors(
            torch.full((4, 1), 1.0, dtype=torch.float64),
            torch.full((1, 4), 1.0, dtype=torch.float64),
        ),
        LoRAFactors(
            torch.full((4, 1), 1e308, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
        ),
    ]
    j, size = largest_client(clients)
    assert j == 1
    assert size == math.inf


def test_ties_name_the_first_client() -> None:
    # The first of equal clients, as Python's max() and torch.argmax break ties.
    f = LoRAFactors(
        torch.full((4, 2), 1.0, dtype=torch.float64), torch.full((2, 3), 1.0, dtype=torch.float64)
    )
    assert largest_client([f, f, f])[0] == 0


def _weights(w: object, n: int) -> torch.Tensor:
    return normalize_weights(w, n, dtype=torch.float64, device=torch.device("cpu"))  # type: ignore[arg-type]


def _error(w: object, n: int) -> WeightError:
    with pytest.raises(WeightError) as err:
        _weights(w, n)
    return err.value


def test_validate_clients_reports_the_clients_device() -> None:
    f = LoRAFactors(torch.ones(3, 1), torch.ones(1, 2))
    assert validate_clients([f, f]).device == torch.device("cpu")


def test_an_overflowed_output_is_named_in_the_error() -> None:
    f = LoRAFactors(torch.ones(3, 1), torch.ones(1, 2))
    with pytest.raises(NonFiniteError) as err:
        check_finite_output([torch.ones(2), torch.tensor([1.0, math.inf])], [f], "the readout")
    assert err.value.message.startswith(
        "the readout overflowed: the result has Inf/NaN entries; the largest client update"
    )
    assert err.value.client == 0


def test_integer_weight_tensors_are_accepted_and_bool_tensors_refused() -> None:
    p = _weights(torch.tensor([1, 3]), 2)
    assert p.tolist() == [0.25, 0.75]  # exact: 1/4 and 3/4 are binary fractions
    err = _error(torch.tensor([True, False]), 2)
    assert err.message == "weights must be a real tensor, got torch.bool"


@pytest.mark.parametrize(("w", "name"), [(3.0, "float"), ("13", "str"), (b"13", "bytes")])
def test_weights_that_are_not_a_sequence_of_numbers_are_refused(w: object, name: str) -> None:
    err = _error(w, 2)
    assert err.message == f"weights must be a sequence of numbers, got {name}"
    assert err.client is None


@pytest.mark.parametrize(("bad", "name"), [("1.5", "str"), (None, "NoneType")])
def test_a_weight_that_is_not_a_real_number_is_named(bad: object, name: str) -> None:
    err = _error([1.0, bad], 2)
    assert err.message == f"weight must be a real number, got {name}"
    assert err.client == 1


def test_a_complex_scalar_tensor_weight_is_refused() -> None:
    err = _error([torch.tensor(1.0 + 2.0j), 1.0], 2)
    assert err.message == "weight must be a real number, got Tensor"
    assert err.client == 0


@pytest.mark.parametrize(
    "w",
    [
        [torch.tensor(1.0), torch.tensor(3.0)],
        [torch.tensor(1), torch.tensor(3.0, dtype=torch.float16)],
        [Fraction(1, 2), Fraction(3, 2)],
    ],
)
def test_real_scalars_that_convert_to_float_are_accepted(w: list[object]) -> None:
    # torch scalar tensors (with is_complex()) and other real numbers with __float__
    # (Fraction has no is_complex) are weights; the values here are exact binary fractions.
    assert _weights(w, 2).tolist() == [0.25, 0.75]


def test_an_integer_weight_beyond_float64_is_named() -> None:
    err = _error([1, 10**400], 2)
    assert err.message == "weight is beyond the float64 range"
    assert err.client == 1
