#!/usr/bin/env python3
"""Start-up of a ~1B Llama at TP=2: building the model with each initialisation rule, and loading.

Two processes (gloo, CPU), one per TP rank, each timing three ways to get its model chunks ready:

- ``full draw, then shard``: the rule before block-wise initialisation, reproduced here: every
  rank draws the full fp32 tensor of every parameter from (seed, name) and keeps its shard;
- ``own shard only``: today's rule (``slimtron.model.init``): each rank draws only the blocks of
  its shard, so the drawing is 1/tp of the above;
- ``no init + load``: with ``--load`` (not ``--finetune``) the model is built without drawing and
  a checkpoint fills it (a checkpoint written first, not timed).

Printed: seconds per rank (the slowest rank) and the ratio to the first. The rest of start-up
(optimizer state, grad buffers, the data index) is unchanged by these rules and not timed; on
this shared CPU the drawing is the part that grows with the model.

Usage: python bench/startup.py [--tp 2] [--layers 22] [--dtype bf16] [--no-load]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron import checkpointing  # noqa: E402
from slimtron.config import Config, ModelConfig  # noqa: E402
from slimtron.flops import matmul_params  # noqa: E402
from slimtron.model import build_model_chunks, init  # noqa: E402
from slimtron.parallel.sharding import shard_like  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def llama_1b(layers: int) -> ModelConfig:
    """TinyLlama's shape (1.1B parameters at 22 layers)."""
    return ModelConfig(num_layers=layers, hidden_size=2048, ffn_hidden_size=5632,
                       num_attention_heads=32, num_query_groups=4, seq_length=2048,
                       vocab_size=32000, normalization="RMSNorm", position_embedding_type="rope",
                       swiglu=True, add_bias_linear=False,
                       untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                       attention_dropout=0.0)


@torch.no_grad()
def full_draw_then_shard(chunks, cfg: ModelConfig, seed: int, pstate) -> None:
    """The previous rule: the full tensor of every parameter on every rank, then its shard."""
    for chunk in chunks:
        for param in chunk.parameters():
            full = init.full_initial_value(param.global_name, param.full_shape, cfg, seed,
                                           chunks=getattr(param, "partition_chunks", 1))
            param.copy_(shard_like(full, param, pstate.tp.size, pstate.tp.rank))


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pstate = ParallelState.build(tp=world)
    cfg, dtype, seed = llama_1b(args.layers), DTYPES[args.dtype], 1234

    def build(initialize: bool):
        return build_model_chunks(cfg, pstate, params_dtype=dtype, seed=seed,
                                  initialize=initialize)

    times = {}
    times["full draw, then shard"] = _timed(
        lambda: full_draw_then_shard(build(False), cfg, seed, pstate))
    chunks = []
    times["own shard only"] = _timed(lambda: chunks.append(build(True)))
    if not args.no_load:
        config = Config(model=cfg)
        root = args.checkpoint_dir
        checkpointing.save_checkpoint(root, 1, chunks[0], None, pstate, config, 0)
        times["no init + load"] = _timed(lambda: checkpointing.load_checkpoint(
            root, build(False), None, pstate, config, load_optim=False, load_rng=False))
    queue.put((rank, times))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no-load", action="store_true", help="skip the checkpoint-load timing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.checkpoint_dir = os.path.join(tmp, "ckpt")
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_rank, args=(args.tp, _free_port(), args, queue), nprocs=args.tp,
                           start_method="spawn")
        results = [queue.get() for _ in range(args.tp)]
    cfg = llama_1b(args.layers)
    print(f"Llama {args.layers} layers, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, "
          f"vocab {cfg.vocab_size} (~{matmul_params(cfg) / 1e9:.2f}B matmul parameters), "
          f"{args.dtype}, tp={args.tp}, {os.cpu_count()} CPUs")
    names = list(results[0][1])
    slowest = {n: max(times[n] for _, times in results) for n in names}
    for name in names:
        print(f"  {name:<24} {slowest[name]:7.2f} s  ({slowest[name] / slowest[names[0]]:.2f}x)")


if __name__ == "__main__":
    main()
