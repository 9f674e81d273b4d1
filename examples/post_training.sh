#!/usr/bin/env bash
# Post-training on the bundled corpus, end to end (a few minutes on 2 CPU cores):
#   1. teacher: the quickstart model (its checkpoint in runs/quickstart/ckpt when present, else
#      pretrained here with the same recipe on 2 processes)
#   2. prune it Minitron-style to about half its parameters (tools/prune.py: 4 -> 3 layers, hidden
#      128 -> 80, ffn 352 -> 160; the 8000-token embeddings are most of this small model)
#   3. recover for the same number of steps on the same data: distillation from the teacher
#      (--kd-teacher-load) against plain LM training (2 data-parallel processes each)
#   4. validation perplexity before pruning, after, after KD, after plain training (a table)
#   5. SFT on "complete the verse" pairs generated from the corpus, starting from the teacher's
#      Hugging Face export (imported by convert_from_hf, trained on 2
#      data-parallel processes) and exported back to Hugging Face: the loss on held-out response
#      tokens before and after, and greedy answers that stop at eos
# Knobs: OUT (runs/post_training), PRETRAIN_ITERS (150), RECOVER_ITERS (60), SFT_ITERS (60),
#        TEACHER (a checkpoint directory to use instead of the quickstart's).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/post_training}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-150}
RECOVER_ITERS=${RECOVER_ITERS:-60}
SFT_ITERS=${SFT_ITERS:-60}
TOKENIZER=data/tokenizer/kjv_bpe8k.model
DATA="$OUT/data/kjv_text_document"
SPLIT=98,2,0
export OMP_NUM_THREADS=1
mkdir -p "$OUT/data"
quiet() { grep -v -e "OMP_NUM_THREADS" -e "^W.*\*\*\*\*" >&2; }
run2() { torchrun --nproc-per-node 2 "$@" 2> >(quiet); }
TOK=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER")
# The pruned shape (quickstart-llama: 4 layers, hidden 128, ffn 352, 4 heads of 32 dims).
PRUNED=(--preset quickstart-llama --num-layers 3 --hidden-size 80 --ffn-hidden-size 160
        --kv-channels 32)

echo "== 1. corpus and teacher"
[ -f "$DATA.idx" ] || python3 tools/preprocess_data.py --input data/corpus/kjv.jsonl.zst \
  --output-prefix "$OUT/data/kjv" "${TOK[@]}" --append-eod --workers 2
TEACHER=${TEACHER:-}
if [ -z "$TEACHER" ] && [ -f runs/quickstart/ckpt/latest_checkpointed_iteration.txt ]; then
  TEACHER=runs/quickstart/ckpt
fi
if [ -z "$TEACHER" ]; then
  TEACHER="$OUT/teacher"
  if [ ! -f "$TEACHER/latest_checkpointed_iteration.txt" ]; then
    run2 pretrain_gpt.py --preset quickstart-llama --micro-batch-size 16 --global-batch-size 32 \
      --train-iters "$PRETRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 \
      --lr-decay-style cosine --clip-grad 1.0 --data-path "$DATA" --split "$SPLIT" "${TOK[@]}" \
      --log-interval 25 --save "$TEACHER"
  fi
fi
echo "teacher: $TEACHER"

echo "== 2. prune"
rm -rf "$OUT/pruned" "$OUT/kd" "$OUT/plain"
python3 tools/prune.py --load "$TEACHER" --save "$OUT/pruned" --calib-data "$DATA" \
  --calib-samples 64 --target-num-layers 3 --target-hidden-size 80 --target-ffn-hidden-size 160 \
  | tee "$OUT/prune.log"

echo "== 3. recover: KD from the teacher vs plain LM training, $RECOVER_ITERS steps each"
RECOVER=("${PRUNED[@]}" --load "$OUT/pruned" --finetune --micro-batch-size 16
         --global-batch-size 32 --train-iters "$RECOVER_ITERS" --lr 1e-3 --min-lr 1e-4
         --lr-warmup-iters 5 --lr-decay-style cosine --clip-grad 1.0 --data-path "$DATA"
         --split "$SPLIT" "${TOK[@]}" --log-interval 20)
run2 pretrain_gpt.py "${RECOVER[@]}" \
  --kd-teacher-load "$TEACHER" --kd-temperature 2.0 --kd-alpha 0.5 --save "$OUT/kd"
run2 pretrain_gpt.py "${RECOVER[@]}" --save "$OUT/plain"

echo "== 4. validation perplexity"
evaluate() {
  python3 tools/evaluate.py --load "$1" --data-path "$DATA" --split "$SPLIT" --eval-iters 8 \
    --micro-batch-size 8 2>/dev/null | grep -o "lm loss PPL [0-9.E+-]*" | awk '{printf "%.2f", $4}'
}
{
  echo "| model | parameters (non-embedding) | validation PPL |"
  echo "|---|---|---|"
  read -r BEFORE AFTER BEFORE_NE AFTER_NE < <(python3 - "$OUT/prune.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"([\d,]+) -> ([\d,]+) parameters .*non-embedding ([\d,]+) -> ([\d,]+)", text)
print(*(g.replace(",", "") for g in m.groups()))
PY
)
  echo "| teacher (quickstart-llama) | $BEFORE ($BEFORE_NE) | $(evaluate "$TEACHER") |"
  echo "| pruned, no training | $AFTER ($AFTER_NE) | $(evaluate "$OUT/pruned") |"
  echo "| pruned + KD, $RECOVER_ITERS steps | $AFTER ($AFTER_NE) | $(evaluate "$OUT/kd") |"
  echo "| pruned + LM loss, $RECOVER_ITERS steps | $AFTER ($AFTER_NE) | $(evaluate "$OUT/plain") |"
} | tee "$OUT/table.md"

echo "== 5. SFT: complete-the-verse pairs, from Hugging Face weights, back to Hugging Face"
python3 examples/build_verse_sft.py --output-dir "$OUT/sft"
rm -rf "$OUT/hf_base" "$OUT/sft_init" "$OUT/sft_ckpt" "$OUT/hf_sft"
python3 tools/checkpoint/convert_to_hf.py --load "$TEACHER" --output "$OUT/hf_base"
python3 tools/checkpoint/convert_from_hf.py --hf "$OUT/hf_base" --save "$OUT/sft_init" \
  --tokenizer-model "$TOKENIZER" --tokenizer-type SentencePieceTokenizer
python3 examples/sft_check.py --load "$OUT/sft_init" --data "$OUT/sft/held_out.jsonl" --show 2 \
  | tee "$OUT/sft_before.log"
run2 pretrain_gpt.py --preset quickstart-llama --sft \
  --data-path "$OUT/sft/train.jsonl" --split 98,2,0 "${TOK[@]}" --load "$OUT/sft_init" --finetune \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$SFT_ITERS" --lr 1e-3 \
  --min-lr 1e-4 --lr-warmup-iters 5 --lr-decay-style cosine --clip-grad 1.0 --log-interval 10 \
  --eval-interval "$SFT_ITERS" --eval-iters 2 --save "$OUT/sft_ckpt"
python3 examples/sft_check.py --load "$OUT/sft_ckpt" --data "$OUT/sft/held_out.jsonl" --show 3 \
  | tee "$OUT/sft_after.log"
python3 tools/checkpoint/convert_to_hf.py --load "$OUT/sft_ckpt" --output "$OUT/hf_sft"
echo "== done: table $OUT/table.md, SFT model $OUT/hf_sft"
