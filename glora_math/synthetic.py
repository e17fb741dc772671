"""Seeded synthetic client updates for demos, comparisons and notebooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glora_math.errors import OptionError, RankError
from glora_math.linalg import sign_fixed_qr
from glora_math.types import LoRAFactors
from glora_math.validation import validate_rank


def random_clients(
    *,
    n_clients: int,
    d: int,
    k: int,
    rank: int | Sequence[int],
    shared_dim: int | None = None,
    heterogeneity: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> list[LoRAFactors]:
    """N random client updates whose column spaces share a common subspace.

    ``B_i = (1 - h) U_shared X_i + h G_i`` with ``U_shared`` an orthonormal ``(d, shared_dim)``
    basis common to all clients, ``X_i`` and ``G_i`` Gaussian (``G_i`` scaled by ``1/sqrt(d)``)
    and ``h = heterogeneity`` in [0, 1]; ``A_i`` Gaussian scaled by ``1/sqrt(k)``. ``h = 0``
    gives clients inside one shared subspace, ``h = 1`` independent random subspaces.
    """
    n = validate_rank(n_clients, name="n_clients")
    ranks = [rank] * n if isinstance(rank, int) else list(rank)
    if len(ranks) != n:
        raise RankError(f"got {len(ranks)} ranks for {n} clients")
    ranks = [validate_rank(r) for r in ranks]
    if not 0.0 <= heterogeneity <= 1.0:
        raise OptionError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    g = torch.Generator().manual_seed(seed)
    sd = validate_rank(shared_dim if shared_dim is not None else max(ranks), name="shared_dim")
    shared, _ = sign_fixed_qr(torch.randn(d, min(sd, d), generator=g, dtype=torch.float64))
    out = []
    for r in ranks:
        X = torch.randn(shared.shape[1], r, generator=g, dtype=torch.float64)
        G = torch.randn(d, r, generator=g, dtype=torch.float64) / d**0.5
        B = (1.0 - heterogeneity) * (shared @ X) / shared.shape[1] ** 0.5 + heterogeneity * G
        A = torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5
        out.append(LoRAFactors(B.to(dtype=dtype, device=device), A.to(dtype=dtype, device=device)))
    return out


def shared_init_clients(
    *,
    n_clients: int,
    d: int,
    k: int,
    rank: int,
    drift: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[LoRAFactors]:
    """Clients after local steps from one broadcast adapter (the shared-init regime).

    Every federated LoRA round starts all clients from the same factors; during local steps A
    barely moves while each client's B grows in its own directions (issue 16's reproducer):
    ``A_i = A_0 + drift * noise`` and ``B_i = 0.01 * randn(d, r)`` independent, A_0 Gaussian.
    """
    n = validate_rank(n_clients, name="n_clients")
    r = validate_rank(rank)
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(r, k, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        B = 0.01 * torch.randn(d, r, generator=g, dtype=torch.float64)
        A = A0 + drift * torch.randn(r, k, generator=g, dtype=torch.float64)
        out.append(LoRAFactors(B.to(dtype), A.to(dtype)))
    return out


__all__ = ["random_clients", "shared_init_clients"]
