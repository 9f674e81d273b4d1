#!/usr/bin/env python3
"""Optimizer memory per data-parallel rank, with and without the distributed optimizer.

A small bf16 model (a stack of tagged linear layers) is trained for one step on d = 1, 2, 4 forked
gloo ranks (tests/distributed.py). On rank 0 the bytes held by the actual tensors are summed:

- model parameters (bf16): 2 bytes per parameter;
- gradient buffer (fp32, every rank holds all of it: the reduce-scatter leaves only 1/d valid, but
  the buffer accumulates the whole local gradient): 4 bytes;
- fp32 main parameters (copies of the bf16 parameters): 4 bytes, divided by d when sharded;
- Adam exp_avg and exp_avg_sq (fp32): 8 bytes, divided by d when sharded.

So 2 + 4 + 12/d bytes per parameter with the distributed optimizer against 18 without it
(padding of the buckets to a multiple of d adds a few elements). Printed next to the formula.

Usage: python bench/memory.py [--layers 4] [--hidden 256] [--sizes 1,2,4]
       python bench/memory.py --layouts

``--layouts``: the peak per rank predicted by the dry run (``slimtron.dry_run``, the real model on
the meta device) and by the closed form (``slimtron.memory.plan_stage``, what model_summary and
plan_layout use) next to the peak measured in one real bf16 step of tests/test_memory.py's seven
layouts on 4 gloo ranks (weights, grads and optimizer state from the tensors, activations from
saved-tensor accounting).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron.config import OptimizerConfig, ParallelConfig  # noqa: E402
from slimtron.optim import build_optimizer  # noqa: E402
from slimtron.parallel.data_parallel import DataParallelGrads  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402


class TaggedStack(torch.nn.Module):
    """Linear layers (weight + bias) with the parameter attributes of docs/CONVENTIONS.md."""

    def __init__(self, layers: int, hidden: int, dtype=torch.bfloat16):
        super().__init__()
        self.linears = torch.nn.ModuleList(
            torch.nn.Linear(hidden, hidden, dtype=dtype) for _ in range(layers))
        for name, param in self.named_parameters():
            param.tensor_model_parallel = False
            param.partition_dim = -1
            param.sequence_parallel = False
            param.shared_embedding = False
            param.global_name = name
            param.full_shape = tuple(param.shape)

    def forward(self, x):
        for linear in self.linears:
            x = torch.tanh(linear(x))
        return x


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def measure(model, grads, opt) -> dict:
    """Bytes held by each kind of tensor on this rank."""
    buffers = grads.buffers
    params = (sum(nbytes(b.param_data) for b in buffers) if grads.use_distributed_optimizer
              else sum(nbytes(p) for p in model.parameters()))
    state = [opt.adam.state[s.main_param] for s in opt.shards] if opt.adam is not None else []
    return {
        "params": params,
        "grads": sum(nbytes(b.grad_data) for b in buffers),
        "main": sum(nbytes(s.main_param) for s in opt.shards if s.copy_back),
        "adam": sum(nbytes(st["exp_avg"]) + nbytes(st["exp_avg_sq"]) for st in state),
    }


def bench_rank(rank, world, layers, hidden):
    pstate = ParallelState.build()
    out = {}
    for dist_opt in (False, True):
        torch.manual_seed(0)
        model = TaggedStack(layers, hidden)
        grads = DataParallelGrads([model], pstate, use_distributed_optimizer=dist_opt)
        opt = build_optimizer([model], OptimizerConfig(bf16=True, lr_decay_style="constant"),
                              ParallelConfig(use_distributed_optimizer=dist_opt), pstate, grads)
        opt.zero_grad()
        model(torch.randn(4, hidden, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        grads.finish_grad_sync()
        assert opt.step()[0]
        out[dist_opt] = measure(model, grads, opt)
    out["num_params"] = sum(p.numel() for p in model.parameters())
    return out


def layouts_table() -> None:
    from slimtron import memory
    from slimtron.arguments import validate
    from slimtron.dry_run import dry_run
    from tests.test_memory import LAYOUTS, WORLD, _measure_layouts, layout_config

    measured = run_distributed(_measure_layouts, WORLD)
    mib = 2.0 ** 20
    print(f"{'layout (4 ranks, bf16, mbs 2, seq 128)':<36} {'rank':>4} {'measured':>9} "
          f"{'dry run':>8} {'closed':>8}   MiB, peak of the step (state + saved activations)")
    for name in LAYOUTS:
        config = validate(layout_config(name), WORLD, check_files=False)
        for rank in range(WORLD):
            (built,) = dry_run(layout_config(name), WORLD, rank)
            stage = memory.plan_stage(config, built.stage, memory.num_microbatches(config))
            real = sum(measured[rank][name])
            predicted = [m.peak - m.activations + m.saved_activations for m in (built, stage)]
            print(f"{name:<36} {rank:>4} {real / mib:9.3f} {predicted[0] / mib:8.3f} "
                  f"{predicted[1] / mib:8.3f}   ({predicted[0] / real - 1:+.2%}, "
                  f"{predicted[1] / real - 1:+.2%})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--layouts", action="store_true",
                        help="dry run and closed form against real steps, per rank")
    args = parser.parse_args()
    if args.layouts:
        layouts_table()
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"bf16 model: {args.layers} x Linear({args.hidden}, {args.hidden}); bytes per parameter "
          "on DP rank 0, from the tensors")
    print(f"{'d':>2} {'dist-opt':>8} | {'params':>6} {'grads':>6} {'main':>6} {'adam':>6} | "
          f"{'total':>7} {'formula':>8}")
    for d in sizes:
        result = run_distributed(bench_rank, d, args.layers, args.hidden)[0]
        n = result["num_params"]
        for dist_opt in (False, True):
            m = {k: v / n for k, v in result[dist_opt].items()}
            formula = 6 + 12 / d if dist_opt else 18
            print(f"{d:>2} {'yes' if dist_opt else 'no':>8} | {m['params']:6.3f} {m['grads']:6.3f} "
                  f"{m['main']:6.3f} {m['adam']:6.3f} | {sum(m.values()):7.3f} {formula:8.3f}")


if __name__ == "__main__":
    main()
