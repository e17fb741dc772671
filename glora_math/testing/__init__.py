"""Testing tools shipped with the package (needs ``hypothesis``: ``glora-math[test]``).

- :mod:`glora_math.testing.contract`: the operator contract, one property per
  :class:`~glora_math.operators.Guarantee`; :func:`check_contract` runs it on any registered
  operator (yours included), as linear_operator ships its ``LinearOperatorTestCase``.
- :mod:`glora_math.testing.strategies`: hypothesis strategies for federated LoRA problems
  (conditioned factors, heterogeneous ranks, weights, gauges).
- :mod:`glora_math.testing.helpers`: dense float64 references and tolerance plumbing.
"""

from __future__ import annotations

try:
    import hypothesis as _hypothesis  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "glora_math.testing needs hypothesis: pip install 'glora-math[test]'"
    ) from err

from glora_math.testing.contract import (
    PROPERTIES,
    ContractError,
    FalsifiedError,
    check_contract,
    check_guarantee,
)

__all__ = [
    "PROPERTIES",
    "ContractError",
    "FalsifiedError",
    "check_contract",
    "check_guarantee",
]
