# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Rank-compatible readout
#
# GLoRA's server state is $(U_{\mathrm{ref}}, S)$ with $S \in \mathbb{R}^{R \times k}$; its
# update is $U_{\mathrm{ref}} S$. A client of rank $r \le R$ receives the best rank-$r$
# approximation of that update: with the small SVD $S = W \Sigma V^\top$,
#
# $$B^{(r)} = U_{\mathrm{ref}} W_{:r} \Sigma_{:r}^{1/2}, \qquad
#   A^{(r)} = \Sigma_{:r}^{1/2} V_{:r}^\top,$$
#
# (SPEC P4). Its error is exactly $\sqrt{\sum_{j > r} \sigma_j(S)^2}$ (Eckart-Young), the
# readouts are nested (rank $r$ is the first $r$ columns of rank $r + 1$), and rank $R$
# reproduces the state. Clients of different ranks are served from one state.

# %%
import itertools

import matplotlib.pyplot as plt
import torch

from glora_math import eckart_young_error, glora_aggregate, readout, readouts
from glora_math.metrics import fro_distance, state_factors
from glora_math.synthetic import random_clients
from glora_math.tolerances import product_tol

torch.set_default_dtype(torch.float64)
ranks = [2, 4, 4, 8, 8, 16]  # heterogeneous clients
clients = random_clients(n_clients=len(ranks), d=64, k=48, rank=ranks, heterogeneity=0.5, seed=5)
R = 16
state = glora_aggregate(clients, rank=R)
full = state_factors(state)
print("server rank:", state.rank, "client ranks:", ranks)

# %% [markdown]
# ## Error by rank: measured against Eckart-Young

# %%
rs = list(range(1, R + 1))
measured = [fro_distance(readout(state, r), full) for r in rs]
predicted = [eckart_young_error(state, r) for r in rs]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(rs, [max(m, 1e-17) for m in measured], "o", label="measured ||B A - U S||")
ax.semilogy(rs, [max(p, 1e-17) for p in predicted], "-", label=r"$\sqrt{\sum_{j>r}\sigma_j(S)^2}$")
ax.set_xlabel("readout rank r")
ax.set_ylabel("Frobenius error")
ax.legend()
fig.tight_layout()
scale = float(torch.linalg.svdvals(state.S).sum())
tol = product_tol(torch.float64, n=64 + 48 + R, scale=scale)
assert all(abs(m - p) <= tol for m, p in zip(measured, predicted, strict=True))
assert all(a >= b for a, b in itertools.pairwise(predicted))  # monotone in r
print("readout(R) reproduces the state:", measured[-1])

# %% [markdown]
# ## Nestedness
#
# With the balanced split, the rank-$r$ factors are the leading columns (rows) of the
# rank-$(r+1)$ factors.

# %%
r8, r16 = readout(state, 8), readout(state, 16)
print("||B(8) - B(16)[:, :8]|| =", float((r8.B - r16.B[:, :8]).norm()))
print("||A(8) - A(16)[:8]||    =", float((r8.A - r16.A[:8]).norm()))
assert float((r8.B - r16.B[:, :8]).norm()) <= tol

# %% [markdown]
# ## Heterogeneous clients from one state
#
# `readouts` does one small SVD of $S$ and serves every client its own rank.

# %%
per_client = readouts(state, ranks)
for r, f in zip(ranks, per_client, strict=True):
    print(
        f"rank {r:2d}: B {tuple(f.B.shape)}, A {tuple(f.A.shape)}, "
        f"error {fro_distance(f, full):.3e} (Eckart-Young {eckart_young_error(state, r):.3e})"
    )

# %% [markdown]
# Against the mean update $\bar W$ itself, compare at each client's rank: GLoRA's readout, the
# factors HetLoRA (arXiv 2401.06432) sends (zero-padded, truncated averages of the factors, in
# whatever gauge they happen to be), and the best rank-$r$ approximation of $\bar W$.

# %%
from glora_math.metrics import best_rank_approx, mean_update, relative_error
from glora_math.operators import get_operator

het = get_operator("hetlora")(clients, rank=R, client_ranks=ranks)
assert het.client_factors is not None
W_bar = mean_update(clients)
for r, g, h in zip(ranks, per_client, het.client_factors, strict=True):
    print(
        f"rank {r:2d}: GLoRA {relative_error(g, clients):.3f}, "
        f"HetLoRA {relative_error(h, clients):.3f}, "
        f"best rank-r {relative_error(best_rank_approx(W_bar, r), clients):.3f}"
    )
