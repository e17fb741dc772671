#!/bin/sh
# The order in which the remaining cells run on a 2-core machine (resumable: rerun after an
# interruption and it continues where it stopped; finished runs are skipped).
#   1. finish cell (a) (every operator, 3 seeds);
#   2. seed 0 of every cell (d) config (alpha 0.1, heterogeneous ranks, participation 0.3,
#      alpha 100) for the five main operators;
#   3. seeds 1 and 2 of cell (d).
# Usage (from the repository root):
#   nohup sh integration/experiments/run_queue.sh > /tmp/queue.log 2>&1 &
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
E="$PY -m integration.experiment"
$E integration/experiments/a_sst2.json
for c in d_sst2_alpha0.1 d_sst2_hetero d_sst2_participation d_sst2_alpha100; do
  $E --seeds 0 integration/experiments/$c.json
done
for c in d_sst2_alpha0.1 d_sst2_hetero d_sst2_participation d_sst2_alpha100; do
  $E integration/experiments/$c.json
done
