#!/usr/bin/env bash
# The CPU quickstart, end to end on the bundled corpus (King James Bible, public domain):
#   1. tokenize it into a .bin/.idx corpus with the bundled sentencepiece model
#   2. train a small Llama with TP=2, PP=2, DP=2 on 8 CPU processes (gloo), sequence parallel and
#      the distributed optimizer on, for a few minutes; the loss falls from ~9 to under 5
#   3. save a checkpoint, export it to Hugging Face format, generate from it with slimtron and
#      with transformers
# Knobs: ITERS (default 150), OUT (default runs/quickstart), SKIP_INSTALL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh

OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-150}
TOKENIZER=data/tokenizer/kjv_bpe8k.model
mkdir -p "$OUT/data"

echo "== 1. preprocess the bundled corpus"
python3 tools/preprocess_data.py --input data/corpus/kjv.jsonl.zst --output-prefix "$OUT/data/kjv" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" --append-eod --workers 2

echo "== 2. train: 8 CPU processes = TP 2 x PP 2 x DP 2"
rm -rf "$OUT/ckpt"
torchrun --nproc-per-node 8 pretrain_gpt.py \
  --preset quickstart-llama \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --sequence-parallel --use-distributed-optimizer \
  --micro-batch-size 4 --global-batch-size 32 --train-iters "$ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --lr-decay-style cosine --clip-grad 1.0 \
  --data-path "$OUT/data/kjv_text_document" --split 98,2,0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
  --log-interval 10 --eval-interval 50 --eval-iters 2 \
  --save "$OUT/ckpt" --save-interval 50 --tensorboard-dir "$OUT/tensorboard" \
  2> >(grep -v -e "OMP_NUM_THREADS" -e "^W.*\*\*\*\*" >&2)

echo "== 3. export to Hugging Face and generate"
python3 tools/checkpoint/convert_to_hf.py --load "$OUT/ckpt" --output "$OUT/hf"
python3 tools/generate.py --load "$OUT/ckpt" --prompt "And God said" --max-new-tokens 30 --greedy
python3 - "$OUT/hf" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok("And God said", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=30, do_sample=False)
print("transformers:", tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
PY
echo "== done: checkpoint $OUT/ckpt, Hugging Face model $OUT/hf, TensorBoard $OUT/tensorboard"
