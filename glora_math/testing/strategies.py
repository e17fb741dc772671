"""Hypothesis strategies for federated LoRA problems.

Hypothesis draws small integers and floats (so failures shrink to small dimensions, few clients
and mild conditioning); tensors are then built from a drawn seed with a ``torch.Generator``
(hypothesis does not seed torch). Matrices are built as ``P diag(sigma) Q^T`` with a drawn,
shrinkable condition number, as in array-api-tests' ``hypothesis_helpers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import Tensor

from glora_math import (
    LoRAFactors,
    random_invertible,
    random_orthogonal,
    random_special_orthogonal,
)

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def conditioned_matrix(
    m: int, n: int, *, cond: float, scale: float, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """An m-by-n matrix of full rank min(m, n), 2-norm ``scale`` and condition number ``cond``."""
    p = min(m, n)
    P = random_orthogonal(m, generator=generator)[:, :p]
    Q = random_orthogonal(n, generator=generator)[:, :p]
    t = torch.linspace(0.0, 1.0, p, dtype=torch.float64)
    sigma = scale * torch.pow(torch.tensor(cond, dtype=torch.float64), -t)
    return ((P * sigma) @ Q.mT).to(dtype)


def conditioned_factors(
    d: int, k: int, r: int, *, cond: float, generator: torch.Generator, dtype: torch.dtype
) -> LoRAFactors:
    """Factors ``(B, A)`` of shapes (d, r), (r, k), each of norm 1 and condition ``cond``."""
    B = conditioned_matrix(d, r, cond=cond, scale=1.0, generator=generator, dtype=dtype)
    A = conditioned_matrix(r, k, cond=cond, scale=1.0, generator=generator, dtype=dtype)
    return LoRAFactors(B, A)


def gaussian_clients(
    n: int, d: int, r: int | Sequence[int], k: int, *, generator: torch.Generator
) -> list[LoRAFactors]:
    """N clients with i.i.d. standard Gaussian float64 factors, for fixed unit tests.

    ``r`` is every client's rank, or one rank per client (then ``len(r) == n``).
    """
    ranks = [r] * n if isinstance(r, int) else list(r)
    assert len(ranks) == n, f"{len(ranks)} ranks for {n} clients"
    return [
        LoRAFactors(
            torch.randn(d, ri, generator=generator, dtype=torch.float64),
            torch.randn(ri, k, generator=generator, dtype=torch.float64),
        )
        for ri in ranks
    ]


@dataclass(frozen=True)
class Problem:
    """A drawn federated problem: N clients' factors, their weights and how they were built."""

    factors: list[LoRAFactors]
    weights: Tensor | None
    d: int
    k: int
    cond: float
    seed: int
    dtype: torch.dtype
    zero_clients: tuple[int, ...] = field(default=())
    deficient_clients: tuple[int, ...] = field(default=())

    @property
    def n(self) -> int:
        """The number of clients."""
        return len(self.factors)

    @property
    def ranks(self) -> list[int]:
        """The clients' factor ranks."""
        return [f.rank for f in self.factors]

    @property
    def p(self) -> Tensor:
        """Normalised weights in float64."""
        if self.weights is None:
            return torch.full((self.n,), 1.0 / self.n, dtype=torch.float64)
        w = self.weights.to(torch.float64)
        return w / w.sum()

    def mean(self) -> Tensor:
        """Dense exact mean update in float64 (reference)."""
        return sum(
            (
                float(self.p[i]) * (f.B.to(torch.float64) @ f.A.to(torch.float64))
                for i, f in enumerate(self.factors)
            ),
            start=torch.zeros(self.d, self.k, dtype=torch.float64),
        )

    def scale(self) -> float:
        """``sum_i p_i ||B_i||_F ||A_i||_F``: the size the backward errors are relative to."""
        return sum(
            float(self.p[i]) * float(f.B.norm()) * float(f.A.norm())
            for i, f in enumerate(self.factors)
        )

    def union_dim(self) -> int:
        """Dimension of the sum of the client column spaces (dense reference rank)."""
        Bs = [
            f.B.to(torch.float64)
            for i, f in enumerate(self.factors)
            if float(self.p[i]) > 0 and i not in self.zero_clients
        ]
        if not Bs:
            return 0
        return int(torch.linalg.matrix_rank(torch.cat(Bs, dim=1)))


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    dtype: torch.dtype = torch.float64,
    min_clients: int = 1,
    max_clients: int = 5,
    max_rank: int = 4,
    max_cond: float = 100.0,
    equal_ranks: bool = False,
    weights: str = "random",
    zero_updates: bool = False,
    deficient: bool = False,
) -> Problem:
    """A federated problem with shrinkable dimensions, ranks, conditioning and weights.

    ``weights``: ``"equal"`` (None), ``"random"`` (positive) or ``"with_zeros"`` (some zero,
    at least one positive). ``zero_updates``: some clients have ``B = 0`` (LoRA's start).
    ``deficient``: some clients of rank r >= 2 have a non-zero B of rank r - 1.
    """
    d = draw(st.integers(min_value=3, max_value=24), label="d")
    k = draw(st.integers(min_value=2, max_value=20), label="k")
    n = draw(st.integers(min_value=min_clients, max_value=max_clients), label="N")
    top = max(1, min(max_rank, d, k))
    if equal_ranks:
        ranks = [draw(st.integers(1, top), label="r")] * n
    else:
        ranks = draw(st.lists(st.integers(1, top), min_size=n, max_size=n), label="ranks")
    cond = draw(st.floats(min_value=1.0, max_value=max_cond), label="cond")
    seed = draw(SEEDS, label="seed")
    g = torch.Generator().manual_seed(seed)
    zero: tuple[int, ...] = ()
    if zero_updates:
        zero = tuple(sorted(draw(st.sets(st.integers(0, n - 1), max_size=n), label="zero_clients")))
    low: set[int] = set()
    if deficient:
        low = draw(st.sets(st.integers(0, n - 1), max_size=n), label="deficient_clients")
    factors = []
    for i, r in enumerate(ranks):
        if i in low and r >= 2:
            B = conditioned_matrix(d, r - 1, cond=cond, scale=1.0, generator=g, dtype=torch.float64)
            X = conditioned_matrix(r - 1, r, cond=1.0, scale=1.0, generator=g, dtype=torch.float64)
            B = (B @ X).to(dtype)
        else:
            B = conditioned_matrix(d, r, cond=cond, scale=1.0, generator=g, dtype=dtype)
        A = conditioned_matrix(r, k, cond=cond, scale=1.0, generator=g, dtype=dtype)
        if i in zero:
            B = torch.zeros_like(B)
        factors.append(LoRAFactors(B, A))
    w: Tensor | None
    if weights == "equal":
        w = None
    elif weights == "random":
        vals = draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n), label="weights")
        w = torch.tensor(vals, dtype=torch.float64)
    elif weights == "with_zeros":
        vals = draw(
            st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=n, max_size=n).filter(
                lambda v: sum(v) > 0
            ),
            label="weights",
        )
        w = torch.tensor(vals, dtype=torch.float64)
    else:  # pragma: no cover - programming error in a test
        raise ValueError(weights)
    return Problem(factors, w, d, k, cond, seed, dtype, zero, tuple(sorted(low)))


@st.composite
def gauges_for(
    draw: st.DrawFn, ranks: list[int], *, kind: str = "invertible", max_cond: float = 100.0
) -> tuple[list[Tensor], float]:
    """One gauge per client (``kind``: invertible, orthogonal, special_orthogonal).

    Returns the gauges and the drawn condition number (1 for orthogonal gauges).
    """
    seed = draw(SEEDS, label="gauge_seed")
    g = torch.Generator().manual_seed(seed)
    if kind == "invertible":
        cond = draw(st.floats(1.0, max_cond), label="gauge_cond")
        return [random_invertible(r, cond=cond, generator=g) for r in ranks], cond
    if kind == "orthogonal":
        return [random_orthogonal(r, generator=g) for r in ranks], 1.0
    if kind == "special_orthogonal":
        return [random_special_orthogonal(r, generator=g) for r in ranks], 1.0
    raise ValueError(kind)  # pragma: no cover


@dataclass(frozen=True)
class GappedProblem:
    """Clients sharing a common R-dim subspace V, plus private, mutually orthogonal directions.

    Here K = V V^T + sum_i p_i E_i E_i^T, so the consensus eigengap at R is exactly
    ``1 - max_i p_i`` (the top eigenvalue 1 has multiplicity R, the rest are the p_i).
    """

    problem: Problem
    V: Tensor
    R: int
    gap: float


@st.composite
def gapped_problems(draw: st.DrawFn, *, dtype: torch.dtype = torch.float64) -> GappedProblem:
    """Problems with a drawn, exactly known consensus eigengap (down to 1e-6)."""
    n = draw(st.integers(2, 4), label="N")
    R = draw(st.integers(1, 3), label="R")
    extras = draw(st.lists(st.integers(1, 2), min_size=n, max_size=n), label="extras")
    d = R + sum(extras) + draw(st.integers(0, 4), label="spare")
    k = draw(st.integers(max(R + max(extras), 2), 16), label="k")
    gap = draw(st.floats(1e-6, 0.5), label="gap")
    cond = draw(st.floats(1.0, 10.0), label="cond")
    seed = draw(SEEDS, label="seed")
    g = torch.Generator().manual_seed(seed)
    basis = random_orthogonal(d, generator=g)
    V = basis[:, :R]
    # Weights: client 0 has p_0 = 1 - gap (the largest), the rest share gap.
    rest = torch.rand(n - 1, generator=g, dtype=torch.float64) + 0.5
    p = torch.cat([torch.tensor([1.0 - gap], dtype=torch.float64), gap * rest / rest.sum()])
    col = R
    factors = []
    for e in extras:
        E = basis[:, col : col + e]
        col += e
        r = R + e
        X = conditioned_matrix(r, r, cond=cond, scale=1.0, generator=g, dtype=torch.float64)
        B = torch.cat([V, E], dim=1) @ X
        A = conditioned_matrix(r, k, cond=cond, scale=1.0, generator=g, dtype=torch.float64)
        factors.append(LoRAFactors(B.to(dtype), A.to(dtype)))
    # p_0 = 1 - gap >= 1/2 >= every other weight, so max_i p_i = 1 - gap.
    pb = Problem(factors, p, d, k, cond**2, seed, dtype)
    return GappedProblem(pb, V, R, gap)


__all__ = [
    "SEEDS",
    "GappedProblem",
    "Problem",
    "conditioned_factors",
    "conditioned_matrix",
    "gapped_problems",
    "gauges_for",
    "gaussian_clients",
    "problems",
]
