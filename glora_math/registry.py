"""The old name of :mod:`glora_math.operators`, kept so that existing imports keep working.

``from glora_math.registry import get_operator`` and the other public names behave exactly as
before; new code imports them from :mod:`glora_math.operators` (or from :mod:`glora_math`).
"""

from __future__ import annotations

import warnings

from glora_math.operators import (
    AggregateResult,
    AggregationOperator,
    Communication,
    Guarantee,
    OperatorState,
    RoundContext,
    get_operator,
    list_operators,
    register,
)

warnings.warn(
    "glora_math.registry is the old name of glora_math.operators; import from there (or from "
    "glora_math)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "AggregateResult",
    "AggregationOperator",
    "Communication",
    "Guarantee",
    "OperatorState",
    "RoundContext",
    "get_operator",
    "list_operators",
    "register",
]
