"""Factor averaging: FedIT and the operators built on averaged factors.

FedIT (arXiv 2305.05644), FFA-LoRA (arXiv 2403.12313), LoRA-FAIR (arXiv 2411.14961,
reconstruction), RoLoRA (arXiv 2409.02346), FedSA-LoRA (arXiv 2410.01463) and FLoRA-NA
(arXiv 2509.26399, reconstruction): the server averages B and A (or the factor clients train)
and may refine the average; every client receives the same global factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from glora_math import baselines as bl
from glora_math.linalg import condition_number
from glora_math.operators.interface import (
    AggregateResult,
    AggregationOperator,
    Communication,
    G,
    OperatorFn,
    OperatorState,
    RoundContext,
    factors_cost,
    register,
    same_for_all,
)
from glora_math.types import LoRAFactors
from glora_math.validation import validate_clients


def _broadcast(
    rule: Callable[[Sequence[LoRAFactors], Tensor], LoRAFactors], method: str
) -> OperatorFn:
    """An operator whose global factors are sent unchanged to every client."""

    def fn(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        g = rule(fs, p)
        return AggregateResult(g, None, same_for_all(len(fs), g, ctx.client_ranks, method))

    return fn


register(
    AggregationOperator(
        name="fedit",
        paper="arXiv 2305.05644",
        summary="average B and A separately",
        sends_back="global factors (rank r)",
        guarantees=frozenset({G.COMMON_GAUGE_EQUIVARIANT, G.PERMUTATION_INVARIANT}),
        fn=_broadcast(bl.fedit, "FedIT"),
        cost=factors_cost,
        equal_ranks=True,
    )
)


register(
    AggregationOperator(
        name="ffa_lora",
        paper="arXiv 2403.12313",
        summary="A frozen and shared, average B only (exact)",
        sends_back="averaged B (A is fixed)",
        guarantees=frozenset({G.EXACT_MEAN, G.COMMON_GAUGE_EQUIVARIANT, G.PERMUTATION_INVARIANT}),
        fn=_broadcast(bl.ffa_lora, "FFA-LoRA"),
        cost=lambda d, k, r, R, n: Communication(up=d * r, down=d * r),
        equal_ranks=True,
        shared_A=True,
    )
)


def _lora_fair(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    glob, _, _ = bl.lora_fair(fs, p, lam=ctx.options["lam"], steps=int(ctx.options["steps"]))
    return AggregateResult(glob, None, same_for_all(len(fs), glob, ctx.client_ranks, "LoRA-FAIR"))


register(
    AggregationOperator(
        name="lora_fair",
        paper="arXiv 2411.14961 (reconstruction)",
        summary="FedIT plus a server correction dB of B_bar minimising 1 - cos(W_bar, "
        "(B_bar + dB) A_bar) + lam ||dB||^2 / ||B_bar||^2, from factors; clients start from "
        "(B_bar + dB, A_bar)",
        sends_back="global factors (rank r)",
        guarantees=frozenset({G.PERMUTATION_INVARIANT}),
        fn=_lora_fair,
        cost=factors_cost,
        equal_ranks=True,
        reconstruction=True,
        options={"lam": 0.01, "steps": 50.0},
    )
)


def _rolora_frozen(round_index: int) -> Literal["A", "B"]:
    """RoLoRA: odd rounds freeze A (clients train B), even rounds freeze B (they train A)."""
    return "A" if round_index % 2 == 1 else "B"


def _rolora(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    round_index = 1 if ctx.state is None else ctx.state.round_index
    trained: Literal["A", "B"] = "B" if _rolora_frozen(round_index) == "A" else "A"
    glob = bl.rolora(fs, p, trained=trained)
    return AggregateResult(
        glob,
        None,
        same_for_all(len(fs), glob, ctx.client_ranks, "RoLoRA"),
        OperatorState(round_index + 1),
    )


register(
    AggregationOperator(
        name="rolora",
        paper="arXiv 2409.02346",
        summary="alternating rounds: clients train B with A frozen and shared, then A with B "
        "frozen and shared; the server averages the trained factor (exact)",
        sends_back="the averaged trained factor (the other is shared)",
        guarantees=frozenset({G.EXACT_MEAN, G.COMMON_GAUGE_EQUIVARIANT, G.PERMUTATION_INVARIANT}),
        fn=_rolora,
        cost=lambda d, k, r, R, n: Communication(up=max(d, k) * r, down=max(d, k) * r),
        equal_ranks=True,
        stateful=True,
        frozen=_rolora_frozen,
        warm_state=lambda reference, round_index: OperatorState(round_index),
    )
)


def _fedsa(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    A_bar, per = bl.fedsa_lora(fs, p)
    info = validate_clients(fs)
    B_bar = bl.fedit(fs, p).B
    same_for_all(len(fs), per[0], ctx.client_ranks, "FedSA-LoRA")
    personal = {f"B_{i}": f.B for i, f in enumerate(per)}
    round_index = 1 if ctx.state is None else ctx.state.round_index
    state = OperatorState(round_index + 1, {"A_bar": A_bar, **personal})
    # Server update = mean of the personalised updates sum_i p_i B_i A_bar = B_bar A_bar.
    return AggregateResult(LoRAFactors(B_bar.to(info.dtype), A_bar), None, per, state)


register(
    AggregationOperator(
        name="fedsa_lora",
        paper="arXiv 2410.01463",
        summary="share the average of A, keep B personal",
        sends_back="averaged A; each client keeps its own B",
        guarantees=frozenset({G.COMMON_GAUGE_EQUIVARIANT, G.PERMUTATION_INVARIANT}),
        fn=_fedsa,
        cost=lambda d, k, r, R, n: Communication(up=r * k, down=r * k),
        equal_ranks=True,
        stateful=True,
        personal=True,
    )
)


def _flora_na_sensitivity(
    fs: Sequence[LoRAFactors], p: Tensor, R: int, state: OperatorState | None
) -> float:
    """1 / (cond(B_bar) cond(A_bar))^2 at FedIT's start: ALS solves with the Gram matrices."""
    g = bl.fedit(fs, p)
    return 1.0 / (condition_number(g.B) * condition_number(g.A)) ** 2


register(
    AggregationOperator(
        name="flora_na",
        paper="arXiv 2509.26399",
        summary="server-side ALS estimate of (B, A) from FedIT (reconstruction)",
        sends_back="global factors (rank r)",
        guarantees=frozenset({G.COMMON_GAUGE_EQUIVARIANT, G.PERMUTATION_INVARIANT}),
        fn=_broadcast(bl.flora_na, "FLoRA-NA"),
        cost=factors_cost,
        equal_ranks=True,
        reconstruction=True,
        sensitivity=_flora_na_sensitivity,
    )
)
