#!/bin/sh
# The order in which the remaining cells run on a 2-core machine (resumable: rerun after an
# interruption and it continues where it stopped; finished runs are skipped).
#   1. cell (a) (every operator, 3 seeds; finished);
#   2. seed 2 of alpha 0.1 (cell (d));
#   3. seed 0 of TREC (cell (e): the sentence task, 6 classes) for the five main operators;
#   4. seeds 1 and 2 of heterogeneous ranks and alpha 100 (cell (d));
#   5. seeds 1 and 2 of TREC, then of participation 0.3.
# Usage (from the repository root):
#   nohup sh integration/experiments/run_queue.sh > /tmp/queue.log 2>&1 &
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
E="$PY -m integration.experiment"
X=integration/experiments
$E $X/a_sst2.json
$E $X/d_sst2_alpha0.1.json
$E --seeds 0 $X/e_trec.json
$E $X/d_sst2_hetero.json
$E $X/d_sst2_alpha100.json
$E $X/e_trec.json
$E $X/d_sst2_participation.json
