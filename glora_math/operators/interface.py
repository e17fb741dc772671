"""The operator interface: what every aggregation rule declares, and the registry.

An :class:`AggregationOperator` wraps a pure function (:mod:`glora_math.baselines`,
:mod:`glora_math.aggregate`) and declares its paper, what the server sends back, its
communication cost and the set of :class:`Guarantee` s it has. The contract test suite
(:mod:`glora_math.testing`) checks every declared guarantee as a property and finds a
counterexample for every one it lacks. The operators themselves live one family a file beside
this one (``averaging``, ``exact``, ``svd``, ``rotation``, ``glora``); README's "Add an
operator" is the recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import torch
from torch import Tensor

from glora_math.errors import (
    GloraError,
    NonFiniteError,
    OptionError,
    RankError,
    UnknownOperatorError,
)
from glora_math.types import Certificate, LoRAFactors
from glora_math.validation import (
    KERNEL_ERRORS,
    ClientsInfo,
    ValidatedClients,
    WeightsLike,
    as_factors,
    check_finite_output,
    normalize_weights,
    overflow_error,
    validate_rank,
    validated,
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
        certifies it (the GLoRA family; FlexLoRA and ``svd_mean``: the spectrum's tail,
        Eckart-Young, or the error measured in float64 where the update is not exactly that
        truncation); ``None`` otherwise.
    route
        For operators with a dense alternative (FlexLoRA, ``svd_mean``): the route the cost
        model chose (``"factors"`` or ``"dense"``, :func:`glora_math.linalg.svd_route`).
    side
        The side of the consensus subspace (the GLoRA family: ``"left"``, the B column
        spaces, or ``"right"``, the A row spaces); ``None`` for operators without one.
    """

    update: LoRAFactors
    residual: Tensor | None
    client_factors: list[LoRAFactors] | None
    state: OperatorState | None = None
    basis: Tensor | None = None
    certificate: Certificate | None = None
    route: str | None = None
    side: Literal["left", "right"] | None = None

    def __repr__(self) -> str:
        """The parts' shapes and the certificate, never the entries."""
        parts = [f"update={self.update!r}"]
        if self.residual is not None:
            parts.append(f"residual={tuple(self.residual.shape)}")
        if self.client_factors is not None:
            parts.append(f"client_factors={len(self.client_factors)}")
        if self.certificate is not None:
            parts.append(f"certificate={self.certificate.relative_residual:.3e}")
        if self.route is not None:
            parts.append(f"route={self.route!r}")
        return f"AggregateResult({', '.join(parts)})"

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
    #: What the (validated) clients agree on: shape, dtypes, device (``None``: not known).
    info: ClientsInfo | None = None


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
    #: The server merges the round into the base weight and clients start a fresh LoRA (FLoRA):
    #: no global update is handed back (``AggregateResult.client_factors`` is None).
    restarts: bool = False
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
            Operator options: the certified operators read ``max_residual`` (warn above it); for
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
            weights = ctxs[0][1]  # normalised once, for every module
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
    ) -> tuple[ValidatedClients, Tensor, RoundContext]:
        """Validate once: the clients, the weights (normalised), the ranks and the options."""
        fs = validated(factors)  # (B, A) tuples are accepted; validated clients pass through
        info = fs.info
        p = normalize_weights(weights, len(fs), dtype=info.work_dtype, device=info.device)
        ranks = [f.rank for f in fs] if client_ranks is None else list(client_ranks)
        if len(ranks) != len(factors):
            raise RankError(f"got {len(ranks)} client ranks for {len(factors)} clients")
        for i, r in enumerate(ranks):
            try:
                validate_rank(r, name="client rank")
            except RankError as err:
                raise err.with_context(client=i) from None
        R = validate_rank(max(ranks) if rank is None else rank)
        opts = self.check_options(options)
        ranks_ = [int(r) for r in ranks]
        return fs, p, RoundContext(R, ranks_, state, {**self.options, **opts}, info=info)

    def check_options(self, options: Mapping[str, float] | None) -> dict[str, float]:
        """``options`` as a dict, or an :class:`OptionError` naming the unknown keys."""
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise OptionError(
                f"operator {self.name!r} has no option(s) {unknown}; "
                f"it takes {sorted(self.options)}"
            )
        return opts

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


#: The operator the runner, the peft path and the Flower app use when none is named: the one
#: the rule in README's "Which operator should I use?" picked from study F's powered cell
#: (docs/experiments.md, 2026-12-07): FlexLoRA. No operator's accuracy separated from FedIT's,
#: so the rule took the smallest mean aggregation error at the clients' rank.
DEFAULT_OPERATOR = "flexlora"


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
# Shared helpers of the families


def parse_options(text: str) -> dict[str, float]:
    """``"lam=0.02,steps=10"`` as ``{"lam": 0.02, "steps": 10.0}`` (a command line's options).

    Raises
    ------
    OptionError
        For an entry that is not ``name=number`` or a name given twice.
    """
    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not eq or not name.isidentifier() or not math.isfinite(number):
            raise OptionError(f"option {item!r} is not name=number (e.g. lam=0.02,steps=10)")
        if name in out:
            raise OptionError(f"option {name!r} is given twice")
        out[name] = number
    return out


def same_for_all(n: int, f: LoRAFactors, ranks: Sequence[int], method: str) -> list[LoRAFactors]:
    """``f`` for each of ``n`` clients, whose requested ranks must all be ``f``'s own."""
    for i, r in enumerate(ranks):
        if r != f.rank:
            raise RankError(
                f"{method} returns rank-{f.rank} factors; client asked for {r}", client=i
            )
    return [f] * n


def factors_cost(d: int, k: int, r: int, R: int, n: int) -> Communication:
    """Factors of rank r up and down: ``r (d + k)`` floats each way."""
    return Communication(up=r * (d + k), down=r * (d + k))


G = Guarantee

#: Operators whose server update is exactly the mean update W_bar, which every gauge leaves alone.
EXACT_GUARANTEES = frozenset(
    {
        G.EXACT_MEAN,
        G.GAUGE_INVARIANT_GL,
        G.GAUGE_INVARIANT_O,
        G.GAUGE_INVARIANT_SO,
        G.COMMON_GAUGE_EQUIVARIANT,
        G.PERMUTATION_INVARIANT,
    }
)


__all__ = [
    "DEFAULT_OPERATOR",
    "EXACT_GUARANTEES",
    "AggregateResult",
    "AggregationOperator",
    "Communication",
    "CostFn",
    "G",
    "GroupFn",
    "Guarantee",
    "OperatorFn",
    "OperatorState",
    "RoundContext",
    "SensitivityFn",
    "WarmStateFn",
    "factors_cost",
    "get_operator",
    "list_operators",
    "parse_options",
    "register",
    "same_for_all",
]
