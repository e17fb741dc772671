"""Every aggregation rule behind one typed interface, one family a file.

``interface`` holds :class:`AggregationOperator`, its declarations and the registry; the
families register their operators when imported, in this order (the order of
:func:`list_operators`): ``averaging`` (FedIT, FFA-LoRA, LoRA-FAIR, RoLoRA, FedSA-LoRA,
FLoRA-NA), ``exact`` (FedEx-LoRA, FLoRA), ``svd`` (FlexLoRA, ``svd_mean``, HetLoRA),
``rotation`` (FedRot-LoRA) and ``glora`` (GLoRA and the side-aware variants).

Usage::

    op = get_operator("glora")
    result = op(clients, weights, rank=16, client_ranks=[8] * len(clients))
    result.update          # the server's low-rank update (factors)
    result.client_factors  # what each client continues from
"""

from __future__ import annotations

# isort: off
# The families register their operators on import, in this order.
from glora_math.operators import averaging  # noqa: F401
from glora_math.operators import exact  # noqa: F401
from glora_math.operators import svd  # noqa: F401
from glora_math.operators import rotation  # noqa: F401
from glora_math.operators import glora  # noqa: F401

# isort: on
from glora_math.operators.interface import (
    DEFAULT_OPERATOR,
    AggregateResult,
    AggregationOperator,
    Communication,
    Guarantee,
    OperatorState,
    RoundContext,
    get_operator,
    list_operators,
    parse_options,
    register,
)

__all__ = [
    "DEFAULT_OPERATOR",
    "AggregateResult",
    "AggregationOperator",
    "Communication",
    "Guarantee",
    "OperatorState",
    "RoundContext",
    "get_operator",
    "list_operators",
    "parse_options",
    "register",
]
