"""The pre-registered rule that picks the default operator from a powered cell.

:data:`RULE` is the rule as study F fixed it before any run (docs/experiments.md, "The
default, by rule"); :data:`READING` is how this module reads the five points the text leaves
open: (1)-(3) written down on 2026-12-06 when the rule was first coded (two of the 20 seeds
were in), (4)-(5) on 2026-12-07, when a review of this code found the text silent on ties and
on a difference without spread (ten seeds were in); no comparison had been read as evidence
either time. docs/experiments.md and README quote both; a test checks that they do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .stats import Paired

#: The rule, word for word as pre-registered.
RULE = (
    "the best operator by the primary metric among those whose primary interval against "
    "FedIT lies above zero; if there is none, the operator with the smallest mean exact "
    "aggregation error at R = r among the four (a measured property that every run records), "
    "unless its primary interval lies below zero."
)

#: How the rule is read where its text is silent.
READING = (
    '(1) "At R = r" compares errors at equal rank, as the issue\'s example rule does '
    '("the smallest certified error at equal rank"): a run is at R = r when its server kept '
    "the clients' rank in every round of every seed, so `glora_auto_rank`, whose server keeps "
    "a larger rank, can be chosen only by the first branch. (2) When the smallest error's "
    "interval lies below zero, the next smallest at R = r is taken. (3) FedIT, the reference, "
    "has no interval of its own and is eligible in the second branch. (4) Ties go to the run "
    "listed first: FedIT, then the primary runs in the config's order (FlexLoRA, "
    "`glora_auto`, `glora_auto_rank`). (5) A difference that is the same at every seed has "
    "a zero-width interval, which lies above zero when that difference is positive and "
    "below zero when it is negative."
)


#: The default until the rule is applied: the package's default when study F was
#: pre-registered, kept until the powered cell is complete (docs/experiments.md).
UNTIL_APPLIED = "glora_auto"


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


__all__ = ["READING", "RULE", "UNTIL_APPLIED", "Candidate", "Verdict", "default_by_rule"]
