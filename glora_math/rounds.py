"""One federated round over a whole adapter: every module, one operator, one call.

:func:`aggregate_modules` is the one home of a round. It takes a mapping of module name to the
clients' factors of that module and

- looks the operator up once (a name or an :class:`~glora_math.operators.AggregationOperator`),
- checks the options once (:class:`~glora_math.errors.OptionError`),
- normalises the weights once (float64), and validates each module's clients once at the
  boundary (:class:`~glora_math.validation.ValidatedClients`): nothing below re-checks them,
- groups same-shape modules (same client ranks) into one batched call for operators that
  declare a ``group_fn`` and keep no state, and runs every other operator module by module,
- owns the residual-warning policy: option ``max_residual`` > 0 emits one
  :class:`~glora_math.errors.ResidualWarning` per module whose certified relative residual
  exceeds it, naming the module,
- attaches the module's name to every error (``err.module``) and to every glora-math
  warning an operator raises (:attr:`GloraWarning.modules <glora_math.errors.GloraWarning>`:
  a batched call's stack positions become the names), pointing it at its own caller; other
  libraries' warnings pass through as they were raised,
- measures itself: :meth:`ModulesRound.errors` is each module's exact relative error against
  its clients' mean, for every operator (the certified operators' certificates are
  :meth:`ModulesRound.certificates`).

The peft path (:func:`glora_math.integration.peft.aggregate.aggregate_adapters`), the
federated server, the runner and the Flower strategy all aggregate through it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from glora_math.certificate import warn_residual
from glora_math.compare import module_errors
from glora_math.errors import EmptyClientsError, GloraError, GloraWarning, ShapeMismatchError
from glora_math.operators import AggregateResult, AggregationOperator, OperatorState, get_operator
from glora_math.types import LoRAFactors
from glora_math.validation import ValidatedClients, WeightsLike, normalize_weights, validated


@dataclass(frozen=True)
class ModulesRound:
    """One round's outcome over every module.

    Parameters
    ----------
    operator
        The operator that aggregated it.
    weights
        The clients' normalised weights, float64 ``(n,)`` (sum 1).
    results
        Per module: the operator's :class:`~glora_math.operators.AggregateResult`.
    client_modules
        Per client, the factors of every module it continues from; ``None`` for every client
        when the operator has clients re-initialise (FLoRA).
    states
        Per module, the operator state for the next round (``None`` for stateless operators).
    clients
        Per module, the clients' factors as validated (for measuring the round against them
        without checking them again).
    """

    operator: AggregationOperator
    weights: Tensor
    results: dict[str, AggregateResult]
    client_modules: list[dict[str, LoRAFactors] | None]
    states: dict[str, OperatorState | None]
    clients: dict[str, ValidatedClients]

    def certificates(self) -> dict[str, float]:
        """Per certified module, its exact relative residual against the module's mean."""
        return certificates(self.results)

    def errors(self) -> dict[str, float]:
        """Per module, the exact relative error of its update against the module's mean.

        Every operator, certified or not (:func:`~glora_math.compare.module_errors`). Where a
        module has an exact certificate it equals :meth:`certificates` up to rounding, except
        where a dense residual is folded (the ``_residual`` variants: the certificate is of the
        low-rank update, this error of the whole server update); an estimated certificate
        (``sketch_probes``) is an estimate of it.
        """
        return module_errors(self.results, self.clients, self.weights)

    def __repr__(self) -> str:
        certs = self.certificates()
        worst = f", worst certified residual {max(certs.values()):.3e}" if certs else ""
        return (
            f"ModulesRound(operator={self.operator.name!r}, modules={len(self.results)}, "
            f"clients={len(self.weights)}{worst})"
        )


def certificates(results: Mapping[str, AggregateResult]) -> dict[str, float]:
    """Per certified module of ``results``, its exact relative residual against its mean."""
    return {
        m: r.certificate.relative_residual for m, r in results.items() if r.certificate is not None
    }


def resolve_operator(operator: str | AggregationOperator) -> AggregationOperator:
    """The operator object for a name (looked up once), or the object itself."""
    if isinstance(operator, AggregationOperator):
        return operator
    return get_operator(operator)


def aggregate_modules(
    modules: Mapping[str, Sequence[LoRAFactors]],
    weights: WeightsLike = None,
    *,
    operator: str | AggregationOperator,
    rank: int,
    client_ranks: Sequence[Mapping[str, int]] | None = None,
    states: Mapping[str, OperatorState | None] | None = None,
    options: Mapping[str, float] | None = None,
    _stacklevel: int = 2,
) -> ModulesRound:
    """Aggregate every module of one round with one operator.

    Parameters
    ----------
    modules
        Module name -> the clients' factors of that module (scale folded in), the clients in
        the same order for every module; ``d`` and ``k`` may differ between modules, and
        client ranks between clients.
    weights
        Client weights (e.g. sample counts); ``None`` for equal. Normalised once.
    operator
        A registered name (:func:`~glora_math.operators.list_operators`) or an operator.
    rank
        Server rank R.
    client_ranks
        Per client, the rank of each module it receives (default: its own ranks).
    states
        Per module, the previous round's state (stateful operators).
    options
        Operator options; ``max_residual`` > 0 turns on the per-module residual warning.
    _stacklevel
        Where the warnings point, counted as :func:`warnings.warn` counts from the caller of
        this function (2); wrappers add their own frames.

    Raises
    ------
    GloraError
        A subclass, naming the module (``err.module``) and the client where one is at fault;
        :class:`~glora_math.errors.OptionError` for an option the operator does not take.
    """
    op = resolve_operator(operator)
    opts = op.check_options(options)
    limit = float(opts.get("max_residual", 0.0))
    # The residual warning is raised here, per module by name, not by the operator.
    per_call = {k: v for k, v in opts.items() if k != "max_residual"}
    names = list(modules)
    if not names:
        raise EmptyClientsError("no modules to aggregate")
    n = len(modules[names[0]])
    checked: dict[str, ValidatedClients] = {}
    for name in names:
        try:
            if len(modules[name]) != n:
                raise ShapeMismatchError(
                    f"{len(modules[name])} clients, module {names[0]!r} has {n}"
                )
            checked[name] = validated(modules[name])
        except GloraError as err:
            raise err.with_context(module=name) from None
    p = normalize_weights(weights, n, dtype=torch.float64, device=torch.device("cpu"))
    want = [
        {m: (client_ranks[i][m] if client_ranks else checked[m][i].rank) for m in names}
        for i in range(n)
    ]
    results: dict[str, AggregateResult] = {}
    if op.group_fn is not None and not op.stateful:
        for group in _groups(checked, want):
            fs = [checked[m] for m in group]
            ranks = [want[i][group[0]] for i in range(n)]
            try:
                out = _naming_warnings(
                    group,
                    lambda fs=fs, ranks=ranks: op.aggregate_group(  # type: ignore[misc]
                        fs, p, rank=rank, client_ranks=ranks, options=per_call
                    ),
                    stacklevel=_stacklevel + 1,
                )
            except GloraError as err:
                where = group[0] if len(group) == 1 else f"{group[0]} (+{len(group) - 1})"
                raise err.with_context(module=where) from None
            results.update(zip(group, out, strict=True))
    else:
        for name in names:
            try:
                results[name] = _naming_warnings(
                    [name],
                    lambda name=name: op(  # type: ignore[misc]
                        checked[name],
                        p,
                        rank=rank,
                        client_ranks=[w[name] for w in want],
                        state=(states or {}).get(name),
                        options=per_call,
                    ),
                    stacklevel=_stacklevel + 1,
                )
            except GloraError as err:
                raise err.with_context(module=name) from None
    for name in names:  # in module order
        res = results[name]
        if res.certificate is not None:
            warn_residual(
                res.certificate.relative_residual,
                limit,
                "",
                stacklevel=_stacklevel,
                modules=[name],
            )
    reinit = any(r.client_factors is None for r in results.values())
    per_client: list[dict[str, LoRAFactors] | None] = [
        None if reinit else {m: (results[m].client_factors or [])[i] for m in names}
        for i in range(n)
    ]
    return ModulesRound(
        operator=op,
        weights=p,
        results={m: results[m] for m in names},
        client_modules=per_client,
        states={m: results[m].state for m in names},
        clients=checked,
    )


_T = TypeVar("_T")


def _naming_warnings(names: Sequence[str], call: Callable[[], _T], *, stacklevel: int) -> _T:
    """``call()``; its warnings (also when it raises) re-emitted at ``stacklevel``, counted here.

    A :class:`~glora_math.errors.GloraWarning` comes out naming its modules (``names[j]`` for
    stack position ``j``; all of ``names`` when it names none), through the caller's filters
    at the caller's line. Any other warning went through the filters where it was raised
    (a ``module=`` filter matches there) and is shown as it would have been.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GloraWarning)
            return call()
    finally:
        for w in caught:
            if isinstance(w.message, GloraWarning):
                warnings.warn(w.message.named(names), stacklevel=stacklevel)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _groups(
    checked: Mapping[str, ValidatedClients], want: Sequence[Mapping[str, int]]
) -> list[list[str]]:
    """Modules that can share one batched call: same (d, k), dtype, device and client ranks."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, fs in checked.items():
        key = (
            fs.info.d,
            fs.info.k,
            fs.info.dtype,
            fs.info.device,
            tuple(f.rank for f in fs),
            tuple(w[name] for w in want),
        )
        groups.setdefault(key, []).append(name)
    return list(groups.values())


__all__ = ["ModulesRound", "aggregate_modules", "certificates", "resolve_operator"]
