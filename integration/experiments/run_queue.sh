#!/bin/sh
# The order in which study F's cells run on a 2-core machine (docs/experiments.md), as two
# chains that run at the same time (one torch thread each) and never touch the same run
# folder. Resumable: rerun after an interruption and each chain continues where it stopped
# (finished runs are skipped, an interrupted run resumes from its last round).
#   chain 1: the powered cell's seeds 0-10 (with its references at seeds 0-4), then the
#            counterfactual cell along FedIT's trajectory (g), at alpha 0.1 (l), then alpha
#            0.1 (i) and the heterogeneous-rank cell (k);
#   chain 2: the LLM cell (h), the powered cell's seeds 11-19, the counterfactual cell along
#            FlexLoRA's trajectory (m), then 50 local steps (j).
# The split balances the one-core hours after the powered cell (docs/experiments.md, "Cost"):
# g + l + i + k about 58 hours, m + j about 63 (j's runs are about three times as long).
# The earlier cells (a)-(e) are complete or deliberately stopped (docs/experiments.md says
# which); their configs still run alone with `python -m integration.experiment <config>`.
# A fresh machine starts with an empty out/: every run resumes from its checkpoint parked in
# docs/experiments/parked (glora experiment --park; docs/experiments.md says when to park).
# Usage (from the repository root):
#   nohup sh integration/experiments/run_queue.sh 1 > /tmp/queue1.log 2>&1 &
#   nohup sh integration/experiments/run_queue.sh 2 > /tmp/queue2.log 2>&1 &
# Where a cell stands: .venv/bin/python -m integration.experiment --list <config of the cell>
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
E="$PY -m integration.experiment --unpark docs/experiments/parked"
X=integration/experiments
case "${1:-1}" in
  1)
    $E --seeds 0,1,2,3,4,5,6,7,8,9,10 $X/f_sst2_powered.json
    $E $X/g_sst2_counterfactual.json
    $E $X/l_sst2_alpha0.1_counterfactual.json
    $E $X/i_sst2_alpha0.1.json
    $E $X/k_sst2_hetero.json
    ;;
  2)
    $E $X/h_llm_subj.json
    $E --seeds 11,12,13,14,15,16,17,18,19 $X/f_sst2_powered.json
    $E $X/m_sst2_counterfactual_flexlora.json
    $E $X/j_sst2_steps50.json
    ;;
  *)
    echo "usage: run_queue.sh 1|2" >&2
    exit 2
    ;;
esac
