"""Rank-compatible readout of LoRA factors from a GLoRA server state (SPEC, step 4).

``S = U~ diag(s) V~^T``; the rank-r readout is ``B = U_ref U~_r s_r^a``, ``A = s_r^(1-a) V~_r^T``
with ``a = 1/2`` (balanced), 1 (left) or 0 (right). Its product is a best rank-r approximation
of ``U_ref S`` (Eckart-Young, P4); readouts are nested in r. Cost O(R^2 k + d R r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from glora_math.errors import NonFiniteError, OptionError, RankError
from glora_math.linalg import sign_fixed_svd
from glora_math.scaling import ldexp_or_inf, times_pow2
from glora_math.types import LoRAFactors, ServerState, Split
from glora_math.validation import all_finite, validate_rank


def _check_readout_rank(state: ServerState, rank: int) -> int:
    r = validate_rank(rank)
    if r > state.requested_rank:
        raise RankError(f"readout rank {r} exceeds the server rank R={state.requested_rank}")
    return r


def _readout_from_svd(
    state: ServerState, svd: tuple[Tensor, Tensor, Tensor], r: int, split: Split
) -> LoRAFactors:
    Us, s, Vh = svd
    if split not in ("balanced", "left", "right"):
        raise OptionError(f"unknown split {split!r}; expected 'balanced', 'left' or 'right'")
    if state.side == "right":  # the transposed problem's B is the update's A
        swap: dict[Split, Split] = {"balanced": "balanced", "left": "right", "right": "left"}
        split = swap[split]
    rr = min(r, int(s.shape[-1]))
    B = state.U @ Us[..., :rr]
    A = Vh[..., :rr, :]
    sr = s[..., :rr]
    if split == "balanced":
        root = sr.sqrt()
        B, A = B * root.unsqueeze(-2), A * root.unsqueeze(-1)
    elif split == "left":
        B = B * sr.unsqueeze(-2)
    else:
        A = A * sr.unsqueeze(-1)
    if rr < r:
        # The state has rank rr < r: its best rank-r approximation is itself. Pad with zero
        # columns/rows so that the client still gets rank-r factors.
        B = torch.cat([B, B.new_zeros((*B.shape[:-1], r - rr))], dim=-1)
        A = torch.cat([A, A.new_zeros((*A.shape[:-2], r - rr, A.shape[-1]))], dim=-2)
    if state.side == "right":  # a readout of the transpose problem, transposed back
        B, A = A.mT.contiguous(), B.mT.contiguous()
    out = LoRAFactors(B.to(state.dtype), A.to(state.dtype))
    if not (all_finite(out.B) and all_finite(out.A)):
        raise NonFiniteError(
            f"the rank-{r} readout overflows {state.dtype} (largest singular value of the "
            f"update {float(s.max()) if s.numel() else 0.0:.2e}); rescale the clients' factors "
            "or aggregate in a wider dtype"
        )
    return out


def readout(state: ServerState, rank: int, split: Split = "balanced") -> LoRAFactors:
    """Rank-``rank`` LoRA factors whose product best approximates the server update.

    Parameters
    ----------
    state
        A :class:`ServerState` from :func:`glora_math.glora_aggregate`.
    rank
        Readout rank r, ``1 <= r <= state.requested_rank``. If r exceeds the effective rank of
        the state, the factors are zero-padded to rank r (the product is then exact).
    split
        How the singular values are shared: ``"balanced"`` (``sqrt(s)`` each side), ``"left"``
        (all in B) or ``"right"`` (all in A).

    Returns
    -------
    LoRAFactors
        B ``(d, r)``, A ``(r, k)`` in the clients' dtype, with
        ``||B A - U_ref S||_F^2 = sum_{j > r} s_j(S)^2``; for a state of stacked modules, the
        stacked readouts ``(L, d, r)`` and ``(L, r, k)`` (one batched SVD).

    Raises
    ------
    RankError
        If ``rank`` is not a positive int or exceeds the server rank.
    """
    r = _check_readout_rank(state, rank)
    return _readout_from_svd(state, sign_fixed_svd(state.S), r, split)


def readouts(
    state: ServerState, ranks: Sequence[int], split: Split = "balanced"
) -> list[LoRAFactors]:
    """Readouts at several ranks (e.g. one per heterogeneous client) from one small SVD."""
    rs = [_check_readout_rank(state, r) for r in ranks]
    svd = sign_fixed_svd(state.S)
    return [_readout_from_svd(state, svd, r, split) for r in rs]


def eckart_young_error(state: ServerState, rank: int) -> float:
    """``sqrt(sum_{j > r} s_j(S)^2)``: the Frobenius error of the best rank-r readout.

    For stacked modules: the error of the stacked readouts (all modules together).
    """
    r = _check_readout_rank(state, rank)
    # At unit scale (a power of 2, exact): subnormal coordinates keep their digits through
    # the SVD, and the squares of the tail neither under- nor overflow.
    top = float(state.S.abs().max()) if state.S.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return top
    e = math.frexp(top)[1]
    tail = torch.linalg.svdvals(times_pow2(state.S, -e))[..., r:].to(torch.float64)
    return ldexp_or_inf(float(torch.linalg.vector_norm(tail)), e)


__all__ = ["eckart_young_error", "readout", "readouts"]
