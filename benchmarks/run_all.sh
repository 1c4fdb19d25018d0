#!/usr/bin/env bash
# Every benchmark of issue 6 with its default sizes, one after another (never in parallel: they
# would time each other), then benchmarks/RESULTS.md.  About 35 minutes on 2 quiet cores (op_speed times each
# length in 3 fresh processes).
#   bash benchmarks/run_all.sh                      all of them (from anywhere, `bench` extra installed)
#   bash benchmarks/run_all.sh op_speed op_memory   only these, then the page
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
scripts=("$@")
[ ${#scripts[@]} -eq 0 ] && scripts=(approximation block_size model_speed op_memory op_profile op_speed)
for script in "${scripts[@]}"; do
    "$PYTHON" "benchmarks/$script.py"
done
"$PYTHON" benchmarks/report.py
