"""Differential test: the float64 torch core against the 50-digit mpmath reference.

``proofs/highprec.py`` implements GLoRA (both sides) and the certificate independently, in
mpmath with dense d-by-d consensus matrices. On random problems the torch operator's update
and certificate must agree with it within the float64 tolerances of
:mod:`glora_math.tolerances` (the reference's own error, ~1e-50, is negligible).
"""

from __future__ import annotations

import mpmath as mp
import torch
from glora_math.proofs import highprec as hp
from hypothesis import given, settings
from hypothesis import strategies as st

from glora_math import glora_aggregate

from .helpers import cond, f64, n_dims, state_tol, unique_or_reject
from .strategies import Problem, problems


def _mp(x: torch.Tensor) -> mp.matrix:
    rows = f64(x).tolist()
    return mp.matrix([[mp.mpf(v) for v in row] for row in rows])


def _torch(X: mp.matrix) -> torch.Tensor:
    rows = [[float(X[i, j]) for j in range(X.cols)] for i in range(X.rows)]
    return torch.tensor(rows, dtype=torch.float64)


def _reference(pb: Problem, R: int, side: str) -> tuple[torch.Tensor, float]:
    """The reference update (dense, float64) and relative residual, at 50 digits."""
    with mp.workdps(50):
        Bs = [_mp(f.B) for f in pb.factors]
        As = [_mp(f.A) for f in pb.factors]
        p = [mp.mpf(float(x)) for x in pb.p]
        if side == "left":
            U, S, _ = hp.glora(Bs, As, p, R)
            update = U * S
        else:
            V, S, _ = hp.glora_right(Bs, As, p, R)
            update = S * V.T
        W = mp.zeros(pb.d, pb.k)
        for pi, B, A in zip(p, Bs, As, strict=True):
            W += pi * (B * A)
        _, direct = hp.certificate(W, update, S)
        return _torch(update), float(mp.sqrt(direct))


@settings(max_examples=25, deadline=None)
@given(problems(max_clients=3, max_rank=3), st.sampled_from(["left", "right"]), st.data())
def test_core_matches_the_50_digit_reference(pb, side, data) -> None:  # type: ignore[no-untyped-def]
    # The reference's QR gauge fixing needs full column rank of B_i (left) or A_i^T (right).
    fs = [f.B if side == "left" else f.A.mT for f in pb.factors]
    for x in fs:
        if int(torch.linalg.matrix_rank(f64(x))) < int(x.shape[1]):
            return
    union = int(torch.linalg.matrix_rank(torch.cat([f64(x) for x in fs], dim=1)))
    R = data.draw(st.integers(1, union), label="R")
    state = unique_or_reject(lambda: glora_aggregate(pb.factors, pb.weights, rank=R, side=side))
    ref, rho = _reference(pb, R, side)
    kappa = max(cond(x) for x in fs)
    tol = state_tol(
        pb.dtype, d=pb.d, k=pb.k, ranks=pb.ranks, kappa=kappa, gap=state.gap, scale=pb.scale()
    )
    assert float((f64(state.delta()) - ref).norm()) <= tol
    W = float(pb.mean().norm())
    assert abs(state.relative_residual - rho) <= tol / W + 10 * n_dims(
        pb.d, pb.k, pb.ranks
    ) * float(torch.finfo(torch.float64).eps)
