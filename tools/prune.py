#!/usr/bin/env python
"""Prune a slimtron checkpoint Minitron-style and save the smaller model as a new checkpoint.

    python tools/prune.py --load ckpt/ --save pruned/ --calib-data corpus_text_document \\
        [--target-ffn-hidden-size F] [--target-num-layers L] [--target-num-attention-heads H] \\
        [--target-hidden-size D] \\
        [--calib-samples 64 --calib-batch-size 8 --seq-length S]

Runs in one process: the checkpoint (any layout) is loaded whole, importance is measured on the
first --calib-samples windows of --seq-length tokens of the indexed corpus (documents concatenated
in order), and the pruned weights are written with ``save_checkpoint`` as iteration 0 without
optimizer state (``slimtron.post_training.pruning`` says what is measured and removed). Any layout
loads the result (``pretrain_gpt.py --load pruned/ --finetune``, or as a --kd-teacher-load student
start) and convert_to_hf exports it. Nothing is written unless pruning succeeds.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from slimtron import checkpointing
from slimtron.cli import run_tool
from slimtron.config import Config, ConfigError, ParallelConfig
from slimtron.data import IndexedDataset
from slimtron.model import build_model_chunks
from slimtron.parallel.state import ParallelState
from slimtron.post_training import pruning


def calibration_batches(prefix: str, num_samples: int, batch_size: int, seq_length: int,
                        vocab_size: int) -> list[torch.Tensor]:
    """``num_samples`` consecutive windows of ``seq_length`` tokens, in batches."""
    if not IndexedDataset.exists(prefix):
        raise ConfigError(f"--calib-data: {prefix}.bin/.idx do not exist")
    data = IndexedDataset(prefix)
    need, pieces, have = num_samples * seq_length, [], 0
    for i in range(len(data)):
        pieces.append(np.asarray(data[i], dtype=np.int64))
        have += len(pieces[-1])
        if have >= need:
            break
    if have < need:
        raise ConfigError(f"--calib-data {prefix}: {have} tokens, fewer than --calib-samples "
                          f"{num_samples} x --seq-length {seq_length}")
    tokens = torch.from_numpy(np.concatenate(pieces)[:need]).view(num_samples, seq_length)
    if int(tokens.max()) >= vocab_size:
        raise ConfigError(f"--calib-data {prefix}: token id {int(tokens.max())} is outside the "
                          f"model's vocabulary of {vocab_size} (another tokenizer?)")
    return list(tokens.split(batch_size))


def load_whole_model(load: str):
    """The checkpoint's model in one process, and its Config."""
    if checkpointing.latest_iteration(load) is None:
        raise ConfigError(f"--load {load}: no checkpoint there")
    _, common = checkpointing.load_common(load)
    config = Config.from_dict(common["config"])
    model = build_model_chunks(config.model, ParallelState.single(), initialize=False)[0]
    checkpointing.load_checkpoint(load, [model], None, ParallelState.single(), config,
                                  load_optim=False, load_rng=False, finetune=True)
    return model.eval(), config


def prune(args) -> dict:
    if checkpointing.latest_iteration(args.save) is not None:
        raise ConfigError(f"--save {args.save}: already holds a checkpoint")
    model, config = load_whole_model(args.load)
    cfg = config.model
    pruning.check_targets(cfg, args.target_ffn_hidden_size, args.target_num_layers,
                          args.target_num_attention_heads, args.target_hidden_size)
    seq = args.seq_length or cfg.seq_length
    if seq > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-length {seq} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}")
    batches = calibration_batches(args.calib_data, args.calib_samples, args.calib_batch_size, seq,
                                  cfg.vocab_size)
    importance = pruning.collect_importance(model, batches)
    plan = pruning.make_plan(importance, cfg, args.target_ffn_hidden_size, args.target_num_layers,
                             args.target_num_attention_heads, args.target_hidden_size)
    pruned = pruning.prune_model(model, plan, seed=config.training.seed)
    out = Config.from_dict(config.to_dict())
    out.model, out.parallel = pruned.config, ParallelConfig()
    checkpointing.save_checkpoint(args.save, 0, [pruned], None, ParallelState.single(), out, 0,
                                  extra={"pruned_from": args.load})
    before, after = pruning.parameter_count(model), pruning.parameter_count(pruned)
    core = pruning.non_embedding_count(model), pruning.non_embedding_count(pruned)
    print(pruning.describe(plan, importance))
    m = pruned.config
    print(f"pruned {args.load} -> {args.save}: {before:,} -> {after:,} parameters "
          f"({100 * after / before:.1f}%; non-embedding {core[0]:,} -> {core[1]:,}, "
          f"{100 * core[1] / core[0]:.1f}%): layers {cfg.num_layers} -> {m.num_layers}, hidden "
          f"{cfg.hidden_size} -> {m.hidden_size}, ffn "
          f"{cfg.ffn_hidden_size} -> {m.ffn_hidden_size}, heads {cfg.num_attention_heads} -> "
          f"{m.num_attention_heads} (query groups {cfg.num_query_groups} -> {m.num_query_groups})")
    return {"before": before, "after": after, "plan": plan}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint to prune (any layout)")
    p.add_argument("--save", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--calib-data", required=True, help="indexed corpus prefix (.bin/.idx)")
    p.add_argument("--target-ffn-hidden-size", type=int, default=None)
    p.add_argument("--target-num-layers", type=int, default=None)
    p.add_argument("--target-num-attention-heads", type=int, default=None)
    p.add_argument("--target-hidden-size", type=int, default=None,
                   help="embedding channels (Minitron's embedding axis)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=None, help="default: the checkpoint's")
    args = p.parse_args(argv)
    for flag in ("calib_samples", "calib_batch_size", "seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool("prune", lambda: prune(args))


if __name__ == "__main__":
    sys.exit(main())
