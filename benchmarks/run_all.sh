#!/usr/bin/env bash
# Every benchmark of issue 6 with its default sizes, one after another (never in parallel: they
# would time each other), then benchmarks/RESULTS.md.  About 40 minutes on 2 busy cores.
#   bash benchmarks/run_all.sh            (from the repository root, with the `bench` extra installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
for script in approximation model_speed op_memory op_profile op_speed; do
    "$PYTHON" "benchmarks/$script.py"
done
"$PYTHON" benchmarks/report.py
