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
# # 2. The consensus subspace
#
# After gauge fixing, client $i$ is $U_i C_i$ with orthonormal $U_i$; its projector
# $U_i U_i^\top$ does not depend on the gauge. GLoRA's server basis is the top-$R$ eigenspace
# of the weighted sum of projectors
#
# $$K = \sum_i p_i U_i U_i^\top, \qquad U_{\mathrm{ref}} = \mathrm{TopEig}_R(K).$$
#
# The eigenvalues of $K$ lie in $[0, 1]$: an eigenvalue near 1 is a direction every client
# uses, a small one a direction only a few use. The *eigengap* $\lambda_R - \lambda_{R+1}$
# decides how well $U_{\mathrm{ref}}$ is determined (Davis-Kahan). This notebook follows the
# spectrum, the gap and the principal angles as the clients grow apart, and compares GLoRA's
# server update with the best rank-$R$ approximation of the mean update (SPEC P8).

# %%
import math

import matplotlib.pyplot as plt
import torch

from glora_math import consensus_basis, gauge_fix, glora_aggregate
from glora_math.linalg import principal_angles
from glora_math.metrics import best_rank_approx, mean_update, relative_error, state_factors
from glora_math.synthetic import random_clients

torch.set_default_dtype(torch.float64)
N, d, k, r, R = 6, 60, 40, 4, 4


def clients_at(h: float):  # type: ignore[no-untyped-def]
    return random_clients(n_clients=N, d=d, k=k, rank=r, heterogeneity=h, seed=3)


# %% [markdown]
# ## The spectrum of K as heterogeneity grows
#
# `heterogeneity = 0`: every client lives in one shared $r$-dimensional subspace, so $K$ has
# $r$ eigenvalues equal to 1. At `heterogeneity = 1` the subspaces are independent and the
# spectrum flattens to about $1/N$.

# %%
levels = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
fig, ax = plt.subplots(figsize=(6, 3.5))
gaps, angles, p8 = [], [], []
for h in levels:
    cl = clients_at(h)
    fixed = [gauge_fix(c) for c in cl]
    basis = consensus_basis(fixed, rank=R)
    ax.plot(basis.eigvals[: 3 * r].numpy(), "o-", label=f"h = {h}")
    gaps.append(basis.gap)
    # Largest principal angle between each client's subspace and U_ref, averaged.
    angles.append(sum(float(principal_angles(f.U, basis.U).max()) for f in fixed) / len(fixed))
    state = glora_aggregate(cl, rank=R)
    best = best_rank_approx(mean_update(cl), R)
    p8.append((relative_error(state_factors(state), cl), relative_error(best, cl)))
ax.axvline(R - 0.5, color="gray", ls=":")
ax.set_xlabel("index j")
ax.set_ylabel(r"$\lambda_j(K)$")
ax.set_title("Spectrum of K (dotted: R)")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
a1.plot(levels, gaps, "o-")
a1.set_xlabel("heterogeneity")
a1.set_ylabel(r"eigengap $\lambda_R - \lambda_{R+1}$")
a2.plot(levels, [math.degrees(a) for a in angles], "o-")
a2.set_xlabel("heterogeneity")
a2.set_ylabel("mean largest angle to U_ref (deg)")
fig.tight_layout()

# %% [markdown]
# ## GLoRA against the best rank-R approximation (P8)
#
# GLoRA projects the mean update onto $U_{\mathrm{ref}}$, a subspace chosen from the clients'
# *column spaces* alone (not their magnitudes). The best rank-$R$ approximation of the mean
# (its truncated SVD, what FlexLoRA computes) is optimal in Frobenius norm, so GLoRA can
# only be as good or worse (P8), with equality when $\mathrm{span}(U_{\mathrm{ref}})$ contains
# the top-$R$ left singular space of the mean, e.g. when the clients share one subspace. Here
# the excess grows with heterogeneity.

# %%
glo = [a for a, _ in p8]
ey = [b for _, b in p8]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(levels, glo, "o-", label="GLoRA, rank R")
ax.plot(levels, ey, "s--", label="best rank R (truncated SVD of the mean)")
ax.set_xlabel("heterogeneity")
ax.set_ylabel("relative error vs the mean update")
ax.legend()
fig.tight_layout()
for h, (a, b) in zip(levels, p8, strict=True):
    print(f"h = {h:.1f}: GLoRA {a:.3e}, best rank-R {b:.3e}")

# %%
# Eckart-Young: nothing of rank R beats the truncated SVD; in a shared subspace both are exact.
from glora_math.tolerances import product_tol

tol = product_tol(torch.float64, n=d + k + N * r, scale=1.0)
assert all(a >= b - tol for a, b in p8)
assert p8[0][0] <= tol
