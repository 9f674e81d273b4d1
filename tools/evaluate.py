#!/usr/bin/env python
"""Loss and perplexity of a checkpoint on the validation (or test) split of a corpus.

    python tools/evaluate.py --load ckpt/ --data-path corpus_text_document --split 969,30,1 \\
        --eval-iters 10 [--micro-batch-size 4 --global-batch-size 8 --seq-length 1024]
    torchrun --nproc-per-node 4 tools/evaluate.py --load ckpt/ ... \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

The model shape and tokenizer come from the checkpoint (saved in any layout); the run's layout from
the flags (data-parallel size = world / (tp x pp)). Samples are exactly those training's validation
reads (``slimtron.data.build_train_valid_test_datasets`` with the checkpoint's seed), and the loss is
training's: per global batch the mean over unmasked tokens, averaged over --eval-iters batches, run
forward-only through the pipeline schedule. No optimizer is built.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from slimtron import training
from slimtron.checkpointing import load_common
from slimtron.cli import run_tool
from slimtron.config import Config, ConfigError
from slimtron.data.tokenizers import build_model_tokenizer
from slimtron.parallel.state import init_distributed

SPLITS = {"valid": 1, "test": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--data-path", nargs="+", required=True, help="prefix, or weight prefix ...")
    p.add_argument("--split", default="969,30,1")
    p.add_argument("--eval-split", default="valid", choices=sorted(SPLITS))
    p.add_argument("--eval-iters", type=int, default=10, help="global batches to evaluate")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--tokenizer-type", default=None, help="default: the checkpoint's")
    p.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's")
    p.add_argument("--data-cache-path", default=None)
    p.add_argument("--eod-mask-loss", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    return p.parse_args(argv)


def evaluation_config(args, saved: dict) -> Config:
    """The checkpoint's config with this run's data, batch and layout settings."""
    config = Config.from_dict(saved)
    m, p, d, t, o = config.model, config.parallel, config.data, config.training, config.optim
    m.hidden_dropout = m.attention_dropout = 0.0
    if args.seq_length is not None:
        m.seq_length = args.seq_length
    p.tensor_model_parallel_size = args.tensor_model_parallel_size
    p.pipeline_model_parallel_size = args.pipeline_model_parallel_size
    p.data_parallel_size = None
    p.num_layers_per_virtual_pipeline_stage = None
    p.sequence_parallel = p.use_distributed_optimizer = p.overlap_grad_reduce = False
    d.data_path, d.split, d.eod_mask_loss = list(args.data_path), args.split, args.eod_mask_loss
    d.data_cache_path, d.mock_data = args.data_cache_path, False
    d.tokenizer_type = args.tokenizer_type or d.tokenizer_type
    d.tokenizer_model = args.tokenizer_model or d.tokenizer_model
    t.micro_batch_size, t.global_batch_size = args.micro_batch_size, args.global_batch_size
    t.train_iters, t.eval_iters, t.eval_interval = 0, args.eval_iters, None
    t.load, t.save, t.finetune = args.load, None, True
    t.recompute_granularity = t.recompute_method = t.recompute_num_layers = None
    o.bf16, o.fp16 = args.bf16, args.fp16
    if args.eval_iters < 1:
        raise ConfigError(f"--eval-iters must be at least 1, got {args.eval_iters}")
    return config


def build_engine(config: Config, world: int) -> training.Engine:
    """Model (weights from the checkpoint) and datasets (the tokenizer gives their end-of-document
    id); no gradients, no optimizer."""
    tokenizer = build_model_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model,
                                      config.model.vocab_size, config.training.load,
                                      vocab_file=config.data.vocab_file,
                                      merge_file=config.data.merge_file)
    return training.setup(config, world, training=False, tokenizer=tokenizer)


def run(args) -> float:
    """Evaluate; returns the loss (every rank) and prints loss and perplexity (rank 0)."""
    init_distributed()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    _, common = load_common(args.load)
    config = evaluation_config(args, common["config"])
    engine = build_engine(config, world)
    split = SPLITS[args.eval_split]
    if not engine.available[split]:
        raise ConfigError(f"--split {args.split}: the {args.eval_split} split of --data-path is "
                          "empty")
    loss = training.evaluate(engine, engine.datasets[split], args.eval_iters)
    tokens = args.eval_iters * config.training.global_batch_size * config.model.seq_length
    training.log(engine.pstate, f" {args.eval_split} loss of {args.load} (iteration "
                 f"{common['iteration']}) over {args.eval_iters} batches ({tokens} tokens): "
                 f"lm loss {loss:.6E} | lm loss PPL {math.exp(min(loss, 700.0)):.6E}")
    return loss


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool("evaluate", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
