#!/usr/bin/env bash
# Llama-2-7B on SlimPajama, several nodes of 8 x 80 GB GPUs.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_7b.sh   # on every node, its rank
#
# Layout: TP=2 inside a node (NVLink), PP=1, DP = 4 x NNODES. With bf16, the distributed optimizer
# and sequence parallelism, python tools/model_summary.py --preset llama2-7b
# --tensor-model-parallel-size 2 --data-parallel-size 16 --micro-batch-size 1 --seq-length 4096
# --bf16 --use-distributed-optimizer --sequence-parallel --recompute-granularity selective
# estimates the per-GPU memory (it fits 80 GB with room for the allocator).
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-data/processed/slimpajama}          # prefix given to tools/preprocess_data.py
TOKENIZER=${TOKENIZER:-tokenizer.model}          # Llama-2 sentencepiece model
CKPT=${CKPT:-checkpoints/llama2-7b}

# SlimPajama's seven sources, as written by
#   python tools/preprocess_data.py --input 'SlimPajama-627B/train/chunk*/*.jsonl.zst' \
#     --output-prefix $DATA --split-by-meta meta.redpajama_set_name --append-eod --workers 64 \
#     --tokenizer-type SentencePieceTokenizer --tokenizer-model $TOKENIZER
# weighted by SlimPajama's token shares.
DATA_BLEND=(
  0.522 ${DATA}_RedPajamaCommonCrawl_text_document
  0.267 ${DATA}_RedPajamaC4_text_document
  0.052 ${DATA}_RedPajamaGithub_text_document
  0.042 ${DATA}_RedPajamaBook_text_document
  0.046 ${DATA}_RedPajamaArXiv_text_document
  0.038 ${DATA}_RedPajamaWikipedia_text_document
  0.033 ${DATA}_RedPajamaStackExchange_text_document
)

ARGS=(
  --preset llama2-7b                       # 32 layers, hidden 4096, ffn 11008, 32 heads, seq 4096
  --tensor-model-parallel-size 2           # TP ranks are neighbours: keep them inside a node
  --pipeline-model-parallel-size 1
  --sequence-parallel                      # norms/dropout on s/tp: activations / tp
  --use-distributed-optimizer              # ZeRO-1: 6 + 12/dp bytes per parameter
  --overlap-grad-reduce
  --bf16
  --recompute-granularity selective        # recompute attention only (drops the 5as/h term)
  --micro-batch-size 1
  --global-batch-size 1024                 # 4M tokens per step at seq 4096
  --train-iters 250000
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
  --data-path "${DATA_BLEND[@]}"
  --split 969,30,1
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER"
  --save "$CKPT" --load "$CKPT" --save-interval 1000
  --log-interval 10 --eval-interval 1000 --eval-iters 20
  --tensorboard-dir "$CKPT/tensorboard"
  --distributed-timeout-minutes 30
)

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  pretrain_gpt.py "${ARGS[@]}"
