#!/bin/sh
# The order in which the remaining cells run on a 2-core machine, as two chains that run at the
# same time (one torch thread each) and never touch the same run folder. Resumable: rerun after
# an interruption and it continues where it stopped; finished runs are skipped.
#   chain 1: cell (a) (finished), alpha 0.1 (cell (d), finished), TREC seed 0 (cell (e)),
#            RoLoRA and LoRA-FAIR in training beside four baselines (cell (e), SST-2);
#   (CoLA at the longer budget, c_cola_long.json, stopped after its centralised run and FedIT
#   seed 0 stayed at the majority class; run it alone if you want the other operators.)
#   chain 2: heterogeneous ranks (cell (d)), TREC seeds 1 and 2, alpha 100, participation 0.3.
# Usage (from the repository root):
#   nohup sh integration/experiments/run_queue.sh 1 > /tmp/queue1.log 2>&1 &
#   nohup sh integration/experiments/run_queue.sh 2 > /tmp/queue2.log 2>&1 &
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
E="$PY -m integration.experiment"
X=integration/experiments
case "${1:-1}" in
  1)
    $E $X/a_sst2.json
    $E $X/d_sst2_alpha0.1.json
    $E --seeds 0 $X/e_trec.json
    $E --seeds 0 $X/e_sst2_new_operators.json
    $E $X/e_sst2_new_operators.json
    ;;
  2)
    $E $X/d_sst2_hetero.json
    $E --seeds 1,2 $X/e_trec.json
    $E $X/d_sst2_alpha100.json
    $E $X/d_sst2_participation.json
    ;;
  *)
    echo "usage: $0 1|2" >&2
    exit 2
    ;;
esac
