# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. The aggregation step isolated: every operator on the same uploads
#
# Comparing operators by where their runs end mixes two things: what each operator makes of
# one round's uploads, and everything that follows from it (the next rounds' uploads differ,
# and so does the noise of the trajectory). The runner's counterfactual rounds separate them.
# Along one trajectory (here FedIT's):
#
# - **arm (a)**: at every round, every listed operator aggregates the *very same* uploads and
#   its global model is evaluated; nothing of the trajectory changes;
# - **arm (b)**: each operator's global model is sent back, trained one more round by the same
#   clients with the same batches, and aggregated again by that operator;
# - **broadcast split**: the trajectory's own global update handed back in other
#   factorisations (the same product $BA$, split differently into $B$ and $A$), trained one
#   round further and aggregated by the run's operator.
#
# This is CPU-sized (MiniLM, 3 clients, 2 rounds, a few hundred sentences) so that it executes
# in CI: it shows the mechanics and the identities they rest on, not evidence. The study-sized
# cell is `glora experiment g_sst2_counterfactual --out results` (hours of one core), and
# docs/experiments.md in the repository holds its pre-registration and tables. Outside a
# source checkout, point `GLORA_DATA` at the data folder (the one holding `glue/`).

# %%
import itertools
import statistics
import tempfile

from glora_math.integration.simulate import SimConfig, Simulation

OPERATORS = ["fedit", "flexlora", "glora_auto"]
SPLITS = ["own", "balanced", "left"]
with tempfile.TemporaryDirectory() as tmp:
    cfg = SimConfig(
        model="minilm",
        task="sst2",
        clients=3,
        dirichlet=0.5,
        rounds=2,
        local_steps=3,
        batch_size=16,
        lr=5e-3,
        rank=4,
        max_train=150,
        max_eval=50,
        test_holdout=100,  # training rows set aside: every arm is evaluated on them
        max_len=32,
        seed=0,
        threads=1,
        operator="fedit",  # the trajectory
        counterfactual=OPERATORS,  # arm (a), every round
        counterfactual_next=True,  # arm (b)
        broadcast_splits=SPLITS,  # the broadcast split
        out=tmp,
    )
    rows = Simulation(cfg).run()

# %% [markdown]
# ## Arm (a): the same uploads, every operator
#
# The run's own operator, listed among the others, reproduces the run to the bit: the same
# uploads, the same aggregate, the same evaluation. That is what makes the other rows
# comparable with it: they differ from it by the aggregation alone.

# %%
for row in rows:
    own = row["counterfactual"]["fedit"]
    assert own["loss"] == row["test_loss"]
    assert own["accuracy"] == row["test_accuracy"]
    assert own["aggregation_error"] == row["aggregation_error"]
    print(f"round {row['round']}")
    for name, arm in row["counterfactual"].items():
        print(
            f"  {name:16s} aggregation error {arm['aggregation_error']:.3f}   "
            f"test loss {arm['loss']:.4f} (this - own {arm['loss'] - own['loss']:+.4f})   "
            f"accuracy {arm['accuracy']:.3f}"
        )

# %% [markdown]
# ## Arm (b) and the broadcast split: one round further
#
# Every random choice of a round (its participants, batches, dropout) is drawn from
# (seed, round, client), so the run's own operator trained one round further from its own
# aggregate *is* the trajectory's next round: arm (b)'s own row and the `own` split equal the
# next round's test loss, again to the bit. The other splits send the very same product
# $BA$; only its factorisation into $B$ and $A$ differs, and with it the next round.

# %%
for row, after in itertools.pairwise(rows):
    assert row["counterfactual_next"]["fedit"]["loss"] == after["test_loss"]
    assert row["broadcast_split"]["own"]["loss"] == after["test_loss"]
for row in rows:
    nxt, split = row["counterfactual_next"], row["broadcast_split"]
    print(f"round {row['round']} -> {row['round'] + 1}")
    for name, arm in nxt.items():
        print(f"  operator {name:16s} next-round test loss {arm['loss']:.4f}")
    for name, arm in split.items():
        print(f"  split    {name:16s} next-round test loss {arm['loss']:.4f}")

# %% [markdown]
# ## Dose-response, and how the study reads it
#
# Does a smaller aggregation error give a better model? Over (round, operator), correlate each
# operator's error minus the run's own with its test loss minus the run's own. Here there are
# a handful of points from one seed: it shows the computation, nothing more. The study pairs these
# differences by seed over many seeds, with intervals (`glora experiment ... --table`).

# %%
xs, ys = [], []
for row in rows:
    own = row["counterfactual"]["fedit"]
    for name, arm in row["counterfactual"].items():
        if name != "fedit":
            xs.append(arm["aggregation_error"] - own["aggregation_error"])
            ys.append(arm["loss"] - own["loss"])
print(f"correlation of Δerror with Δloss: {statistics.correlation(xs, ys):+.3f} (n = {len(xs)})")
