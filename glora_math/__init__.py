"""glora-math: gauge-invariant federated LoRA aggregation, typed, verified and low-rank.

GLoRA (Chen, Liu, Zhu 2026, arXiv 2605.06733) as reconstructed in SPEC.md: gauge-fix each
client update, find the consensus subspace of the clients' projectors, aggregate in shared
coordinates and read out adapters of any rank r <= R.
"""

from glora_math.aggregate import glora_aggregate, glora_aggregate_stack
from glora_math.baselines import fedit
from glora_math.consensus import consensus_basis
from glora_math.errors import (
    DeviceMismatchError,
    DtypeError,
    EmptyClientsError,
    GaugeError,
    GloraError,
    GloraWarning,
    NonFiniteError,
    OptionError,
    RankClampedWarning,
    RankError,
    ShapeMismatchError,
    UnderflowWarning,
    WeightError,
    ZeroEigengapWarning,
)
from glora_math.gauge import (
    apply_gauge,
    gauge_fix,
    random_invertible,
    random_orthogonal,
    random_special_orthogonal,
)
from glora_math.metrics import fro_distance, fro_norm, mean_update, relative_error, state_factors
from glora_math.operators import (
    DEFAULT_OPERATOR,
    AggregationOperator,
    get_operator,
    list_operators,
)
from glora_math.readout import eckart_young_error, readout, readouts
from glora_math.rounds import ModulesRound, aggregate_modules
from glora_math.types import ConsensusBasis, GaugeFixed, LoRAFactors, ServerState, Sketch

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_OPERATOR",
    "AggregationOperator",
    "ConsensusBasis",
    "DeviceMismatchError",
    "DtypeError",
    "EmptyClientsError",
    "GaugeError",
    "GaugeFixed",
    "GloraError",
    "GloraWarning",
    "LoRAFactors",
    "ModulesRound",
    "NonFiniteError",
    "OptionError",
    "RankClampedWarning",
    "RankError",
    "ServerState",
    "ShapeMismatchError",
    "Sketch",
    "UnderflowWarning",
    "WeightError",
    "ZeroEigengapWarning",
    "__version__",
    "aggregate_modules",
    "apply_gauge",
    "consensus_basis",
    "eckart_young_error",
    "fedit",
    "fro_distance",
    "fro_norm",
    "gauge_fix",
    "get_operator",
    "glora_aggregate",
    "glora_aggregate_stack",
    "list_operators",
    "mean_update",
    "random_invertible",
    "random_orthogonal",
    "random_special_orthogonal",
    "readout",
    "readouts",
    "relative_error",
    "state_factors",
]
