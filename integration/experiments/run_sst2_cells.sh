#!/bin/sh
# Cells (a) then (b) on SST-2, resumably: rerun this script after an interruption and it
# continues where it stopped (finished runs are skipped, an interrupted run resumes).
# Usage (from the repository root):
#   nohup sh integration/experiments/run_sst2_cells.sh > /tmp/cell_a.log 2>&1 &
# Tables: docs/experiments/a_sst2.md and b_sst2_gauge.md (rewritten after every run);
# regenerate with: .venv/bin/python -m integration.experiment --table <config>.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
"$PY" -m integration.experiment integration/experiments/a_sst2.json
"$PY" -m integration.experiment integration/experiments/b_sst2_gauge.json
