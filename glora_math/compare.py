"""Compare registered operators on the same client factors (``glora compare``).

For each operator: relative error of the server update to the exact mean update, gauge
sensitivity (largest relative change of the server update over random per-client GL(r) and
O(r) gauges), communication per client and wall time (median of repeats, this machine).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from glora_math.certificate import measured_certificate
from glora_math.errors import GloraError, GloraWarning, OptionError, ProtocolError
from glora_math.gauge import apply_gauge, random_invertible, random_orthogonal
from glora_math.metrics import fro_distance, fro_norm, mean_update
from glora_math.operators import (
    AggregateResult,
    AggregationOperator,
    OperatorState,
    get_operator,
    list_operators,
)
from glora_math.scaling import ldexp_or_inf, shift
from glora_math.types import LoRAFactors
from glora_math.validation import WeightsLike, normalize_weights


def update_distance(a: AggregateResult, b: AggregateResult) -> float:
    """``||server update a - server update b||_F``; low-rank unless a dense residual is present."""
    if a.residual is None and b.residual is None:
        return fro_distance(a.update, b.update)
    return float(torch.linalg.matrix_norm(a.dense().double() - b.dense().double()))


def _error_norms(
    result: AggregateResult, factors: Sequence[LoRAFactors], weights: WeightsLike
) -> tuple[float, float]:
    """``(||server update - W_bar||_F / ||W_bar||_F, ||W_bar||_F)`` in float64.

    From one mean update, with the factors in float64 (float32 products underflow below
    about 1e-23 per entry; float64 factors, as the runner's, are used as they are); d-by-k
    only for dense-residual methods. Clients whose float64 entries lie outside float64's
    comfortable band (where squares under- or overflow) are measured at unit scale by
    :func:`~glora_math.certificate.measured_certificate` instead (its mean norm is 0 or
    inf where float64 cannot hold it; the relative error stays right).
    """
    fs = [LoRAFactors(f.B.double(), f.A.double()) for f in factors]
    if result.residual is None and shift(fs, torch.float64) != (0, 0):
        p = normalize_weights(weights, len(fs), dtype=torch.float64, device=fs[0].B.device)
        mine = LoRAFactors(result.update.B.double(), result.update.A.double())
        cert = measured_certificate(fs, p, mine)
        return cert.relative_residual, cert.mean_norm
    mean = mean_update(fs, weights)
    den = fro_norm(mean)
    if result.residual is None:
        num = fro_distance(LoRAFactors(result.update.B.double(), result.update.A.double()), mean)
    else:
        num = float(torch.linalg.matrix_norm(result.dense().double() - (mean.B @ mean.A).double()))
    return _ratio(num, den), den


def _ratio(num: float, den: float) -> float:
    """``num / den``: 0 when both are zero, inf when only ``den`` is."""
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def server_error(
    result: AggregateResult, factors: Sequence[LoRAFactors], weights: WeightsLike = None
) -> float:
    """``||server update - W_bar||_F / ||W_bar||_F``, in float64 (:func:`_error_norms`)."""
    return _error_norms(result, factors, weights)[0]


def module_errors(
    results: Mapping[str, AggregateResult],
    factors: Mapping[str, Sequence[LoRAFactors]],
    weights: WeightsLike | Mapping[str, WeightsLike] = None,
) -> dict[str, float]:
    """Per module, the exact relative error of its server update against its clients' mean.

    :func:`server_error` of every module, whatever the operator: from factors, certified or
    not, so an operator without a certificate (FedIT, HetLoRA) reports its error too.
    ``weights`` are the clients' weights, or per module the weights of the clients in
    ``factors[name]`` (a round over clients holding different modules).
    """
    if isinstance(weights, Mapping):
        per = {name: weights[name] for name in results}
    else:
        per = dict.fromkeys(results, weights)
    return {name: server_error(res, factors[name], per[name]) for name, res in results.items()}


@dataclass(frozen=True)
class RoundError:
    """The error of a whole round (all modules) against the exact mean updates.

    ``relative`` is ``sqrt(sum_m ||update_m - W_bar_m||^2 / sum_m ||W_bar_m||^2)`` (the
    server update includes dense residuals); ``worst_module`` the largest per-module relative
    error; ``certified`` the same aggregate from the operators' certificates, or ``None`` when
    a module has none.
    """

    relative: float
    worst_module: float
    certified: float | None


def round_error(
    results: Mapping[str, AggregateResult],
    factors: Mapping[str, Sequence[LoRAFactors]],
    weights: WeightsLike = None,
) -> RoundError:
    """:class:`RoundError` of per-module results against their clients' factors.

    Computed from factors: no d-by-k matrix except for operators with a dense residual.
    """
    measured = {name: _error_norms(res, factors[name], weights) for name, res in results.items()}
    # Sums of squares at the scale of the largest mean norm, a power of 2: the same bits as
    # unscaled wherever those neither overflow nor underflow, and no OverflowError where
    # they would.
    top = max((m for _, m in measured.values() if math.isfinite(m)), default=0.0)
    k = math.frexp(top)[1]
    num = den = cnum = 0.0
    worst = 0.0
    certified = True
    for name, res in results.items():
        e, mean_norm = measured[name]
        worst = max(worst, e)
        if mean_norm > 0:
            num += (e * ldexp_or_inf(mean_norm, -k)) ** 2
            den += ldexp_or_inf(mean_norm, -k) ** 2
        if res.certificate is None:
            certified = False
        else:
            cnum += ldexp_or_inf(res.certificate.residual, -k) ** 2
    rel = math.sqrt(num / den) if den else 0.0
    cert = (math.sqrt(cnum / den) if den else 0.0) if certified and results else None
    return RoundError(rel, worst, cert)


def warm_state(op: AggregationOperator, factors: Sequence[LoRAFactors]) -> OperatorState | None:
    """A warm state for operators that declare one.

    The reference is FedIT of these clients, at round 2 (a round after the first).
    """
    if op.warm_state is None:
        return None
    return op.warm_state(get_operator("fedit")(factors).update, 2)


def gauge_sensitivity(
    op: AggregationOperator,
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    rank: int | None = None,
    kind: str = "invertible",
    cond: float = 10.0,
    trials: int = 3,
    seed: int = 0,
    state: OperatorState | None = None,
) -> float:
    """Largest ``||update(gauged) - update|| / ||W_bar||`` over random per-client gauges.

    ``kind``: ``"invertible"`` (GL(r), condition number ``cond``) or ``"orthogonal"``.
    """
    gen = torch.Generator().manual_seed(seed)
    base = op(factors, weights, rank=rank, state=state)
    den = fro_norm(mean_update(factors, weights)) or 1.0
    worst = 0.0
    for _ in range(trials):
        gauged = []
        for f in factors:
            if kind == "invertible":
                G = random_invertible(f.rank, cond=cond, generator=gen, dtype=torch.float64)
            elif kind == "orthogonal":
                G = random_orthogonal(f.rank, generator=gen, dtype=torch.float64)
            else:
                raise OptionError(f"unknown gauge kind {kind!r}")
            gauged.append(apply_gauge(f, G))
        moved = op(gauged, weights, rank=rank, state=state)
        worst = max(worst, update_distance(base, moved) / den)
    return worst


@dataclass(frozen=True)
class CompareRow:
    """One operator's line in the comparison table."""

    name: str
    paper: str
    error: float | None
    sensitivity_gl: float | None
    sensitivity_o: float | None
    up: int
    down: int
    time_ms: float | None
    note: str = ""


def _sensitivity_or_none(op: AggregationOperator, *args: Any, **kwargs: Any) -> float | None:
    """:func:`gauge_sensitivity`, or None where per-client gauges break the protocol.

    Per-client gauges change a factor every client must share (FFA-LoRA, RoLoRA).
    """
    try:
        return gauge_sensitivity(op, *args, **kwargs)
    except ProtocolError:
        return None


def compare_operators(
    factors: Sequence[LoRAFactors],
    weights: WeightsLike = None,
    *,
    rank: int,
    names: Sequence[str] | None = None,
    trials: int = 3,
    cond: float = 10.0,
    repeats: int = 3,
    seed: int = 0,
) -> list[CompareRow]:
    """Run every (or each named) operator on the same clients and measure it."""
    d, k = factors[0].shape
    r = max(f.rank for f in factors)
    rows = []
    for name in names or list_operators():
        op = get_operator(name)
        comm = op.communication(d, k, r, rank, len(factors))
        try:
            state = warm_state(op, factors)
            clients = op.protocol(factors, 1 if state is None else state.round_index)
        except GloraError as err_:
            why = f"refused ({type(err_).__name__}): {err_}"
            rows.append(CompareRow(name, op.paper, None, None, None, comm.up, comm.down, None, why))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GloraWarning)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    result = op(clients, weights, rank=rank, state=state)
                    times.append((time.perf_counter() - t0) * 1e3)
                err = server_error(result, clients, weights)
                sens = {
                    kind: _sensitivity_or_none(
                        op,
                        clients,
                        weights,
                        rank=rank,
                        kind=kind,
                        cond=cond,
                        trials=trials,
                        seed=seed,
                        state=state,
                    )
                    for kind in ("invertible", "orthogonal")
                }
        except GloraError as err_:
            why = f"refused ({type(err_).__name__}): {err_}"
            rows.append(CompareRow(name, op.paper, None, None, None, comm.up, comm.down, None, why))
            continue
        note = "reconstruction" if op.reconstruction else ""
        rows.append(
            CompareRow(
                name,
                op.paper,
                err,
                sens["invertible"],
                sens["orthogonal"],
                comm.up,
                comm.down,
                statistics.median(times),
                note,
            )
        )
    return rows


__all__ = [
    "CompareRow",
    "compare_operators",
    "gauge_sensitivity",
    "module_errors",
    "server_error",
    "update_distance",
    "warm_state",
]
