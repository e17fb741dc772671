"""Baseline aggregation rules that the core needs (the full operator zoo builds on these).

FedIT (arXiv 2305.05644): average the factors separately,
``B_bar = sum_i p_i B_i``, ``A_bar = sum_i p_i A_i``. Its product is NOT the mean update
(SPEC P7) and it is NOT invariant under per-client gauges: the reason GLoRA exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glora_math.errors import ShapeMismatchError
from glora_math.types import LoRAFactors
from glora_math.validation import WeightsLike, normalize_weights, validate_clients


def fedit(factors: Sequence[LoRAFactors], weights: WeightsLike = None) -> LoRAFactors:
    """Factor averaging: ``(sum_i p_i B_i, sum_i p_i A_i)``, in the clients' dtype.

    Raises
    ------
    ShapeMismatchError
        If client ranks differ (FedIT has no rule for heterogeneous ranks).
    """
    info = validate_clients(factors)
    r0 = factors[0].rank
    for i, f in enumerate(factors):
        if f.rank != r0:
            raise ShapeMismatchError(
                f"FedIT needs equal ranks: rank {f.rank} differs from client 0's {r0}", client=i
            )
    p = normalize_weights(weights, len(factors), dtype=info.work_dtype, device=info.device)
    wd = info.work_dtype
    B = torch.tensordot(p, torch.stack([f.B.to(wd) for f in factors]), dims=1)
    A = torch.tensordot(p, torch.stack([f.A.to(wd) for f in factors]), dims=1)
    return LoRAFactors(B.to(info.dtype), A.to(info.dtype))


__all__ = ["fedit"]
