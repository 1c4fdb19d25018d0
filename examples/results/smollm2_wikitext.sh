#!/usr/bin/env bash
# SmolLM2-135M on WikiText-2: perplexity of the exact model and of its FAVOR+ conversion (zero-shot) on the
# first 16 blocks of 512 tokens of ../shared/data/wikitext2/valid.txt (8,192 tokens).
# Usage: bash examples/results/smollm2_wikitext.sh OUT_DIR
set -euo pipefail
OUT=${1:-out/smollm2_wikitext}
MODEL=${SMOLLM2:-$HOME/.cache/hf-performer/smollm2-135m}
TEXT=../shared/data/wikitext2/valid.txt
TIMEFORMAT='stage CPU time: user %U s, sys %S s, wall %R s'
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1   # one thread: the shared machine is oversubscribed

echo "== exact and FAVOR+ m=256 zero-shot perplexity"
time python examples/finetune.py --task causal-lm --model "$MODEL" --evaluate_only true \
  --train_data ../shared/data/tinyshakespeare/input.txt --eval_data $TEXT --max_length 512 --max_eval_samples 16 \
  --per_device_eval_batch_size 2 --favor-nb-features 256 --output_dir "$OUT/zero_shot_256" \
  --report_to none --disable_tqdm true --dataloader_pin_memory false --seed 0
