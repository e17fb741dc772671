"""The operator zoo: every aggregation rule behind one typed interface.

Each :class:`AggregationOperator` wraps a pure function (:mod:`glora_math.baselines`,
:mod:`glora_math.aggregate`) and declares its paper, what the server sends back, its
communication cost and the set of :class:`Guarantee` s it has. The contract test suite checks
every declared guarantee as a property and finds a counterexample for every one it lacks.

Usage::

    op = get_operator("glora")
    result = op(clients, weights, rank=16, client_ranks=[8] * len(clients))
    result.update          # the server's low-rank update (factors)
    result.client_factors  # what each client continues from
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import torch
from torch import Tensor

from glora_math import baselines as bl
from glora_math.aggregate import glora_aggregate
from glora_math.errors import (
    GloraError,
    GloraWarning,
    NonFiniteError,
    RankError,
    UnknownOperatorError,
)
from glora_math.linalg import condition_number, svd_route
from glora_math.metrics import mean_update, state_factors
from glora_math.readout import readouts
from glora_math.types import Certificate, GaugeMode, LoRAFactors, Side, Sketch
from glora_math.validation import (
    KERNEL_ERRORS,
    WeightsLike,
    as_factors,
    check_finite_output,
    normalize_weights,
    overflow_error,
    validate_clients,
    validate_rank,
)


class Guarantee(StrEnum):
    """Mathematical guarantees an operator may declare (each is a property test).

    The *server update* is the change the round makes to the global model: the low-rank update
    plus any dense residual folded into the base weight.
    """

    #: The server update is unchanged by independent per-client gauges G_i in GL(r_i).
    GAUGE_INVARIANT_GL = "gauge_invariant_GL"
    #: ... by independent per-client orthogonal gauges G_i in O(r_i).
    GAUGE_INVARIANT_O = "gauge_invariant_O"
    #: ... by independent per-client special orthogonal gauges G_i in SO(r_i).
    GAUGE_INVARIANT_SO = "gauge_invariant_SO"
    #: A gauge G shared by all clients leaves the server update unchanged.
    COMMON_GAUGE_EQUIVARIANT = "common_gauge_equivariant"
    #: The server update equals the mean update sum_i p_i B_i A_i.
    EXACT_MEAN = "exact_mean"
    #: Heterogeneous client ranks are accepted and each client receives rank-r_i factors that
    #: are a best rank-r_i approximation of the server's low-rank update.
    RANK_COMPATIBLE = "rank_compatible"
    #: Permuting the clients (with their weights) leaves the server update unchanged.
    PERMUTATION_INVARIANT = "permutation_invariant"
    #: Scaling one client's update by c > 0 leaves the server's subspace unchanged (its
    #: ``basis``, e.g. GLoRA's U_ref; otherwise the column space of the update).
    SCALE_ROBUST_SUBSPACE = "scale_robust_subspace"
    #: The result carries a certificate whose relative residual equals the measured relative
    #: error ``||update - W_bar||_F / ||W_bar||_F`` of its low-rank update (to rounding).
    CERTIFIED = "certified"


@dataclass(frozen=True)
class OperatorState:
    """Explicit, serialisable operator state carried between rounds.

    ``round_index`` counts rounds from 1; ``tensors`` holds named tensors (e.g. FedRot's
    reference factors ``B_ref``/``A_ref``, FedSA's personal ``B_<i>``). ``to_tensors`` /
    ``from_tensors`` give a flat ``{name: tensor}`` dict for safetensors (never pickle).
    """

    round_index: int = 1
    tensors: Mapping[str, Tensor] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, Tensor]:
        """Flatten to ``{name: tensor}`` with the round index as a 0-d int64 tensor."""
        out = {f"t.{k}": v.detach().contiguous() for k, v in self.tensors.items()}
        out["round_index"] = torch.tensor(self.round_index, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, flat: Mapping[str, Tensor]) -> OperatorState:
        """Inverse of :meth:`to_tensors`."""
        if "round_index" not in flat:
            raise GloraError("operator state has no 'round_index'")
        tensors = {k[2:]: v for k, v in flat.items() if k.startswith("t.")}
        return cls(round_index=int(flat["round_index"]), tensors=tensors)


@dataclass(frozen=True)
class AggregateResult:
    """What an operator computed in one round.

    Parameters
    ----------
    update
        The server's low-rank update as factors (d-by-k through ``update.delta()``).
    residual
        Dense ``(d, k)`` part folded into the base weight, layout ``out_in`` (as ``B A``), or
        ``None``. Only operators that are dense by definition have one.
    client_factors
        The factors each client continues from (rank ``client_ranks[i]``), or ``None`` when
        clients re-initialise their adapters (FLoRA).
    state
        State for the next round, or ``None`` for stateless operators.
    basis
        Orthonormal basis ``(d, R)`` of the server's subspace where the method defines one
        (GLoRA's ``U_ref``, the SVD operators' top-R left singular vectors); ``None`` means the
        column space of the update.
    certificate
        The exact relative error of ``update`` against the mean update, where the operator
        certifies it (the GLoRA family); ``None`` otherwise.
    route
        For operators with a dense alternative (FlexLoRA, ``svd_mean``): the route the cost
        model chose (``"factors"`` or ``"dense"``, :func:`glora_math.linalg.svd_route`).
    """

    update: LoRAFactors
    residual: Tensor | None
    client_factors: list[LoRAFactors] | None
    state: OperatorState | None = None
    basis: Tensor | None = None
    certificate: Certificate | None = None
    route: str | None = None

    def dense(self) -> Tensor:
        """The server update ``update.delta() + residual`` as a dense matrix (tests only)."""
        d = self.update.delta()
        return d if self.residual is None else d.to(self.residual.dtype) + self.residual


@dataclass(frozen=True)
class Communication:
    """Floats per client per round: sent to the server (``up``) and received (``down``)."""

    up: int
    down: int


@dataclass(frozen=True)
class RoundContext:
    """Everything an operator's function sees besides factors and normalised weights."""

    rank: int
    client_ranks: list[int]
    state: OperatorState | None
    #: Operator options (e.g. GLoRA's ``tol`` and ``max_residual``); each operator reads its own.
    options: Mapping[str, float] = field(default_factory=dict)


OperatorFn = Callable[[Sequence[LoRAFactors], Tensor, RoundContext], AggregateResult]
CostFn = Callable[[int, int, int, int, int], Communication]
#: Same-shape modules in one call: ``modules[j][i]`` is client i's factors of module j.
GroupFn = Callable[[Sequence[Sequence[LoRAFactors]], Tensor, RoundContext], list[AggregateResult]]
#: The operator's state built from a reference global adapter and a round index.
WarmStateFn = Callable[[LoRAFactors, int], "OperatorState"]
#: A relative gap in (0, 1] that bounds how far the operator's output moves under rounding
#: (1 for operators whose output is a stable function of the input; smaller near a tie).
SensitivityFn = Callable[[Sequence[LoRAFactors], Tensor, int, "OperatorState | None"], float]


@dataclass(frozen=True)
class AggregationOperator:
    """A registered aggregation rule: metadata, declared guarantees and a pure function."""

    name: str
    paper: str
    summary: str
    sends_back: str
    guarantees: frozenset[Guarantee]
    fn: OperatorFn
    cost: CostFn
    equal_ranks: bool = False
    #: Every client keeps A frozen and shared (FFA-LoRA); see also ``frozen``.
    shared_A: bool = False
    stateful: bool = False
    reconstruction: bool = False
    #: Options the operator takes, with their defaults (see :class:`RoundContext`).
    options: Mapping[str, float] = field(default_factory=dict)
    #: Clients keep personal factors between rounds (FedSA-LoRA): a client that sits a round
    #: out keeps its own, instead of receiving the broadcast.
    personal: bool = False
    #: The factor clients keep frozen (and shared) in round t, counted from 1: "A", "B" or
    #: None (RoLoRA alternates); clients train only the other one. Default: A for
    #: ``shared_A`` operators, else nothing.
    frozen: Callable[[int], Literal["A", "B"] | None] | None = None
    #: Builds the operator's state from a reference global adapter and a round index
    #: (stateful operators; e.g. FedRot-LoRA's alignment reference).
    warm_state: WarmStateFn | None = None
    #: Aggregates same-shape modules in one batched call (equal to ``fn`` per module).
    group_fn: GroupFn | None = None
    #: The relative gap that bounds how far the output moves under rounding (tests and
    #: error analysis); ``None`` means 1 (a stable function of the input).
    sensitivity: SensitivityFn | None = None

    def __call__(
        self,
        factors: Sequence[LoRAFactors],
        weights: WeightsLike = None,
        *,
        rank: int | None = None,
        client_ranks: Sequence[int] | None = None,
        state: OperatorState | None = None,
        options: Mapping[str, float] | None = None,
    ) -> AggregateResult:
        """Aggregate one round.

        Parameters
        ----------
        factors
            Client factors (scale folded in).
        weights
            Client weights (renormalised; ``None`` for equal).
        rank
            Server rank R where the method has one (default: the largest client rank).
        client_ranks
            Rank of the factors each client receives (default: its own rank).
        state
            The previous round's state for stateful methods.
        options
            Operator options: the GLoRA family reads ``max_residual`` (warn above it) and, for
            ``rank="auto"`` operators, ``tol``; unknown keys are an error.
        """
        fs, p, ctx = self._context(
            factors, weights, rank=rank, client_ranks=client_ranks, state=state, options=options
        )
        return self._call(fs, p, ctx)

    def _call(self, fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        """``fn`` without autograd; overflow and failed kernels become typed errors.

        Inputs are validated finite, but finite factors can still overflow the working dtype;
        then a kernel fails or the result holds Inf/NaN: both raise a
        :class:`~glora_math.errors.NonFiniteError` naming the largest client.
        """
        try:
            with torch.no_grad():
                res = self.fn(fs, p, ctx)
        except KERNEL_ERRORS as err:
            raise self._kernel_error(fs, err) from None
        return self._checked(fs, res)

    def _checked(self, fs: Sequence[LoRAFactors], res: AggregateResult) -> AggregateResult:
        """``res`` if every part of it is finite, else a NonFiniteError naming a client."""
        parts = [res.update.B, res.update.A, res.residual]
        for cf in res.client_factors or []:
            parts += [cf.B, cf.A]
        check_finite_output(parts, fs, f"operator {self.name!r}")
        if res.certificate is not None and not math.isfinite(res.certificate.relative_residual):
            check_finite_output([torch.tensor(math.nan)], fs, f"operator {self.name!r}")
        return res

    def aggregate_group(
        self,
        modules: Sequence[Sequence[LoRAFactors]],
        weights: WeightsLike = None,
        *,
        rank: int | None = None,
        client_ranks: Sequence[int] | None = None,
        options: Mapping[str, float] | None = None,
    ) -> list[AggregateResult]:
        """Aggregate same-shape modules of stateless operators (``modules[j][i]``: client i).

        One batched call where the operator has ``group_fn``, else ``fn`` module by module;
        the results are the same either way.
        """
        if self.stateful:
            raise GloraError(f"operator {self.name!r} is stateful: aggregate module by module")
        ctxs = []
        for fs in modules:  # one validation per module, at the boundary
            ctxs.append(
                self._context(
                    fs, weights, rank=rank, client_ranks=client_ranks, state=None, options=options
                )
            )
        if not ctxs:
            return []
        group = [c[0] for c in ctxs]
        _, p, ctx = ctxs[0]
        if self.group_fn is not None:
            group_fn = self.group_fn
            try:
                with torch.no_grad():
                    results = group_fn(group, p, ctx)
            except KERNEL_ERRORS as err:
                flat = [f for fs in group for f in fs]  # module after module
                raise self._kernel_error(flat, err, clients=len(group[0])) from None
            # each module's result is checked against its own clients
            return [self._checked(fs, r) for fs, r in zip(group, results, strict=True)]
        return [self._call(fs, pc, c) for fs, pc, c in ctxs]

    def _kernel_error(
        self, fs: Sequence[LoRAFactors], err: Exception, *, clients: int | None = None
    ) -> NonFiniteError:
        """A failed kernel on validated (finite) input: overflow; name the largest client."""
        cause = f"{self.name}: a linear-algebra kernel failed on overflowed values ({err})"
        return overflow_error(cause, fs, clients=clients)

    def _context(
        self,
        factors: Sequence[LoRAFactors],
        weights: WeightsLike,
        *,
        rank: int | None,
        client_ranks: Sequence[int] | None,
        state: OperatorState | None,
        options: Mapping[str, float] | None,
    ) -> tuple[list[LoRAFactors], Tensor, RoundContext]:
        info = validate_clients(factors)
        fs = [as_factors(f, i) for i, f in enumerate(factors)]  # (B, A) tuples are accepted
        p = normalize_weights(weights, len(factors), dtype=info.work_dtype, device=info.device)
        ranks = [f.rank for f in fs] if client_ranks is None else list(client_ranks)
        if len(ranks) != len(factors):
            raise RankError(f"got {len(ranks)} client ranks for {len(factors)} clients")
        for i, r in enumerate(ranks):
            try:
                validate_rank(r, name="client rank")
            except RankError as err:
                raise err.with_context(client=i) from None
        R = validate_rank(max(ranks) if rank is None else rank)
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise GloraError(
                f"operator {self.name!r} has no option(s) {unknown}; "
                f"it takes {sorted(self.options)}"
            )
        return fs, p, RoundContext(R, [int(r) for r in ranks], state, {**self.options, **opts})

    def frozen_factor(self, round_index: int) -> Literal["A", "B"] | None:
        """The factor clients keep frozen in round ``round_index`` (from 1), if any."""
        if self.frozen is not None:
            return self.frozen(round_index)
        return "A" if self.shared_A else None

    def protocol(self, factors: Sequence[LoRAFactors], round_index: int = 1) -> list[LoRAFactors]:
        """``factors`` as clients following this operator's protocol would send them.

        The factor the operator keeps frozen in ``round_index`` (:meth:`frozen_factor`) becomes
        client 0's for every client (FFA-LoRA's shared A, RoLoRA's shared A or B); other
        operators get the factors unchanged. For demos and tests on arbitrary clients.

        Raises
        ------
        ShapeMismatchError
            If the clients' ranks differ, so that one factor cannot be shared.
        """
        fs = [as_factors(f, i) for i, f in enumerate(factors)]
        frozen = self.frozen_factor(round_index)
        if frozen == "A":
            return [LoRAFactors(f.B, fs[0].A) for f in fs]
        if frozen == "B":
            return [LoRAFactors(fs[0].B, f.A) for f in fs]
        return fs

    def communication(
        self, d: int, k: int, client_rank: int, rank: int | None = None, n_clients: int = 1
    ) -> Communication:
        """Floats a client of rank ``client_rank`` sends and receives per round."""
        return self.cost(d, k, client_rank, client_rank if rank is None else rank, n_clients)


_REGISTRY: dict[str, AggregationOperator] = {}


def register(op: AggregationOperator) -> AggregationOperator:
    """Add an operator to the registry (names are unique)."""
    if op.name in _REGISTRY:
        raise ValueError(f"operator {op.name!r} is already registered")
    _REGISTRY[op.name] = op
    return op


def get_operator(name: str) -> AggregationOperator:
    """The registered operator called ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownOperatorError(
            f"unknown operator {name!r}; known: {sorted(_REGISTRY)}"
        ) from None


def list_operators() -> list[str]:
    """Names of all registered operators, in registration order."""
    return list(_REGISTRY)


# ----------------------------------------------------------------------------------------------
# Shared helpers of the wrappers


def _same_for_all(n: int, f: LoRAFactors, ranks: Sequence[int], method: str) -> list[LoRAFactors]:
    for i, r in enumerate(ranks):
        if r != f.rank:
            raise RankError(
                f"{method} returns rank-{f.rank} factors; client asked for {r}", client=i
            )
    return [f] * n


def _factors_cost(d: int, k: int, r: int, R: int, n: int) -> Communication:
    return Communication(up=r * (d + k), down=r * (d + k))


G = Guarantee

# Operators whose server update is exactly the mean update W_bar, which every gauge leaves alone.
_EXACT_GUARANTEES = frozenset(
    {
        G.EXACT_MEAN,
        G.GAUGE_INVARIANT_GL,
        G.GAUGE_INVARIANT_O,
        G.GAUGE_INVARIANT_SO,
        G.COMMON_GAUGE_EQUIVARIANT,
        G.PERMUTATION_INVARIANT,
    }
)

# ----------------------------------------------------------------------------------------------
# FedIT, FFA-LoRA, FedSA-LoRA, FedEx-LoRA, FLoRA-NA


def _broadcast(
    rule: Callable[[Sequence[LoRAFactors], Tensor], LoRAFactors], method: str
) -> OperatorFn:
    """An operator whose global factors are sent unchanged to every client."""

    def fn(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        g = rule(fs, p)
        return AggregateResult(g, None, _same_for_all(len(fs), g, ctx.client_ranks, method))

    return fn


register(
    AggregationOperator(
        name="fedit",
        paper="arXiv 2305.05644",
        summary="average B and A separately",
        sends_back="global factors (rank r)",
        guarantees=frozenset({G.COMMON_GAUGE_EQUIVARIANT, G.PERMUTATION_INVARIANT}),
        fn=_broadcast(bl.fedit, "FedIT"),
        cost=_factors_cost,
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
    return AggregateResult(glob, None, _same_for_all(len(fs), glob, ctx.client_ranks, "LoRA-FAIR"))


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
        cost=_factors_cost,
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
        _same_for_all(len(fs), glob, ctx.client_ranks, "RoLoRA"),
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
    _same_for_all(len(fs), per[0], ctx.client_ranks, "FedSA-LoRA")
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


def _fedex(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    g, residual = bl.fedex_lora(fs, p, layout="out_in")
    return AggregateResult(g, residual, _same_for_all(len(fs), g, ctx.client_ranks, "FedEx-LoRA"))


register(
    AggregationOperator(
        name="fedex_lora",
        paper="arXiv 2410.09432",
        summary="FedIT factors + exact dense residual folded into the base weight",
        sends_back="global factors (rank r) + dense d x k residual for the base weight",
        guarantees=_EXACT_GUARANTEES,
        fn=_fedex,
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=r * (d + k) + d * k),
        equal_ranks=True,
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
        cost=_factors_cost,
        equal_ranks=True,
        reconstruction=True,
        sensitivity=_flora_na_sensitivity,
    )
)

# ----------------------------------------------------------------------------------------------
# FLoRA stacking, FlexLoRA, exact SVD of the mean, HetLoRA


def _flora(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    return AggregateResult(bl.flora_stack(fs, p), None, None)


register(
    AggregationOperator(
        name="flora",
        paper="arXiv 2409.05976",
        summary="stack all clients' factors (exact); merge into base, clients re-initialise",
        sends_back="stacked factors (rank sum r_i) merged into the base weight",
        guarantees=_EXACT_GUARANTEES,
        fn=_flora,
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=n * r * (d + k)),
    )
)


def _svd_result(default: Literal["balanced", "left"]) -> OperatorFn:
    """Truncated SVD of the mean; the factor split from option ``balanced_split`` if given."""

    def fn(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
        info = validate_clients(fs)
        split = default
        if "balanced_split" in ctx.options:
            split = "balanced" if ctx.options["balanced_split"] > 0 else "left"
        U, s, Vh = bl.svd_of_mean(fs, p, rank=ctx.rank)
        glob = bl.truncate_svd(U, s, Vh, ctx.rank, info.dtype, split=split)
        per = [bl.truncate_svd(U, s, Vh, r, info.dtype, split=split) for r in ctx.client_ranks]
        route = svd_route(info.d, info.k, sum(f.rank for f in fs))
        return AggregateResult(glob, None, per, basis=U, route=route)

    return fn


def _svd_sensitivity(
    fs: Sequence[LoRAFactors], p: Tensor, R: int, state: OperatorState | None
) -> float:
    """The relative singular gap (s_R - s_{R+1}) / s_1 of the mean (1 when R >= its rank)."""
    s = bl.svd_of_mean(fs, p, rank=max(1, min(R + 1, sum(f.rank for f in fs))))[1]
    s = s.detach().to(torch.float64)
    if s.numel() <= R or float(s[0]) == 0.0:
        return 1.0
    return max((float(s[R - 1]) - float(s[R])) / float(s[0]), 0.0)


_SVD_GUARANTEES = frozenset(
    {
        G.GAUGE_INVARIANT_GL,
        G.GAUGE_INVARIANT_O,
        G.GAUGE_INVARIANT_SO,
        G.COMMON_GAUGE_EQUIVARIANT,
        G.PERMUTATION_INVARIANT,
        G.RANK_COMPATIBLE,
    }
)

register(
    AggregationOperator(
        name="flexlora",
        paper="arXiv 2402.11505",
        summary="best rank-r_i approximation of the mean, per client (from factors); as the "
        "published code, B = U_r S_r and A = V_r^T (option balanced_split=1: sqrt(S) each)",
        sends_back="rank-r_i factors per client",
        guarantees=_SVD_GUARANTEES,
        fn=_svd_result("left"),
        options={"balanced_split": 0.0},
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=r * (d + k)),
        sensitivity=_svd_sensitivity,
    )
)

register(
    AggregationOperator(
        name="svd_mean",
        paper="Eckart-Young (the rank-R optimum)",
        summary="exact truncated SVD of the mean at server rank R, readouts per client",
        sends_back="rank-r_i factors per client",
        guarantees=_SVD_GUARANTEES,
        fn=_svd_result("balanced"),
        cost=lambda d, k, r, R, n: Communication(up=r * (d + k), down=r * (d + k)),
        sensitivity=_svd_sensitivity,
    )
)


def _hetlora(fs: Sequence[LoRAFactors], p: Tensor, ctx: RoundContext) -> AggregateResult:
    weighted = ctx.options.get("norm_weighted", 0.0) > 0
    glob, per = bl.hetlora(fs, p, client_ranks=ctx.client_ranks, norm_weighted=weighted)
    return AggregateResult(glob, None, per)


register(
    AggregationOperator(
        name="hetlora",
        paper="arXiv 2401.06432",
        summary="zero-pad to max rank, average (as the public codes: weights p_i; option "
        "norm_weighted=1: the paper's p_i ||B_i A_i||), truncate per client",
        sends_back="truncated global factors (rank r_i)",
        # With equal ranks HetLoRA is a (norm-weighted) FedIT, hence common-gauge equivariant.
        guarantees=frozenset({G.PERMUTATION_INVARIANT, G.COMMON_GAUGE_EQUIVARIANT}),
        fn=_hetlora,
        options={"norm_weighted": 0.0},
        cost=_factors_cost,
    )
)

# ----------------------------------------------------------------------------------------------
# FedRot-LoRA


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
            glob, None, _same_for_all(len(fs), glob, ctx.client_ranks, "FedRot-LoRA"), nxt
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
        cost=_factors_cost,
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
        cost=_factors_cost,
        equal_ranks=True,
        stateful=True,
        warm_state=_fedrot_state,
        sensitivity=_fedrot_sensitivity,
        options={"first_aligned_b": 0.0},
    )
)

# ----------------------------------------------------------------------------------------------
# GLoRA


def _sketch(options: Mapping[str, float]) -> Sketch | None:
    """The randomized consensus selected by the options, or ``None`` (exact).

    ``sketch`` > 0 turns it on; ``oversample``, ``power_iters`` and ``sketch_seed`` (whole
    numbers) are the :class:`~glora_math.types.Sketch` settings.
    """
    if options.get("sketch", 0.0) <= 0:
        return None
    values = {}
    for key, name in (("oversample", "oversample"), ("power_iters", "power_iters"),
                      ("sketch_seed", "seed")):  # fmt: skip
        v = options.get(key, float(getattr(Sketch(), name)))
        if not float(v).is_integer():
            raise GloraError(f"option {key!r} must be a whole number, got {v!r}")
        values[name] = int(v)
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
        return AggregateResult(update, residual, per, basis=basis, certificate=state.certificate)

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
        n = len(modules[0])
        stack = [
            (torch.stack([m[i].B for m in modules]), torch.stack([m[i].A for m in modules]))
            for i in range(n)
        ]
        stacked = [LoRAFactors(B, A) for B, A in stack]
        limit = ctx.options.get("max_residual")
        st = glora_aggregate(
            stacked,
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
            results.append(AggregateResult(update, residual, per, basis=st.U[j], certificate=cert))
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
                    else _factors_cost
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
        cost=_factors_cost,
        options=_GLORA_OPTIONS,
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
        cost=_factors_cost,
        options={**_GLORA_OPTIONS, "tol": 0.05},
        sensitivity=_glora_sensitivity("qr", ("left", "right")),
    )
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
