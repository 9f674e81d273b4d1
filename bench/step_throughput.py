#!/usr/bin/env python3
"""Whole training-step throughput: slimtron against Hugging Face's LlamaForCausalLM.

One process, one device. For each precision (bf16, fp32) the same Llama (default the
``llama-100m`` preset, 134M parameters, at --seq-length) is built in slimtron and in transformers;
the HF model gets slimtron's initial weights through slimtron.hf_mapping (the initial losses are
printed as a check). Each side trains the way its users train:

- slimtron: its real path: bf16 (or fp32) parameters, fp32 gradient buffer
  (``DataParallelGrads``), the distributed optimizer at dp=1 (fp32 main parameters, clipping to
  1.0, AdamW), the model's own vocab-parallel cross entropy;
- HF: fp32 weights under ``torch.autocast(bf16)`` for bf16 (plain fp32 for fp32), fp32 cross
  entropy, ``clip_grad_norm_(1.0)`` and torch AdamW, as the HF Trainer does.

Steps of the two alternate so that load from other processes hits both alike; after --warmup
untimed steps each, the best and the median of --steps timed steps give tokens/s (the best step,
like the best matmul window of the measured peak, is the one least disturbed by other processes
on shared cores). Achieved FLOP/s (slimtron.flops: 6N + 12*L*s*heads*head_dim per token) is given
as a fraction of this machine's matmul peak for the dtype (vendor table on a known GPU, else
measured).

Usage: python bench/step_throughput.py [--preset llama-100m] [--micro-batch-size 4]
                                       [--seq-length 512] [--warmup 2] [--steps 5]
                                       [--compile-layers] [--side-by-side] [--breakdown]
                                       [--threads N]

--breakdown profiles one more step of each side and splits its median step into matmuls,
attention kernels and the rest; the ceiling it prints is the ratio slimtron would reach if its rest
took no time (its matmuls and attention being what they are).

--compile-layers builds slimtron's model as training's --compile-layers does; --side-by-side also
times slimtron with the other setting (same weights), in turn with the two others, so that the
compiled/eager comparison sees the same load.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import contextlib

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron import flops, hf_mapping  # noqa: E402
from slimtron.config import ModelConfig, OptimizerConfig, ParallelConfig, model_preset  # noqa: E402
from slimtron.model import GPTModel  # noqa: E402
from slimtron.optim import build_optimizer  # noqa: E402
from slimtron.parallel.data_parallel import DataParallelGrads  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_slimtron(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                   compile_layers: bool = False) -> GPTModel:
    # compile_layers: training's --compile-layers (each layer compiles in the warm-up)
    return GPTModel(cfg, ParallelState.single(device), params_dtype=dtype, device=device,
                    compile_layers=compile_layers)


@torch.no_grad()
def build_hf_copy(cfg: ModelConfig, ours: GPTModel, device: torch.device):
    """LlamaForCausalLM of the same config holding ``ours``' weights, in fp32 (HF users train
    fp32 weights, under autocast for bf16)."""
    from transformers import LlamaForCausalLM

    dtype = torch.float32
    hf = LlamaForCausalLM(hf_mapping.hf_config(cfg, dtype)).to(device=device, dtype=dtype)
    hf.config._attn_implementation = "sdpa"
    params = dict(ours.named_parameters())
    state = {}
    for rule in hf_mapping.mapping(cfg):
        full = hf_mapping.drop_vocab_padding(rule.ours, params[rule.ours].detach().float(), cfg)
        state.update(hf_mapping.to_hf(rule, full, cfg))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF weight copy: missing {missing}, unexpected {unexpected}")
    return hf


LR, WEIGHT_DECAY, CLIP = 1e-5, 0.1, 1.0


def slimtron_loss(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(tokens, labels=labels).mean()


def hf_loss(model, tokens: torch.Tensor, labels: torch.Tensor, autocast_dtype=None) -> torch.Tensor:
    # The same fp32 cross entropy over every position as slimtron's (HF's own would shift labels).
    context = (torch.autocast(tokens.device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else contextlib.nullcontext())
    with context:
        logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def timed(device: torch.device, body: Callable[[], None]) -> Callable[[], float]:
    def step() -> float:
        _synchronize(device)
        start = time.perf_counter()
        body()
        _synchronize(device)
        return time.perf_counter() - start
    return step


def make_slimtron_step(model: GPTModel, dtype_name: str, tokens, labels) -> Callable[[], float]:
    """slimtron's real step: fp32 grad buffer, distributed optimizer at dp=1, clip, AdamW."""
    pstate = ParallelState.single(tokens.device)
    grads = DataParallelGrads([model], pstate, use_distributed_optimizer=True)
    config = OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP,
                             lr_decay_style="constant", bf16=dtype_name == "bf16")
    optimizer = build_optimizer([model], config, ParallelConfig(use_distributed_optimizer=True),
                                pstate, grads, train_iters=1)

    def body() -> None:
        optimizer.zero_grad()
        slimtron_loss(model, tokens, labels).backward()
        grads.finish_grad_sync()
        optimizer.step()
    return timed(tokens.device, body)


def make_hf_step(model, dtype_name: str, tokens, labels) -> Callable[[], float]:
    """HF Trainer's step: autocast for bf16 over fp32 weights, clip_grad_norm_, torch AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    autocast = DTYPES[dtype_name] if dtype_name != "fp32" else None

    def body() -> None:
        optimizer.zero_grad(set_to_none=True)
        hf_loss(model, tokens, labels, autocast).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
    return timed(tokens.device, body)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(steps: dict[str, Callable[[], float]], warmup: int,
                     timed: int) -> dict[str, list[float]]:
    """Seconds of each timed step of each step function, run in turns."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(timed):
        for name, step in steps.items():
            times[name].append(step())
    return times


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")
ATTENTION_MARKS = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention")


UNFUSED_RANGES = ("unfused_attention", "unfused_attention_backward")


def unfused_attention_seconds(events, seconds) -> tuple[float, float]:
    """(all the time inside the unfused kernel's ranges, its matmuls' own time)."""
    total = matmuls = 0.0
    for event in events:
        if event.name not in UNFUSED_RANGES:
            continue
        stack = [event]
        while stack:  # the range and everything under it, each op's own time once
            op = stack.pop()
            total += seconds(op)
            matmuls += seconds(op) if op.name in MATMUL_OPS else 0.0
            stack.extend(op.cpu_children)
    return total, matmuls


def time_by_kind(step: Callable[[], float], device: torch.device) -> dict[str, float]:
    """Seconds of one step (profiled) spent in matmuls and in attention kernels: the ops' own
    time, on the device for CUDA, on the host thread for the CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    before = resource.getrusage(resource.RUSAGE_SELF)
    with profile(activities=activities) as prof:
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)

    def seconds(event) -> float:
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        return own / 1e6

    events = prof.key_averages()
    # slimtron's unfused kernel is a profiler range of bmm and softmax ops: all of it is
    # attention, and its bmm are taken out of the matmuls
    unfused = unfused_attention_seconds(prof.events(), seconds)
    return {"matmul": sum(seconds(e) for e in events if e.key in MATMUL_OPS) - unfused[1],
            "attention": unfused[0] + sum(seconds(e) for e in events
                                          if any(mark in e.key for mark in ATTENTION_MARKS)),
            # host memory touched for the first time (freshly mapped pages) and the kernel time
            # it costs: on the CPU a part of "rest" that depends on the machine's memory state
            "page_faults": after.ru_minflt - before.ru_minflt,
            "kernel_s": after.ru_stime - before.ru_stime}


def bench_dtype(cfg: ModelConfig, dtype_name: str, args, device: torch.device) -> dict:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_length), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    compile_layers = getattr(args, "compile_layers", False)
    ours = build_slimtron(cfg, dtype, device, compile_layers)
    theirs = build_hf_copy(cfg, ours, device)
    autocast = dtype if dtype_name != "fp32" else None
    with torch.no_grad():
        initial = (slimtron_loss(ours, tokens, labels).item(),
                   hf_loss(theirs, tokens, labels, autocast).item())
    steps = {"slimtron": make_slimtron_step(ours, dtype_name, tokens, labels),
             "hf": make_hf_step(theirs, dtype_name, tokens, labels)}
    if getattr(args, "side_by_side", False):  # the other setting of --compile-layers, same weights
        other = build_slimtron(cfg, dtype, device, not compile_layers)
        other.load_state_dict(ours.state_dict())
        steps["slimtron-eager" if compile_layers else "slimtron-compiled"] = make_slimtron_step(
            other, dtype_name, tokens, labels)
    seconds = time_alternating(steps, args.warmup, args.steps)
    tokens_per_step = tokens.numel()
    result = {"dtype": dtype_name, "initial_loss": initial,
              "best": {k: tokens_per_step / min(s) for k, s in seconds.items()},
              "median": {k: tokens_per_step / statistics.median(s) for k, s in seconds.items()},
              "peak": flops.device_peak(dtype, device)}
    if getattr(args, "breakdown", False):
        result["breakdown"] = {name: {**time_by_kind(steps[name], device),
                                      "step": statistics.median(seconds[name])}
                               for name in ("slimtron", "hf")}
    return result


def format_result(result: dict, flops_per_token: float) -> list[str]:
    """Best step (like the peak, the least disturbed by other load) and median step figures."""
    best, median, peak = result["best"], result["median"], result["peak"]
    ours, theirs = result["initial_loss"]
    lines = [f"{result['dtype']}: peak {peak}",
             f"  initial loss slimtron {ours:.4f}  HF {theirs:.4f}  (same weights: should match "
             "to the precision's rounding)"]
    for name in best:
        achieved = best[name] * flops_per_token
        lines.append(f"  {name:<17} best {best[name]:8.1f} tokens/s  "
                     f"{achieved / 1e9:7.1f} GFLOP/s  "
                     f"MFU {flops.mfu(best[name], flops_per_token, peak):6.1%}   "
                     f"median {median[name]:8.1f} tokens/s")
    for name in (n for n in best if n != "hf"):
        lines.append(f"  {name} / HF tokens/s: best {best[name] / best['hf']:.3f}, "
                     f"median {median[name] / median['hf']:.3f}")
    if "breakdown" in result:
        lines += format_breakdown(result["breakdown"])
    return lines


def format_breakdown(breakdown: dict) -> list[str]:
    """Each side's median step split into matmul, attention and the rest, and the ceiling: the
    slimtron/HF ratio if everything but slimtron's matmuls and attention took no time."""
    lines = ["  median step (s) = matmul + attention + rest (one profiled step each; rest includes "
             "the kernel's time, mostly page faults of freshly mapped memory):"]
    for name, part in breakdown.items():
        rest = part["step"] - part["matmul"] - part["attention"]
        lines.append(f"    {name:<9} {part['step']:6.3f} = {part['matmul']:6.3f} + "
                     f"{part['attention']:6.3f} + {rest:6.3f}   (kernel {part['kernel_s']:.2f} s, "
                     f"{part['page_faults'] * 4096 / 2**30:.2f} GiB of 4 KiB page faults)")
    ours = breakdown["slimtron"]
    ceiling = breakdown["hf"]["step"] / (ours["matmul"] + ours["attention"])
    lines.append(f"  ceiling with slimtron's rest at zero: {ceiling:.3f}x HF (median)")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-100m")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--compile-layers", action="store_true",
                        help="torch.compile each of slimtron's transformer layers (training's "
                             "--compile-layers; HF stays eager)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="also time slimtron with the other --compile-layers setting, in turn "
                             "with the two others")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile one step of each side: matmul, attention and the rest, "
                             "and the ceiling ratio if slimtron's rest took no time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's); 1 is steadier on busy cores")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_preset(args.preset)
    cfg.seq_length = cfg.max_position_embeddings = args.seq_length
    per_token = flops.flops_per_token(cfg)
    print(f"{args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, ffn "
          f"{cfg.ffn_hidden_size}, {cfg.num_attention_heads} heads, vocab {cfg.vocab_size}; "
          f"batch {args.micro_batch_size} x seq {cfg.seq_length}; device {device}, "
          f"{torch.get_num_threads()} threads; {per_token / 1e6:.1f} MFLOP per token (train); "
          f"{args.steps} timed steps after {args.warmup} warm-up; slimtron: distributed optimizer "
          f"(dp=1, fp32 main params); HF: autocast over fp32 weights, torch AdamW; both clip "
          f"to {CLIP}" + ("; slimtron's layers torch.compiled" if args.compile_layers else ""))
    for dtype_name in args.dtypes:
        print("\n".join(format_result(bench_dtype(cfg, dtype_name, args, device), per_token)),
              flush=True)


if __name__ == "__main__":
    main()
