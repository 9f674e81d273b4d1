#!/usr/bin/env python3
"""Activation memory per rank under context parallelism, against the ideal 1/cp.

A small GQA Llama runs the forward pass of one sequence of s tokens on cp = 1, 2, 4 forked gloo
ranks (tests/distributed.py), each rank holding its two load-balanced chunks (s/cp tokens). The
bytes autograd saves for backward are counted with ``slimtron.memory.SavedActivations``
(saved-tensor hooks, each storage once, parameters excluded); the largest rank's count is printed
next to the ideal, the cp=1 count divided by cp. Ring attention saves only the local q, k, v,
output and log-sum-exp, and every other saved tensor is per token, so the ratio should be 1.00.

Usage: python bench/context_parallel_memory.py [--seqs 4096,8192,16384] [--cps 1,2,4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron.config import ModelConfig  # noqa: E402
from slimtron.memory import SavedActivations  # noqa: E402
from slimtron.model import GPTModel  # noqa: E402
from slimtron.parallel.context_parallel import shard_sequence  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


def model_config(args, seq_length: int) -> ModelConfig:
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                       ffn_hidden_size=2 * args.hidden,
                       num_attention_heads=args.heads, num_query_groups=args.groups,
                       seq_length=seq_length, vocab_size=args.vocab, normalization="RMSNorm",
                       position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                       untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                       attention_dropout=0.0)


def saved_bytes(rank, world, args, seqs) -> dict:
    """{seq: bytes saved for backward by this rank's forward of one micro-batch}."""
    pstate = ParallelState.build(cp=world)
    model = GPTModel(model_config(args, max(seqs)), pstate)
    out = {}
    for seq in seqs:
        tokens, labels = torch.randint(0, args.vocab, (2, 1, seq),
                                       generator=torch.Generator().manual_seed(seq))
        tokens, labels = (shard_sequence(t, 1, world, rank) for t in (tokens, labels))
        with SavedActivations(exclude=list(model.parameters())) as saved:
            loss = model(tokens=tokens, labels=labels)
            out[seq] = saved.live
        del loss
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,8192,16384")
    parser.add_argument("--cps", default="1,2,4")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    cps = [int(c) for c in args.cps.split(",")]
    if cps[0] != 1:
        parser.error("--cps must start with 1 (the reference of the ratio)")
    per_rank = {}
    for cp in cps:
        results = run_distributed(saved_bytes, cp, args, seqs, timeout=1800)
        for seq in seqs:
            per_rank[seq, cp] = max(r[seq] for r in results)
    print(f"activation bytes per rank (saved for backward), {args.layers} layers, hidden "
          f"{args.hidden}, {args.heads} heads / {args.groups} groups, micro-batch 1, fp32")
    print(f"{'seq':>7} {'cp':>3} {'MiB per rank':>13} {'ideal (cp=1 / cp)':>18} {'ratio':>6}")
    for seq in seqs:
        for cp in cps:
            got, ideal = per_rank[seq, cp], per_rank[seq, 1] / cp
            print(f"{seq:>7} {cp:>3} {got / 2**20:>13.2f} {ideal / 2**20:>18.2f} "
                  f"{got / ideal:>6.3f}")


if __name__ == "__main__":
    main()
