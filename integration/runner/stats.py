"""Paired comparisons of runs that share a seed: differences, t-intervals, wins and losses.

Two operators run with the same seed share the data split, the initial adapter, the batches
and (in round 1) the very uploads, so the difference of their metrics seed by seed removes
everything the seed decides. :func:`paired` summarises those differences: their mean, a
Student-t confidence interval for the mean difference, and how many seeds each side won.
Student's t quantile is computed from the regularised incomplete beta function (mpmath, which
torch already depends on), so no statistics package is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import mpmath  # type: ignore[import-untyped]


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function with ``df`` degrees of freedom at ``t``."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    x = df / (df + t * t)
    tail = 0.5 * float(mpmath.betainc(df / 2.0, 0.5, 0, x, regularized=True))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_cdf)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """Summary of per-seed differences ``x_s - ref_s`` (positive: x is higher).

    ``won`` / ``lost``: the seeds where x is better / worse (see :func:`paired`).
    """

    n: int
    mean: float
    low: float
    high: float
    won: int
    lost: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies on one side of zero (a difference is claimed)."""
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.4f} (1 seed)"
        mark = " *" if self.excludes_zero else ""
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] {self.won}/{self.lost}{mark}"


def paired(
    x: Sequence[float],
    ref: Sequence[float],
    *,
    level: float = 0.95,
    higher_is_better: bool = True,
) -> Paired:
    """Mean of ``x - ref`` over paired seeds with its two-sided ``level`` t-interval.

    ``won`` / ``lost`` count the seeds where ``x`` is better / worse than ``ref``: above /
    below it, or below / above it where ``higher_is_better`` is false (a loss). Ties count in
    neither. The mean and interval are of ``x - ref`` either way. With one seed the interval
    is infinite.

    Raises
    ------
    ValueError
        If the sequences differ in length, are empty, hold a value that is not finite, or
        ``level`` is not in (0, 1).
    """
    if len(x) != len(ref) or not x:
        raise ValueError(f"paired samples need equal, non-zero lengths, got {len(x)}, {len(ref)}")
    bad = [j for j, (a, b) in enumerate(zip(x, ref, strict=True))
           if not (math.isfinite(a) and math.isfinite(b))]  # fmt: skip
    if bad:
        raise ValueError(f"paired samples must be finite; pair {bad[0]} is ({x[bad[0]]}, "
                         f"{ref[bad[0]]})")  # fmt: skip
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diffs = [a - b for a, b in zip(x, ref, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    won = sum(d > 0 if higher_is_better else d < 0 for d in diffs)
    lost = sum(d < 0 if higher_is_better else d > 0 for d in diffs)
    if n < 2:
        return Paired(n, mean, -math.inf, math.inf, won, lost, level)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half, won, lost, level)


def auc(values: Sequence[float]) -> float:
    """The normalised area under a per-round curve: the mean over rounds.

    Trapezoids would weight the first and the last round half as much as the others.
    """
    if not values:
        raise ValueError("no rounds")
    return statistics.fmean(values)


__all__ = ["Paired", "auc", "paired", "t_cdf", "t_quantile"]
