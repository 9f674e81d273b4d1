#!/usr/bin/env python
"""Parameter count and per-GPU memory estimate of a model in a parallel layout, without any GPU.

    python tools/model_summary.py --preset llama2-7b --tensor-model-parallel-size 2 \\
        --data-parallel-size 16 --micro-batch-size 1 --seq-length 4096 --bf16 \\
        --use-distributed-optimizer --sequence-parallel --recompute-granularity selective

Every figure comes from ``slimtron.memory`` (the one memory model, also behind the dry run and
tools/plan_layout.py, and checked against real runs by tests/test_memory.py): per pipeline stage
the parameters of its chunks, their weights, fp32 gradients and optimizer state, and the most
activation bytes its pipeline schedule keeps live (the closed form of what autograd saves per
layer of this model, times the micro-batches in flight, plus the embedding, the loss's fp32
softmax on the last stage and, under full recomputation, one recomputed group). Without
--global-batch-size the step is taken long enough to fill the pipeline (2 x pp micro-batches).
For the figures of the real model built rank by rank, use ``pretrain_gpt.py ... --dry-run``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from slimtron import memory  # noqa: E402
from slimtron.arguments import build_parser, config_from_namespace, validate  # noqa: E402
from slimtron.config import Config  # noqa: E402

GIB = 2 ** 30
GPU_MEMORY_BYTES = 80 * GIB  # an "80 GB" A100/H100 exposes 80 GiB


def summarize(config: Config, num_microbatches: Optional[int] = None) -> tuple[int, list]:
    """(total parameters of the model, ``memory.StageMemory`` of a rank of every stage)."""
    if num_microbatches is None:
        num_microbatches = 2 * config.parallel.pp
    stages = [memory.plan_stage(config, stage, num_microbatches)
              for stage in range(config.parallel.pp)]
    return memory.model_parameters(config.model, config.parallel.tp), stages


def build_summary_parser() -> argparse.ArgumentParser:
    parser = build_parser(prog="model_summary.py")
    parser.description = "Parameter count and per-GPU memory estimate of a parallel layout."
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-gib", type=float, default=GPU_MEMORY_BYTES / GIB,
                        help="device memory to compare with (default 80: an 80 GB A100/H100)")
    return parser


def describe_layout(config: Config) -> str:
    parallel, training = config.parallel, config.training
    parts = [f"tp {parallel.tp} x cp {parallel.cp} x pp {parallel.pp} x dp "
             f"{parallel.data_parallel_size}",
             config.optim.params_dtype_name,
             f"micro-batch {training.micro_batch_size} x seq {config.model.seq_length}"]
    v = parallel.virtual_pipeline_size(config.model.num_layers)
    parts += [f"{v} virtual stages"] if v > 1 else []
    parts += ["distributed optimizer"] if parallel.use_distributed_optimizer else []
    parts += ["sequence parallel"] if parallel.sequence_parallel else []
    granularity = training.recompute_granularity
    parts += [f"recompute {granularity}"] if granularity else []
    return ", ".join(parts)


def report(config: Config, total: int, stages: list, gpu_bytes: float) -> str:
    top = max(stages, key=lambda r: r.peak)
    lines = [f"layout: {describe_layout(config)}",
             f"total parameters: {total:,}{_padding_note(config)}",
             f"most loaded stage: {top.stage} ({top.in_flight} micro-batches in flight): "
             f"{top.parameters:,} parameters per rank"]
    for label, value in [("weights", top.weights), ("gradients", top.grads),
                         ("optimizer state", top.optimizer), ("activations", top.activations),
                         ("total", top.peak)]:
        lines.append(f"  {label:<16}{value / GIB:9.2f} GiB")
    margin = (gpu_bytes - top.peak) / GIB
    verdict = (f"yes, {margin:.2f} GiB to spare for the allocator, CUDA context and temporaries"
               if margin >= 0 else f"no, {-margin:.2f} GiB short")
    lines.append(f"fits in {gpu_bytes / GIB:g} GiB of GPU memory: {verdict}")
    if config.parallel.pp > 1:
        lines.append("per pipeline stage: parameters per rank, estimated GiB")
        for r in stages:
            lines.append(f"  stage {r.stage}: {r.parameters:,}  {r.peak / GIB:.2f}")
    return "\n".join(lines)


def _padding_note(config: Config) -> str:
    model = config.model
    padded = model.padded_vocab_size(config.parallel.tp)
    if padded == model.vocab_size:
        return ""
    return f" (vocabulary {model.vocab_size:,} padded to {padded:,})"


def main(argv=None) -> str:
    ns = build_summary_parser().parse_args(argv)
    config = config_from_namespace(ns)
    parallel = config.parallel
    world = parallel.tp * parallel.pp * ns.data_parallel_size
    explicit_global_batch = config.training.global_batch_size is not None
    validate(config, world, check_files=False)
    num_microbatches = None
    if explicit_global_batch:
        num_microbatches = config.training.global_batch_size // (
            config.training.micro_batch_size * parallel.data_parallel_size)
    total, stages = summarize(config, num_microbatches)
    text = report(config, total, stages, ns.gpu_memory_gib * GIB)
    print(text)
    return text


if __name__ == "__main__":
    main()
