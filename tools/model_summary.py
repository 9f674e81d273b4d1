#!/usr/bin/env python
"""Parameter count and per-GPU memory estimate of a model in a parallel layout, without any GPU.

    python tools/model_summary.py --preset llama2-7b --tensor-model-parallel-size 2 \\
        --data-parallel-size 16 --micro-batch-size 1 --seq-length 4096 --bf16 \\
        --use-distributed-optimizer --sequence-parallel --recompute-granularity selective

The model is built on the meta device (shapes only, no memory) once per (pipeline, tensor) rank of
the layout, with ``ParallelState.for_planning``; data-parallel ranks hold the same parameters.

Memory of a rank, in bytes:
* weights, gradients, optimizer state per parameter: 16-bit training keeps 16-bit weights, fp32
  gradients and fp32 main weights + Adam moments (2 + 4 + 12 = 18, or 2 + 4 + 12/d with the
  distributed optimizer over d data-parallel ranks); fp32 training keeps 4 + 4 + 8 (8/d).
* activations per transformer layer and micro-batch (Korthikanti et al. 2022, 16-bit, for
  multi-head attention and a 4h MLP): s*b*h*(34 + 5*a*s/h); with tensor parallelism t and sequence
  parallelism all of it is divided by t, with t but no SP only 24 + 5as/h is (10 stays);
  selective recompute drops the 5as/h term (the attention scores); full recompute keeps the layer
  inputs (2sbh) plus one layer's working set. fp32 training doubles the figure.
  Times the layers on the stage and the micro-batches 1F1B keeps in flight there: p - stage (p on
  the first stage), capped by the micro-batches per step when --global-batch-size is given;
  interleaving with v chunks scales the first stage by 1 + (p-1)/(p*v) (same paper).
* the last stage also holds one micro-batch's fp32 logits for the loss: 4*s*b*V/t.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from slimtron.arguments import build_parser, config_from_namespace, validate  # noqa: E402
from slimtron.config import Config  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402

GIB = 2 ** 30
GPU_MEMORY_BYTES = 80 * GIB  # an "80 GB" A100/H100 exposes 80 GiB


@dataclass
class RankMemory:
    """One rank's parameters and estimated memory, in bytes."""
    rank: int
    pp_rank: int
    tp_rank: int
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def state_bytes_per_parameter(config: Config) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter of one rank."""
    low_precision = config.optim.fp16 or config.optim.bf16
    weight, grad, optimizer = (2.0, 4.0, 12.0) if low_precision else (4.0, 4.0, 8.0)
    if config.parallel.use_distributed_optimizer:
        optimizer /= config.parallel.data_parallel_size
    return weight, grad, optimizer


def layer_activation_bytes(config: Config) -> float:
    """Activation bytes of one transformer layer for one micro-batch (Korthikanti et al.)."""
    model, parallel, training = config.model, config.parallel, config.training
    s, b, h = model.seq_length, training.micro_batch_size, model.hidden_size
    t, a = parallel.tp, model.num_attention_heads
    scores = 5.0 * a * s / h
    if training.recompute_granularity == "selective":
        scores = 0.0
    if parallel.sequence_parallel:
        per_sbh = (34.0 + scores) / t
    else:
        per_sbh = 10.0 + (24.0 + scores) / t
    precision_scale = 1.0 if (config.optim.fp16 or config.optim.bf16) else 2.0
    return s * b * h * per_sbh * precision_scale


def in_flight_microbatches(config: Config, pp_rank: int, num_microbatches) -> float:
    """Micro-batches whose activations a stage holds at the peak of 1F1B."""
    p = config.parallel.pp
    in_flight = p - pp_rank if num_microbatches is None else min(p - pp_rank, num_microbatches)
    v = config.parallel.virtual_pipeline_size(config.model.num_layers)
    if v > 1 and pp_rank == 0:
        return in_flight * (1.0 + (p - 1) / (p * v))
    return float(in_flight)


def stage_activation_bytes(config: Config, pp_rank: int, num_microbatches) -> float:
    """Activations of every layer on the stage for the micro-batches it keeps in flight."""
    layers = config.model.num_layers // config.parallel.pp
    per_layer = layer_activation_bytes(config)
    if config.training.recompute_granularity == "full":
        s, b, h = config.model.seq_length, config.training.micro_batch_size, config.model.hidden_size
        inputs = 2.0 * s * b * h / (config.parallel.tp if config.parallel.sequence_parallel else 1)
        stored = layers * inputs * in_flight_microbatches(config, pp_rank, num_microbatches)
        return stored + per_layer  # one layer's activations are rebuilt at a time
    return layers * per_layer * in_flight_microbatches(config, pp_rank, num_microbatches)


def logits_bytes(config: Config, pp_rank: int) -> float:
    if pp_rank != config.parallel.pp - 1:
        return 0.0
    t = config.parallel.tp
    s, b = config.model.seq_length, config.training.micro_batch_size
    return 4.0 * s * b * config.model.padded_vocab_size(t) / t


def planning_ranks(config: Config) -> list[int]:
    """One global rank per (pipeline stage, tensor rank), all at data-parallel rank 0."""
    tp, dp = config.parallel.tp, config.parallel.data_parallel_size
    return [p * dp * tp + t for p in range(config.parallel.pp) for t in range(tp)]


def rank_parameters(config: Config, rank: int):
    """(planning state, {global name: (numel on this rank, numel of the full tensor)})."""
    from slimtron.model import build_model_chunks  # the model is only needed here

    parallel = config.parallel
    pstate = ParallelState.for_planning(parallel.tp, parallel.pp, parallel.data_parallel_size, rank)
    chunks = build_model_chunks(config.model, pstate,
                                parallel.virtual_pipeline_size(config.model.num_layers),
                                sequence_parallel=parallel.sequence_parallel)
    sizes = {}
    for chunk in chunks:
        for param in chunk.parameters():
            sizes[param.global_name] = (param.numel(), math.prod(param.full_shape))
    return pstate, sizes


def summarize(config: Config, num_microbatches=None) -> tuple[int, list[RankMemory]]:
    """(total parameters of the model, per-rank memory of one rank per stage and tensor rank)."""
    weight, grad, optimizer = state_bytes_per_parameter(config)
    full_sizes, ranks = {}, []
    for rank in planning_ranks(config):
        pstate, sizes = rank_parameters(config, rank)
        full_sizes.update({name: full for name, (_, full) in sizes.items()})
        count = sum(local for local, _ in sizes.values())
        activations = (stage_activation_bytes(config, pstate.pp_rank, num_microbatches)
                       + logits_bytes(config, pstate.pp_rank))
        ranks.append(RankMemory(rank, pstate.pp_rank, pstate.tp_rank, count, count * weight,
                                count * grad, count * optimizer, activations))
    return sum(full_sizes.values()), ranks


def build_summary_parser() -> argparse.ArgumentParser:
    parser = build_parser(prog="model_summary.py")
    parser.description = "Parameter count and per-GPU memory estimate of a parallel layout."
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-gib", type=float, default=GPU_MEMORY_BYTES / GIB,
                        help="device memory to compare with (default 80: an 80 GB A100/H100)")
    return parser


def describe_layout(config: Config) -> str:
    parallel, training = config.parallel, config.training
    parts = [f"tp {parallel.tp} x pp {parallel.pp} x dp {parallel.data_parallel_size}",
             config.optim.params_dtype_name,
             f"micro-batch {training.micro_batch_size} x seq {config.model.seq_length}"]
    v = parallel.virtual_pipeline_size(config.model.num_layers)
    parts += [f"{v} virtual stages"] if v > 1 else []
    parts += ["distributed optimizer"] if parallel.use_distributed_optimizer else []
    parts += ["sequence parallel"] if parallel.sequence_parallel else []
    granularity = training.recompute_granularity
    parts += [f"recompute {granularity}"] if granularity else []
    return ", ".join(parts)


def report(config: Config, total: int, ranks: list[RankMemory], gpu_bytes: float) -> str:
    top = max(ranks, key=lambda r: r.total)
    lines = [f"layout: {describe_layout(config)}",
             f"total parameters: {total:,}{_padding_note(config)}",
             f"most loaded rank: {top.rank} (pipeline stage {top.pp_rank}, tensor rank "
             f"{top.tp_rank}): {top.parameters:,} parameters"]
    for label, value in [("weights", top.weights), ("gradients", top.gradients),
                         ("optimizer state", top.optimizer), ("activations", top.activations),
                         ("total", top.total)]:
        lines.append(f"  {label:<16}{value / GIB:9.2f} GiB")
    margin = (gpu_bytes - top.total) / GIB
    verdict = (f"yes, {margin:.2f} GiB to spare for the allocator, CUDA context and temporaries"
               if margin >= 0 else f"no, {-margin:.2f} GiB short")
    lines.append(f"fits in {gpu_bytes / GIB:g} GiB of GPU memory: {verdict}")
    if config.parallel.pp > 1:
        lines.append("per pipeline stage (tensor rank 0): parameters, estimated GiB")
        for r in ranks:
            if r.tp_rank == 0:
                lines.append(f"  stage {r.pp_rank}: {r.parameters:,}  {r.total / GIB:.2f}")
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
    total, ranks = summarize(config, num_microbatches)
    text = report(config, total, ranks, ns.gpu_memory_gib * GIB)
    print(text)
    return text


if __name__ == "__main__":
    main()
