"""The dry run: rank r of an N-rank job at its real size, on the meta device, in seconds.

    python pretrain_gpt.py --preset llama2-70b --tensor-model-parallel-size 8 \\
        --pipeline-model-parallel-size 4 --sequence-parallel --use-distributed-optimizer --bf16 \\
        --micro-batch-size 1 --global-batch-size 1024 --dry-run --dry-run-world-size 512 [--json]

For each rank asked for (``--dry-run-rank``, or the first rank of every pipeline stage) it joins
torch's fake process group (every collective returns at once) as that rank, builds what training
would build there on the meta device (process groups, model chunks, gradient buffers, distributed
optimizer ranges) and the stage's pipeline schedule, then runs one micro-batch forward and backward
through every model chunk, counting what autograd saves (``slimtron.memory.SavedActivations``).
The peak is weights + grads + optimizer state + the most activation bytes the schedule keeps live
(each forward of a chunk adds what it saved; a backward under full recomputation briefly adds one
recomputed group). Attention is counted as the kernel ``--attention-backend`` runs on a GPU: flash
(SDPA flash / flash-attn) for ``auto``, ``flash`` and ``fused``; the unfused kernel's s x s
probabilities for ``unfused`` and ``local``.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from slimtron import memory
from slimtron.arguments import validate
from slimtron.config import Config, ConfigError
from slimtron.training.setup import (Engine, build_parallel_state, build_tokenizer_for,
                                     build_training_parts)

ATTENTION_KERNELS = {
    "flash": "flash (SDPA flash / flash-attn: q, k, v, output and logsumexp; no s x s scores)",
    "unfused": "unfused (bmm + softmax over query blocks: q, k, v and about s x s / 2 "
               "probabilities per head)",
}
META = torch.device("meta")


def add_dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dry run")
    group.add_argument("--dry-run", action="store_true",
                       help="build one rank of the job on the meta device and report its memory "
                            "per pipeline stage; trains nothing")
    group.add_argument("--dry-run-world-size", type=int, default=None,
                       help="number of ranks of the job the dry run plans for")
    group.add_argument("--dry-run-rank", type=int, default=None,
                       help="the rank to build (default: the first rank of every pipeline stage)")
    group.add_argument("--json", action="store_true",
                       help="with --dry-run: print one JSON object {\"stages\": [...]}")


def split_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the dry-run flags, every other flag) of a pretrain_gpt.py command line."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_dry_run_arguments(parser)
    return parser.parse_known_args(list(argv))


def ranks_to_report(config: Config, world_size: int, rank: Optional[int]) -> list[int]:
    if rank is not None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"--dry-run-rank {rank} is outside 0..{world_size - 1} "
                              f"(--dry-run-world-size {world_size})")
        return [rank]
    per_stage = world_size // config.parallel.pp  # pipeline parallelism is the outermost axis
    return [stage * per_stage for stage in range(config.parallel.pp)]


def dry_run(config: Config, world_size: int, rank: Optional[int] = None) -> list:
    """``StageMemory`` of the first rank of every pipeline stage (or of ``rank`` only)."""
    if world_size is None or world_size < 1:
        raise ConfigError("--dry-run needs --dry-run-world-size N (N >= 1)")
    if dist.is_initialized():
        raise ConfigError("--dry-run runs in one process, outside torchrun")
    build_tokenizer_for(config)  # its vocabulary sizes the model, as in training
    validate(config, world_size, check_files=False)
    return [_with_fake_group(config, world_size, r)
            for r in ranks_to_report(config, world_size, rank)]


def _with_fake_group(config: Config, world_size: int, rank: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        return rank_memory(build_rank(config), config)
    finally:
        dist.destroy_process_group()


def build_rank(config: Config, device: torch.device = META) -> Engine:
    """What training builds on this rank (no data, no checkpoint), on ``device``: the same
    ``build_training_parts`` as setup(), planned at the full global batch (after any ramp-up)."""
    engine = build_training_parts(config, build_parallel_state(config, device), device)
    full = memory.num_microbatches(config)
    if full != engine.num_microbatches:
        engine.num_microbatches = full
        engine.grads.set_microbatches_per_step(full)
    return engine


def meta_microbatch(config: Config, device=META) -> dict:
    """One micro-batch as a rank computes on it: its 1/cp of each sequence (context parallelism)."""
    b, s = config.training.micro_batch_size, config.model.seq_length // config.parallel.cp
    batch = {"tokens": torch.zeros(b, s, dtype=torch.long, device=device),
             "labels": torch.zeros(b, s, dtype=torch.long, device=device),
             "loss_mask": torch.ones(b, s, dtype=torch.float32, device=device),
             "position_ids": torch.zeros(b, s, dtype=torch.long, device=device)}
    if config.data.reset_attention_mask:  # attention within documents: the mask is memory too
        batch["segment_ids"] = torch.zeros(b, s, dtype=torch.long, device=device)
    return batch


def chunk_activations(engine: Engine, chunk_index: int, batch: dict) -> tuple[int, float]:
    """(bytes one micro-batch leaves saved on a chunk, the most extra during its backward).

    torch.utils.checkpoint keeps what a backward recomputes outside the saved-tensor hooks, so
    that working set (one checkpointed group of layers) comes from the closed form, whose layer
    bytes tests/test_memory.py checks against measured layers."""
    from slimtron.training.loop import activation_shape, make_forward_step

    model = engine.model_chunks[chunk_index]
    device = next(model.parameters()).device
    hidden = None
    if not model.pre_process:
        hidden = torch.zeros(activation_shape(engine.config, engine.pstate),
                             dtype=engine.params_dtype, device=device, requires_grad=True)
    forward_step = make_forward_step(engine, 1.0)
    params = [p for chunk in engine.model_chunks for p in chunk.parameters()]
    with memory.SavedActivations(exclude=params) as saved:
        out = forward_step(chunk_index, batch, hidden)
        kept = saved.live
        out.backward(torch.ones_like(out))
    spec = memory.activation_spec(engine.config)
    working_set = memory.chunk_layer_bytes(engine.config.model, spec,
                                           len(model.decoder.layers))[1]
    return kept, working_set


def rank_memory(engine: Engine, config: Config) -> memory.StageMemory:
    pstate = engine.pstate
    weights, grads, optimizer = memory.measured_state_bytes(engine.model_chunks, engine.grads,
                                                            engine.optimizer)
    batch = meta_microbatch(config, next(engine.model_chunks[0].parameters()).device)
    measured = [chunk_activations(engine, c, batch) for c in range(len(engine.model_chunks))]
    kept, extra = [k for k, _ in measured], [e for _, e in measured]
    peak, in_flight = memory.schedule_activation_peak(
        pstate.pp.size, pstate.pp.rank, engine.num_microbatches, len(engine.model_chunks),
        kept, extra)
    saved, _ = memory.schedule_activation_peak(
        pstate.pp.size, pstate.pp.rank, engine.num_microbatches, len(engine.model_chunks),
        kept, [0.0] * len(kept))
    for chunk in engine.model_chunks:  # the dry run's backward must not look like a real step's
        chunk.zero_grad(set_to_none=True)
    parameters = sum(p.numel() for chunk in engine.model_chunks for p in chunk.parameters())
    return memory.StageMemory(pstate.pp.rank, pstate.rank, parameters, weights, grads, optimizer,
                              peak, in_flight, saved)


def report(config: Config, world_size: int, stages: list, as_json: bool = False) -> str:
    kernel = memory.activation_spec(config).attention
    if as_json:
        return json.dumps({"world_size": world_size, "attention_kernel": kernel,
                           "stages": [s.as_json() for s in stages]})
    gib = 2.0 ** 30
    p, t = config.parallel, config.training
    lines = [f"dry run: rank(s) {', '.join(str(s.rank) for s in stages)} of {world_size} "
             f"(tp {p.tp} x cp {p.cp} x pp {p.pp} x dp {p.data_parallel_size}"
             + (f", {p.virtual_pipeline_size(config.model.num_layers)} virtual stages"
                if p.num_layers_per_virtual_pipeline_stage else "")
             + f"), {config.optim.params_dtype_name}, micro-batch {t.micro_batch_size} x seq "
             f"{config.model.seq_length}, "
             f"{t.global_batch_size // (t.micro_batch_size * p.data_parallel_size)} micro-batches",
             f"attention counted as: {ATTENTION_KERNELS[kernel]}",
             f"{'stage':>5} {'rank':>6} {'params':>14} {'weights':>8} {'grads':>8} {'optim':>8} "
             f"{'activ.':>8} {'in flight':>9} {'peak GiB':>9}"]
    for s in stages:
        lines.append(f"{s.stage:>5} {s.rank:>6} {s.parameters:>14,} {s.weights / gib:8.2f} "
                     f"{s.grads / gib:8.2f} {s.optimizer / gib:8.2f} {s.activations / gib:8.2f} "
                     f"{s.in_flight:>9} {s.peak / gib:9.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> str:
    """pretrain_gpt.py's --dry-run: plan and print; nothing is trained."""
    from slimtron.arguments import parse_args

    ns, rest = split_arguments(argv)
    config = parse_args(rest)
    stages = dry_run(config, ns.dry_run_world_size, ns.dry_run_rank)
    text = report(config, ns.dry_run_world_size, stages, ns.json)
    print(text, flush=True)
    return text
