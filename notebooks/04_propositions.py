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
# # 4. The propositions, proved and checked interactively
#
# Every proposition of the SPEC is verified three ways (`glora verify` runs all of them):
#
# 1. a **sympy proof**: with matrix symbols and stated assumptions where the identity holds in
#    general dimensions, or exactly on rational matrices where it needs a decomposition;
# 2. a **50-digit mpmath check** of an independent high-precision GLoRA, whose residual must sit
#    near $10^{-50}$: float64 noise cannot hide a real error there;
# 3. **hypothesis property tests** on the torch operators, with tolerances from one module.
#
# This notebook runs the first two for each proposition and shows one property by hand.

# %%
import sympy as sp

# `proofs/` of the repository, installed as glora_math.proofs (the `proofs` extra).
from glora_math.proofs.highprec import CHECKS, run_check
from glora_math.proofs.propositions import PROPOSITIONS
from glora_math.proofs.symbolic import PROOFS
from IPython.display import Math, display

for prop in PROPOSITIONS:
    print(f"{prop.id}: {prop.title}")
    display(Math(prop.latex))

# %% [markdown]
# ## A proof with matrix symbols: the projector is gauge invariant (P3's core)
#
# For $B \in \mathbb{R}^{d \times r}$ of full column rank and invertible $G$, the projector
# $P(X) = X (X^\top X)^{-1} X^\top$ satisfies $P(B G) = P(B)$. sympy checks it from the
# lemma $(X Y)^{-1} = Y^{-1} X^{-1}$ for invertible square factors:

# %%
d, r = sp.symbols("d r", positive=True, integer=True)
B = sp.MatrixSymbol("B", d, r)
G = sp.MatrixSymbol("G", r, r)
BtB = B.T * B
lhs = (B * G) * ((B * G).T * (B * G)).inv() * (B * G).T
# Expand ((BG)^T (BG))^{-1} = G^{-1} (B^T B)^{-1} G^{-T} with the lemma, then simplify:
expanded = (B * G) * (G.inv() * BtB.inv() * G.T.inv()) * (B * G).T
print(sp.simplify(expanded - B * BtB.inv() * B.T))

# %% [markdown]
# ## Every symbolic proof and high-precision check

# %%
rows = []
for prop in PROPOSITIONS:
    sym = PROOFS[prop.id]()
    hp = run_check(prop.id, dps=50, trials=2) if prop.id in CHECKS else None
    rows.append((prop.id, sym.ok, hp))
    print(
        f"{prop.id:4s} symbolic {'pass' if sym.ok else 'FAIL'} ({sym.method}); "
        f"50-digit residual {'-' if hp is None else f'{hp.residual:.1e}'}"
    )
assert all(ok for _, ok, _ in rows)

# %% [markdown]
# The residuals sit near $10^{-50}$, the working precision: the identities hold exactly, not
# to float64 accuracy only.

# %%
checks = [hp for *_, hp in rows if hp is not None]
assert all(hp.ok for hp in checks)  # each residual under its threshold (near 10^-dps)
print(
    f"largest residual over all checks: {max(hp.residual for hp in checks):.1e}, "
    f"largest threshold: {max(hp.threshold for hp in checks):.1e}"
)

# %% [markdown]
# ## A property by hand: P1, projection of the mean, in float64 torch

# %%
import torch

from glora_math import glora_aggregate
from glora_math.metrics import mean_update
from glora_math.synthetic import random_clients
from glora_math.tolerances import aggregate_tol

clients = random_clients(n_clients=4, d=30, k=20, rank=3, heterogeneity=0.6, seed=2)
state = glora_aggregate(clients, rank=5)
W = mean_update(clients)
W_dense = W.B @ W.A
U = state.U
err = float((state.delta() - U @ (U.T @ W_dense)).norm())
tol = aggregate_tol(torch.float64, n=30 + 20 + 12, kappa=1.0, gap=1.0, scale=float(W_dense.norm()))
print(f"||U S - U U^T W_bar||_F = {err:.2e} (tolerance {tol:.2e})")
assert err <= tol
