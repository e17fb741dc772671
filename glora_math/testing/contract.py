"""The operator contract as a library: one property per guarantee, for any operator.

Every :class:`~glora_math.operators.Guarantee` has a property here (:data:`PROPERTIES`). For an
operator that declares a guarantee the property must hold on every drawn problem; for one that
does not, the same property must be falsified by a found counterexample (otherwise the
declaration is missing). The project's contract test runs every registered operator through
:func:`check_guarantee`; a user who registers an operator runs the same checks:

>>> from glora_math.testing import check_contract                        # doctest: +SKIP
>>> check_contract("my_operator")  # raises ContractError naming the guarantee  # doctest: +SKIP

Needs ``hypothesis`` (``pip install glora-math[test]``). Tolerances come from
:mod:`glora_math.tolerances` (dtype, dimensions, conditioning), as in the property suite.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

from glora_math import LoRAFactors, apply_gauge, random_invertible
from glora_math.errors import GloraError, RankClampedWarning, ZeroEigengapWarning
from glora_math.linalg import projector_distance
from glora_math.operators import (
    AggregateResult,
    AggregationOperator,
    Guarantee,
    OperatorState,
    get_operator,
)
from glora_math.testing.helpers import cond, f64, n_dims, state_tol
from glora_math.testing.strategies import Problem, conditioned_factors, gauges_for, problems
from glora_math.tolerances import certificate_tol, product_tol, subspace_tol

G = Guarantee


class FalsifiedError(AssertionError):
    """The property does not hold for this example (a counterexample)."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise FalsifiedError(what)


def _prepare(
    op: AggregationOperator, pb: Problem, state: OperatorState | None = None
) -> list[LoRAFactors]:
    """Adapt a drawn problem to the operator's protocol in the state's round.

    The factor the operator declares frozen in that round (A for FFA-LoRA; A, then B, for
    RoLoRA) is client 0's for every client.
    """
    try:
        return op.protocol(pb.factors, 1 if state is None else state.round_index)
    except GloraError as err:  # heterogeneous ranks cannot share one factor
        raise FalsifiedError(f"the protocol cannot hold for this input: {err}") from err


def _state(op: AggregationOperator, pb: Problem, data: st.DataObject) -> OperatorState | None:
    """A warm state for operators that declare one: a random reference and a drawn round."""
    if op.warm_state is None:
        return None
    r = pb.ranks[0]
    g = torch.Generator().manual_seed(pb.seed + 11)
    ref = conditioned_factors(pb.d, pb.k, r, cond=2.0, generator=g, dtype=pb.dtype)
    round_index = data.draw(st.sampled_from([1, 2]), label="round")
    return op.warm_state(ref, round_index)


def _run(
    op: AggregationOperator,
    clients: list[LoRAFactors],
    weights: torch.Tensor | None,
    *,
    rank: int,
    state: OperatorState | None,
    client_ranks: list[int] | None = None,
) -> AggregateResult:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroEigengapWarning)
        # R above the clients' span is clamped by design (documented, tested in the core suite).
        warnings.simplefilter("ignore", RankClampedWarning)
        try:
            return op(clients, weights, rank=rank, client_ranks=client_ranks, state=state)
        except ZeroEigengapWarning:
            # Statements about U_ref presuppose a unique consensus subspace.
            reject()
        except GloraError as err:
            raise FalsifiedError(f"operator refused the input: {err}") from err


def _sensitivity(
    op: AggregationOperator,
    pb: Problem,
    clients: list[LoRAFactors],
    R: int,
    state: OperatorState | None = None,
) -> float:
    """The gap that bounds how far this operator's output moves under rounding (declared)."""
    if op.sensitivity is None:
        return 1.0
    return op.sensitivity(clients, pb.p.to(clients[0].B.dtype), R, state)


def _tol(pb: Problem, clients: list[LoRAFactors], others: list[LoRAFactors], gap: float) -> float:
    kappa = max(cond(c.B) * cond(c.A) for c in [*clients, *others])
    scale = sum(
        float(pb.p[i]) * max(float(a.B.norm() * a.A.norm()), float(b.B.norm() * b.A.norm()))
        for i, (a, b) in enumerate(zip(clients, others, strict=True))
    )
    return state_tol(pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=kappa, gap=gap, scale=scale)


def _server_rank(pb: Problem, data: st.DataObject) -> int:
    union = pb.union_dim()
    lo = max(pb.ranks)
    return data.draw(st.integers(lo, max(lo, union)), label="R")


def _equal_rank_problems(op: AggregationOperator, **kw: object) -> st.SearchStrategy[Problem]:
    return problems(equal_ranks=op.equal_ranks, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# One property per guarantee: each takes (op, data) and raises FalsifiedError on a counterexample.


def _gauge_property(kind: str) -> Callable[[AggregationOperator, st.DataObject], None]:
    def prop(op: AggregationOperator, data: st.DataObject) -> None:
        pb = data.draw(_equal_rank_problems(op, min_clients=2), label="problem")
        state = _state(op, pb, data)
        clients = _prepare(op, pb, state)
        R = _server_rank(pb, data)
        Gs, _ = data.draw(gauges_for(pb.ranks, kind=kind), label="gauges")
        gauged = [apply_gauge(c, g.to(pb.dtype)) for c, g in zip(clients, Gs, strict=True)]
        a = _run(op, clients, pb.weights, rank=R, state=state)
        b = _run(op, gauged, pb.weights, rank=R, state=state)
        tol = _tol(pb, clients, gauged, _sensitivity(op, pb, clients, R, state))
        err = float((f64(a.dense()) - f64(b.dense())).norm())
        _check(err <= tol, f"update moved by {err:.3e} > {tol:.3e} under {kind} gauges")

    return prop


def _common_gauge(op: AggregationOperator, data: st.DataObject) -> None:
    pb = data.draw(problems(equal_ranks=True), label="problem")
    state = _state(op, pb, data)
    clients = _prepare(op, pb, state)
    R = _server_rank(pb, data)
    c = data.draw(st.floats(1.0, 100.0), label="gauge_cond")
    Gm = random_invertible(pb.ranks[0], cond=c, generator=torch.Generator().manual_seed(pb.seed))
    moved = [apply_gauge(x, Gm.to(pb.dtype)) for x in clients]
    a = _run(op, clients, pb.weights, rank=R, state=state)
    b = _run(op, moved, pb.weights, rank=R, state=state)
    tol = _tol(pb, clients, moved, _sensitivity(op, pb, clients, R, state))
    err = float((f64(a.dense()) - f64(b.dense())).norm())
    _check(err <= tol, f"update moved by {err:.3e} > {tol:.3e} under a common gauge")


def _exact_mean(op: AggregationOperator, data: st.DataObject) -> None:
    pb = data.draw(_equal_rank_problems(op, weights="with_zeros"), label="problem")
    state = _state(op, pb, data)
    clients = _prepare(op, pb, state)
    R = _server_rank(pb, data)
    res = _run(op, clients, pb.weights, rank=R, state=state)
    W = sum(
        (float(pb.p[i]) * f64(c.delta()) for i, c in enumerate(clients)),
        start=torch.zeros(pb.d, pb.k, dtype=torch.float64),
    )
    tol = _tol(pb, clients, clients, 1.0)
    err = float((f64(res.dense()) - W).norm())
    _check(err <= tol, f"update differs from the mean by {err:.3e} > {tol:.3e}")


def _rank_compatible(op: AggregationOperator, data: st.DataObject) -> None:
    pb = data.draw(problems(min_clients=2), label="problem")  # heterogeneous ranks allowed
    state = _state(op, pb, data)
    clients = _prepare(op, pb, state)
    R = _server_rank(pb, data)
    want = data.draw(st.lists(st.integers(1, R), min_size=pb.n, max_size=pb.n), label="ranks")
    res = _run(op, clients, pb.weights, rank=R, state=state, client_ranks=want)
    _check(res.client_factors is not None, "clients receive no factors (re-initialise)")
    assert res.client_factors is not None
    X = f64(res.update.delta())
    s = torch.linalg.svdvals(X)
    tol = product_tol(
        pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), scale=float(s[0]) if s.numel() else 1.0
    )
    for i, (f, r) in enumerate(zip(res.client_factors, want, strict=True)):
        _check(f.rank == r, f"client {i} asked for rank {r}, got {f.rank}")
        err = float((f64(f.delta()) - X).norm())
        best = float(s[r:].pow(2).sum().sqrt())
        _check(abs(err - best) <= tol, f"client {i}: error {err:.3e} vs best rank-{r} {best:.3e}")


def _permutation(op: AggregationOperator, data: st.DataObject) -> None:
    pb = data.draw(_equal_rank_problems(op, min_clients=2, weights="random"), label="problem")
    state = _state(op, pb, data)
    clients = _prepare(op, pb, state)
    R = _server_rank(pb, data)
    perm = data.draw(st.permutations(range(pb.n)), label="perm")
    assert pb.weights is not None
    a = _run(op, clients, pb.weights, rank=R, state=state)
    b = _run(op, [clients[i] for i in perm], pb.weights[list(perm)], rank=R, state=state)
    tol = _tol(pb, clients, clients, _sensitivity(op, pb, clients, R, state))
    err = float((f64(a.dense()) - f64(b.dense())).norm())
    _check(err <= tol, f"update moved by {err:.3e} > {tol:.3e} under a permutation")


def _col_space(X: torch.Tensor, noise: float) -> tuple[torch.Tensor, float]:
    """Column space of X above the operator's rounding noise, and its relative singular gap."""
    U, s, _ = torch.linalg.svd(X, full_matrices=False)
    if s.numel() == 0 or float(s[0]) <= noise:
        return U[:, :0], 1.0
    r = int((s > noise).sum())
    nxt = float(s[r]) if r < s.numel() else 0.0
    return U[:, :r], (float(s[r - 1]) - nxt) / float(s[0])


def _scale_robust(op: AggregationOperator, data: st.DataObject) -> None:
    pb = data.draw(_equal_rank_problems(op, min_clients=2, weights="random"), label="problem")
    state = _state(op, pb, data)
    clients = _prepare(op, pb, state)
    R = _server_rank(pb, data)
    j = data.draw(st.integers(0, pb.n - 1), label="client")
    c = data.draw(st.floats(0.05, 20.0), label="c")
    scaled = list(clients)
    scaled[j] = LoRAFactors(clients[j].B * c, clients[j].A)
    a = _run(op, clients, pb.weights, rank=R, state=state)
    b = _run(op, scaled, pb.weights, rank=R, state=state)
    if a.basis is not None and b.basis is not None:
        Ua, Ub, ga, gb = f64(a.basis), f64(b.basis), 1.0, 1.0
    else:
        noise = _tol(pb, clients, scaled, _sensitivity(op, pb, clients, R, state)) * max(c, 1.0)
        Ua, ga = _col_space(f64(a.dense()), noise)
        Ub, gb = _col_space(f64(b.dense()), noise)
    _check(Ua.shape[1] == Ub.shape[1], f"column-space dimension {Ua.shape[1]} -> {Ub.shape[1]}")
    gap = min(ga, gb, _sensitivity(op, pb, clients, R, state))
    tol = subspace_tol(pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), kappa=pb.cond**2, gap=gap)
    dist = projector_distance(Ua, Ub)
    _check(dist <= tol * (2 * max(Ua.shape[1], 1)) ** 0.5, f"column space moved by {dist:.3e}")


def _certified(op: AggregationOperator, data: st.DataObject) -> None:
    pb = data.draw(_equal_rank_problems(op, weights="with_zeros"), label="problem")
    state = _state(op, pb, data)
    clients = _prepare(op, pb, state)
    R = _server_rank(pb, data)
    res = _run(op, clients, pb.weights, rank=R, state=state)
    _check(res.certificate is not None, "the result carries no certificate")
    assert res.certificate is not None
    W = sum(
        (float(pb.p[i]) * f64(c.delta()) for i, c in enumerate(clients)),
        start=torch.zeros(pb.d, pb.k, dtype=torch.float64),
    )
    den = float(W.norm())
    measured = float((f64(res.update.delta()) - W).norm()) / den if den > 0 else 0.0
    scale = pb.scale() / den if den > 0 else 1.0
    tol = certificate_tol(pb.dtype, n=n_dims(pb.d, pb.k, pb.ranks), scale=scale)
    got = res.certificate.relative_residual
    _check(abs(got - measured) <= tol, f"certificate {got:.3e} vs measured {measured:.3e}")


PROPERTIES: dict[Guarantee, Callable[[AggregationOperator, st.DataObject], None]] = {
    G.GAUGE_INVARIANT_GL: _gauge_property("invertible"),
    G.GAUGE_INVARIANT_O: _gauge_property("orthogonal"),
    G.GAUGE_INVARIANT_SO: _gauge_property("special_orthogonal"),
    G.COMMON_GAUGE_EQUIVARIANT: _common_gauge,
    G.EXACT_MEAN: _exact_mean,
    G.RANK_COMPATIBLE: _rank_compatible,
    G.PERMUTATION_INVARIANT: _permutation,
    G.SCALE_ROBUST_SUBSPACE: _scale_robust,
    G.CERTIFIED: _certified,
}


class ContractError(AssertionError):
    """An operator's declarations and behaviour disagree (names the operator and guarantee)."""


def check_guarantee(
    operator: AggregationOperator | str,
    guarantee: Guarantee,
    *,
    max_examples: int | None = None,
) -> bool:
    """Check one guarantee of one operator: declared and held (True), or undeclared and falsified.

    A declared guarantee is searched with shrinking and the example database; an undeclared
    one only until its first counterexample. ``max_examples`` defaults to the active
    hypothesis profile's budget (a third of it for a declared guarantee).

    Raises
    ------
    FalsifiedError
        If a declared guarantee fails (with the counterexample).
    ContractError
        If an undeclared guarantee could not be falsified (declare it, or the property is
        too weak to see the failure).
    """
    op = get_operator(operator) if isinstance(operator, str) else operator
    prop = PROPERTIES[guarantee]
    declared = guarantee in op.guarantees
    phases = (
        (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
        if declared
        else (Phase.explicit, Phase.generate)
    )
    budget = settings().max_examples if max_examples is None else max_examples
    examples = max(10, budget // 3) if declared else max(100, budget)

    # The problems are matrices built per draw: slow to generate by hypothesis's measure, and
    # a user's own profile must not turn that into a failure (nor impose a deadline).
    @settings(
        phases=phases,
        max_examples=examples,
        database=settings().database if declared else None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        prop(op, data)

    if declared:
        run()
        return True
    try:
        run()
    except FalsifiedError:
        return False
    raise ContractError(
        f"{op.name} does not declare {guarantee}, but no counterexample was found in "
        f"{examples} examples"
    )


def check_contract(
    operator: AggregationOperator | str, *, max_examples: int | None = None
) -> dict[Guarantee, bool]:
    """Run :func:`check_guarantee` for every guarantee; the map of declared-and-held flags.

    Raises
    ------
    FalsifiedError, ContractError
        At the first guarantee whose declaration and behaviour disagree.
    """
    return {g: check_guarantee(operator, g, max_examples=max_examples) for g in Guarantee}


__all__ = [
    "PROPERTIES",
    "ContractError",
    "FalsifiedError",
    "check_contract",
    "check_guarantee",
]
