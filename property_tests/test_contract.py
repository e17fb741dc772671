"""The operator contract: every registered operator inherits one property per guarantee.

The properties live in the package (:mod:`glora_math.testing.contract`), so that a user who
registers an operator runs the same checks. For each (operator, guarantee) pair: if the
operator declares the guarantee, the property must hold on every drawn problem; if it does
not, the same property must be *falsified* by a found counterexample (a property that
unexpectedly holds fails the suite, so a missing declaration cannot hide).
"""

from __future__ import annotations

import pytest

from glora_math.operators import Guarantee, get_operator, list_operators
from glora_math.testing.contract import PROPERTIES, check_guarantee


def _cases() -> list[object]:
    return [pytest.param(name, g, id=f"{name}-{g}") for name in list_operators() for g in Guarantee]


def test_every_guarantee_has_a_property() -> None:
    assert set(PROPERTIES) == set(Guarantee)


@pytest.mark.parametrize(("name", "guarantee"), _cases())
def test_contract(name: str, guarantee: Guarantee) -> None:
    # Declared: the property holds (True). Not declared: a counterexample is found (False);
    # a property that unexpectedly holds raises ContractError, so a missing declaration
    # cannot hide.
    op = get_operator(name)
    assert check_guarantee(op, guarantee) == (guarantee in op.guarantees)


def test_a_users_operator_with_a_false_declaration_is_caught() -> None:
    # The shipped suite as a user runs it, on an operator that is not registered: FedIT's
    # function claiming GL(r) gauge invariance must be falsified with a counterexample, and
    # FedIT's true declarations must hold.
    import dataclasses

    from glora_math.testing import ContractError, FalsifiedError, check_contract

    fedit = get_operator("fedit")
    liar = dataclasses.replace(
        fedit, name="fedit_claims_gl", guarantees=fedit.guarantees | {Guarantee.GAUGE_INVARIANT_GL}
    )
    with pytest.raises(FalsifiedError):
        check_guarantee(liar, Guarantee.GAUGE_INVARIANT_GL, max_examples=30)
    # Dropping a true declaration is caught too: the property holds where it is not declared.
    modest = dataclasses.replace(
        fedit, name="fedit_modest", guarantees=fedit.guarantees - {Guarantee.PERMUTATION_INVARIANT}
    )
    with pytest.raises(ContractError, match="does not declare"):
        check_guarantee(modest, Guarantee.PERMUTATION_INVARIANT, max_examples=20)
    held = check_contract(fedit, max_examples=15)
    assert {g for g, ok in held.items() if ok} == set(fedit.guarantees)
