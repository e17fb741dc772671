"""Rotation alignment before averaging: FedRot-LoRA (arXiv 2602.23638).

Each client's factors are aligned to the previous global factors by an orthogonal Procrustes
rotation (or a soft one restricted to SO(r)), then averaged as FedIT; stateful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from glora_math import baselines as bl
from glora_math.operators.interface import (
    AggregateResult,
    AggregationOperator,
    G,
    OperatorFn,
    OperatorState,
    RoundContext,
    factors_cost,
    register,
    same_for_all,
)
from glora_math.types import LoRAFactors


def _fedrot_state(reference: LoRAFactors, round_index: int) -> OperatorState:
    """FedRot-LoRA aligns to the previous global factors: the reference, at a round index."""
    return OperatorState(round_index, {"B_ref": reference.B, "A_ref": reference.A})


def _fedrot_sensitivity(
    fs: Sequence[LoRAFactors], p: Tensor, R: int, state: OperatorState | None
) -> float:
    """The smallest relative gap (s_r + s_{r-1}) / (2 s_1) of the alignment matrices M.

    The polar factor of M moves by at most 2 ||dM|| / (s_r + s_{r-1}) (Higham, Functions of
    Matrices, thm. 8.9).
    """
    if state is None or "B_ref" not in state.tensors:
        return 1.0
    ref_B, ref_A = state.tensors["B_ref"], state.tensors["A_ref"]
    gaps = [1.0]
    for c in fs:
        M = c.A @ ref_A.mT if bl.aligned_side(state.round_index) == "A" else c.B.mT @ ref_B
        s = torch.linalg.svdvals(M.detach().to(torch.float64))
        low = float(s[-1] + (s[-2] if s.numel() > 1 else s[-1]))
        gaps.append(low / (2 * float(s[0])) if float(s[0]) > 0 else 1.0)
    return max(min(gaps), 0.0)


def _fedrot(lam: float) -> OperatorFn:
    def fn(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        state = ctx.state or OperatorState()
        ref = None
        if "B_ref" in state.tensors and "A_ref" in state.tensors:
            ref = LoRAFactors(state.tensors["B_ref"], state.tensors["A_ref"])
        first: Literal["A", "B"] = "B" if ctx.options.get("first_aligned_b", 0.0) > 0 else "A"
        glob, _ = bl.fedrot_lora(
            fs, p, reference=ref, round_index=state.round_index, lam=lam, first=first
        )
        nxt = OperatorState(state.round_index + 1, {"B_ref": glob.B, "A_ref": glob.A})
        return AggregateResult(
            glob, None, same_for_all(len(fs), glob, ctx.client_ranks, "FedRot-LoRA"), nxt
        )

    return fn


register(
    AggregationOperator(
        name="fedrot_lora",
        paper="arXiv 2602.23638",
        summary="orthogonal Procrustes alignment to the previous global factors, then FedIT; "
        "A aligned first, as the published code (option first_aligned_b=1: B first)",
        sends_back="global factors (rank r)",
        guarantees=frozenset({G.GAUGE_INVARIANT_O, G.GAUGE_INVARIANT_SO, G.PERMUTATION_INVARIANT}),
        fn=_fedrot(1.0),
        cost=factors_cost,
        equal_ranks=True,
        stateful=True,
        warm_state=_fedrot_state,
        sensitivity=_fedrot_sensitivity,
        options={"first_aligned_b": 0.0},
    )
)

register(
    AggregationOperator(
        name="fedrot_lora_soft",
        paper="arXiv 2602.23638",
        summary="soft alignment (lambda = 0.5) restricted to SO(r), then FedIT",
        sends_back="global factors (rank r)",
        guarantees=frozenset({G.PERMUTATION_INVARIANT}),
        fn=_fedrot(0.5),
        cost=factors_cost,
        equal_ranks=True,
        stateful=True,
        warm_state=_fedrot_state,
        sensitivity=_fedrot_sensitivity,
        options={"first_aligned_b": 0.0},
    )
)
