"""GLoRA (arXiv 2605.06733, our reconstruction) and our side-aware extensions.

The gauge-fixed consensus subspace and shared coordinates (:func:`glora_math.glora_aggregate`),
with rank-r_i readouts per client, an exact certificate of every aggregate, and the batched
route over same-shape modules (``group_fn``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from glora_math.aggregate import glora_aggregate, glora_aggregate_stack
from glora_math.errors import GloraError, GloraWarning, RankError
from glora_math.metrics import mean_update, state_factors
from glora_math.operators.interface import (
    AggregateResult,
    AggregationOperator,
    Communication,
    G,
    GroupFn,
    OperatorFn,
    OperatorState,
    RoundContext,
    SensitivityFn,
    factors_cost,
    register,
)
from glora_math.readout import readouts
from glora_math.tolerances import working_dtype
from glora_math.types import GaugeMode, LoRAFactors, Side, Sketch
from glora_math.validation import ValidatedClients


def _sketch(options: Mapping[str, float]) -> Sketch | None:
    """The randomized consensus selected by the options, or ``None`` (exact).

    ``sketch`` > 0 turns it on; ``oversample``, ``power_iters`` and ``sketch_seed`` (whole
    numbers) are the :class:`~glora_math.types.Sketch` settings; ``sketch_probes`` > 0 asks
    for the randomized certificate estimate with that many probes (``Sketch(certificate=
    "estimate")``, confidence 0.99).
    """
    if options.get("sketch", 0.0) <= 0:
        return None
    values: dict[str, Any] = {}
    for key, name in (("oversample", "oversample"), ("power_iters", "power_iters"),
                      ("sketch_seed", "seed"), ("sketch_probes", "probes")):  # fmt: skip
        v = options.get(key, float(getattr(Sketch(), name)) if name != "probes" else 0.0)
        if not float(v).is_integer():
            raise GloraError(f"option {key!r} must be a whole number, got {v!r}")
        values[name] = int(v)
    if values["probes"] > 0:  # the randomized certificate estimate, linear in N
        values["certificate"] = "estimate"
    else:
        del values["probes"]
    return Sketch(**values)


def _glora(
    gauge: GaugeMode, fold_residual: bool, side: Side = "left", auto_rank: bool = False
) -> OperatorFn:
    def fn(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        if not auto_rank:
            _check_client_ranks(ctx)
        limit = ctx.options.get("max_residual")
        state = glora_aggregate(
            fs,
            p,
            rank="auto" if auto_rank else ctx.rank,
            gauge=gauge,
            side=side,
            tol=ctx.options["tol"] if auto_rank else None,
            max_residual=None if limit is None or limit <= 0 else limit,
            sketch=_sketch(ctx.options),
        )
        per = readouts(state, ctx.client_ranks)
        update = state_factors(state)
        residual = None
        if fold_residual:
            mean = mean_update(fs, p)
            residual = mean.B @ mean.A - update.B @ update.A
        basis = state.U if state.side == "left" else None
        return AggregateResult(update, residual, per, basis=basis, certificate=state.certificate,
                               side=state.side)  # fmt: skip

    return fn


def _check_client_ranks(ctx: RoundContext) -> None:
    """A readout rank above the server rank cannot be served: name the first such client."""
    for i, r in enumerate(ctx.client_ranks):
        if r > ctx.rank:
            raise RankError(f"client rank {r} exceeds the server rank R={ctx.rank}", client=i)


def _glora_sensitivity(gauge: GaugeMode, sides: tuple[Side, ...]) -> SensitivityFn:
    """The consensus eigengap at R (K's eigenvalues lie in [0, 1]).

    The smaller of both sides' gaps for the side-aware operators.
    """

    def sensitivity(
        fs: Sequence[LoRAFactors], p: Tensor, R: int, state: OperatorState | None
    ) -> float:
        gaps = [1.0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GloraWarning)
            for side in sides:
                gaps.append(glora_aggregate(fs, p, rank=R, gauge=gauge, side=side).gap)
        return max(min(gaps), 0.0)

    return sensitivity


def _stack(modules: Sequence[Sequence[LoRAFactors]]) -> Sequence[LoRAFactors]:
    """The clients' factors of same-shape modules, stacked along a leading module dimension.

    Validated modules (:class:`~glora_math.validation.ValidatedClients`) give a validated stack.
    """
    n = len(modules[0])
    stacked: Sequence[LoRAFactors] = [
        LoRAFactors(torch.stack([m[i].B for m in modules]), torch.stack([m[i].A for m in modules]))
        for i in range(n)
    ]
    infos = [m.info for m in modules if isinstance(m, ValidatedClients)]
    if len(infos) == len(modules):  # every module was validated: so is their stack
        dtype = infos[0].dtype
        for info in infos[1:]:
            dtype = torch.promote_types(dtype, info.dtype)
        stacked = ValidatedClients(
            stacked,
            dataclasses.replace(
                infos[0], dtype=dtype, work_dtype=working_dtype(dtype),
                batch_shape=(len(modules),),
            ),
        )  # fmt: skip
    return stacked


def _glora_auto_group(modules: Sequence[Sequence[LoRAFactors]], p: Tensor,
                      ctx: RoundContext) -> list[AggregateResult]:  # fmt: skip
    """The side-aware GLoRA over same-shape modules: both sides batched, the side per module.

    :func:`glora_math.glora_aggregate_stack` (each module's two raw Gram matrices serve both
    sides' consensus and certificates); equal to ``fn`` module by module.
    """
    _check_client_ranks(ctx)
    limit = ctx.options.get("max_residual")
    states = glora_aggregate_stack(
        _stack(modules),
        p,
        rank=ctx.rank,
        side="auto",
        sketch=_sketch(ctx.options),
        max_residual=None if limit is None or limit <= 0 else limit,
    )
    results = []
    for st in states:
        basis = st.U if st.side == "left" else None
        results.append(AggregateResult(state_factors(st), None, readouts(st, ctx.client_ranks),
                                       basis=basis, certificate=st.certificate,
                                       side=st.side))  # fmt: skip
    return results


def _glora_group(gauge: GaugeMode, fold_residual: bool) -> GroupFn:
    """The paper's GLoRA over same-shape modules: one stacked call, certified per module.

    :func:`glora_math.glora_aggregate` on the stacked factors (batched kernels), one batched
    readout per distinct client rank, and each module's certificate (the ``max_residual``
    warning names the module); equal to ``fn`` module by module.
    """

    def group(
        modules: Sequence[Sequence[LoRAFactors]], p: Tensor, ctx: RoundContext
    ) -> list[AggregateResult]:
        _check_client_ranks(ctx)
        limit = ctx.options.get("max_residual")
        st = glora_aggregate(
            _stack(modules),
            p,
            rank=ctx.rank,
            gauge=gauge,
            sketch=_sketch(ctx.options),
            max_residual=None if limit is None or limit <= 0 else limit,
        )
        ranks = sorted(set(ctx.client_ranks))
        outs = dict(zip(ranks, readouts(st, ranks), strict=True))  # one batched SVD
        certs = st.module_certificates
        results = []
        for j, fs in enumerate(modules):
            per = [LoRAFactors(outs[r].B[j], outs[r].A[j]) for r in ctx.client_ranks]
            update = LoRAFactors(st.U[j], st.S[j])
            residual = None
            if fold_residual:
                mean = mean_update(fs, p)
                residual = mean.B @ mean.A - update.B @ update.A
            cert = None if certs is None else certs[j]
            results.append(AggregateResult(update, residual, per, basis=st.U[j], certificate=cert,
                                           side=st.side))  # fmt: skip
        return results

    return group


_GLORA_BASE = {
    G.GAUGE_INVARIANT_GL,
    G.GAUGE_INVARIANT_O,
    G.GAUGE_INVARIANT_SO,
    G.COMMON_GAUGE_EQUIVARIANT,
    G.PERMUTATION_INVARIANT,
    G.RANK_COMPATIBLE,
    G.SCALE_ROBUST_SUBSPACE,
    G.CERTIFIED,
}

#: ``max_residual <= 0`` means no warning.
#: ``sketch`` > 0 selects the randomized consensus (:class:`~glora_math.types.Sketch`).
_GLORA_OPTIONS = {
    "max_residual": 0.0,
    "sketch": 0.0,
    "oversample": 10.0,
    "power_iters": 2.0,
    "sketch_seed": 0.0,
    "sketch_probes": 0.0,
}

_MODES: tuple[GaugeMode, ...] = ("qr", "svd")
for _gauge in _MODES:
    for _fold in (False, True):
        _name = "glora" + ("" if _gauge == "qr" else "_svd") + ("_residual" if _fold else "")
        _g = set(_GLORA_BASE) | ({G.EXACT_MEAN} if _fold else set())
        register(
            AggregationOperator(
                name=_name,
                paper="arXiv 2605.06733 (reconstruction)",
                summary=(
                    f"gauge-fixed ({_gauge}) consensus subspace + shared coordinates"
                    + (" + dense residual folded into the base" if _fold else "")
                ),
                sends_back="rank-r_i readouts per client"
                + (" + dense d x k residual" if _fold else ""),
                guarantees=frozenset(_g),
                fn=_glora(_gauge, _fold),
                cost=(
                    (lambda d, k, r, R, n: Communication(up=r * (d + k), down=r * (d + k) + d * k))
                    if _fold
                    else factors_cost
                ),
                reconstruction=True,
                options=_GLORA_OPTIONS,
                group_fn=_glora_group(_gauge, _fold),
                sensitivity=_glora_sensitivity(_gauge, ("left",)),
            )
        )

# The side-aware extensions (ours, SPEC "Extensions"): the side with the smaller certified
# residual. Scaling one client changes the residuals and so may change the side: the subspace
# is not scale robust (the contract suite finds the counterexample).
_SIDED = _GLORA_BASE - {G.SCALE_ROBUST_SUBSPACE}

register(
    AggregationOperator(
        name="glora_auto",
        paper="arXiv 2605.06733 + side-aware consensus (ours)",
        summary="GLoRA on the side (B column spaces or A row spaces) with the smaller "
        "certified residual, server rank R",
        sends_back="rank-r_i readouts per client",
        guarantees=frozenset(_SIDED),
        fn=_glora("qr", False, side="auto"),
        cost=factors_cost,
        options=_GLORA_OPTIONS,
        group_fn=_glora_auto_group,
        sensitivity=_glora_sensitivity("qr", ("left", "right")),
    )
)

register(
    AggregationOperator(
        name="glora_auto_rank",
        paper="arXiv 2605.06733 + side-aware consensus and certified rank (ours)",
        summary="side-aware GLoRA at the smallest server rank whose certified relative "
        "residual is at most tol (default 0.05); the rank argument is not used (the rule "
        "picks R, capped by the clients' total rank)",
        sends_back="rank-r_i readouts per client",
        guarantees=frozenset(_SIDED),
        fn=_glora("qr", False, side="auto", auto_rank=True),
        cost=factors_cost,
        options={**_GLORA_OPTIONS, "tol": 0.05},
        sensitivity=_glora_sensitivity("qr", ("left", "right")),
    )
)
