"""The pre-registered rule that picks the default operator from a powered cell.

Study F (docs/experiments.md) fixed it before any run: the default is the best operator by the
primary metric among those whose primary interval against the reference lies above zero; if
there is none, the operator with the smallest mean exact aggregation error at R = r (server
rank equal to the clients' rank in every round) among the compared ones, unless its primary
interval lies below zero (then the next smallest). The reference (FedIT) has no interval of
its own and is always eligible in the second branch. The rule is applied only to a complete
cell: every compared run at every seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .stats import Paired


@dataclass(frozen=True)
class Candidate:
    """One compared run as the rule sees it."""

    run: str
    #: the primary comparison against the reference (None for the reference itself)
    primary: Paired | None
    #: the mean over seeds of the run's mean exact aggregation error per round
    error: float
    #: whether the server kept the clients' rank (R = r) in every round of every seed
    at_client_rank: bool


@dataclass(frozen=True)
class Verdict:
    """The rule's outcome: the chosen run and the branch that chose it."""

    run: str
    why: str


def default_by_rule(candidates: Sequence[Candidate]) -> Verdict:
    """Apply the rule (module docstring) to the compared runs of a complete cell.

    Raises
    ------
    ValueError
        If no candidate is eligible in either branch (no run at R = r whose interval does not
        lie below zero), or the candidates are empty.
    """
    if not candidates:
        raise ValueError("the rule needs the compared runs, got none")
    above = [c for c in candidates if c.primary is not None and c.primary.low > 0.0]
    if above:
        best = max(above, key=lambda c: c.primary.mean if c.primary is not None else 0.0)
        return Verdict(best.run, "its primary interval lies above zero, the best such by the "
                       "primary metric")  # fmt: skip
    at_rank = sorted((c for c in candidates if c.at_client_rank), key=lambda c: c.error)
    for c in at_rank:
        if c.primary is not None and c.primary.high < 0.0:
            continue
        return Verdict(c.run, "no primary interval lies above zero; the smallest mean exact "
                       "aggregation error at R = r among runs whose interval does not lie "
                       "below zero")  # fmt: skip
    raise ValueError("no run at R = r is eligible: every one's primary interval lies below zero")


__all__ = ["Candidate", "Verdict", "default_by_rule"]
