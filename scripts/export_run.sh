#!/usr/bin/env bash
# Copy a finished run's table, figures and ablations (not its checkpoints) into results/TASK/.
# Usage: scripts/export_run.sh RUN_DIR TASK
set -euo pipefail
run=$1; task=$2
mkdir -p "results/$task"
cp "$run"/table.json "$run"/table.md "$run"/*.png "results/$task/"
for f in "$run"/ablation-*.json "$run"/ablation-*.md; do [ -e "$f" ] && cp "$f" "results/$task/"; done
echo "exported $run -> results/$task"
