#!/usr/bin/env python3
"""Training-step throughput of slimtron's model against Hugging Face's LlamaForCausalLM.

One process, one device. For each dtype (bf16, fp32): the same Llama (default the ``llama-100m``
preset, shortened to --seq-length) is built in slimtron and in transformers, the HF model gets
slimtron's initial weights through slimtron.hf_mapping (so both compute the same loss, printed as a
check), and each runs forward + backward + torch AdamW steps on the same random batch. Steps of
the two models alternate so that load from other processes hits both alike; after --warmup
untimed steps each, the best and the median of --steps timed steps give tokens/s (the best step,
like the best matmul window of the measured peak, is the one least disturbed by other processes
on shared cores). Achieved FLOP/s (slimtron.flops: 6N + 12*L*s*heads*head_dim per token) is given
as a fraction of this machine's matmul peak for the dtype (vendor table on a known GPU, else
measured).

Usage: python bench/step_throughput.py [--preset llama-100m] [--micro-batch-size 2]
                                       [--seq-length 256] [--warmup 2] [--steps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron import flops, hf_mapping  # noqa: E402
from slimtron.config import ModelConfig, model_preset  # noqa: E402
from slimtron.model import GPTModel  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_slimtron(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> GPTModel:
    return GPTModel(cfg, ParallelState.single(device), params_dtype=dtype, device=device)


@torch.no_grad()
def build_hf_copy(cfg: ModelConfig, ours: GPTModel, dtype: torch.dtype, device: torch.device):
    """LlamaForCausalLM of the same config holding ``ours``' weights."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_mapping.hf_config(cfg, dtype)).to(device=device, dtype=dtype)
    hf.config._attn_implementation = "sdpa"
    params = dict(ours.named_parameters())
    state = {}
    for rule in hf_mapping.mapping(cfg):
        full = hf_mapping.drop_vocab_padding(rule.ours, params[rule.ours].detach(), cfg)
        state.update(hf_mapping.to_hf(rule, full, cfg))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF weight copy: missing {missing}, unexpected {unexpected}")
    return hf


def slimtron_loss(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(tokens, labels=labels).mean()


def hf_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The same fp32 cross entropy over every position as slimtron's (HF's own would shift labels).
    logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def make_step(model, loss_fn: Callable, tokens, labels) -> Callable[[], float]:
    """One forward + backward + AdamW step; returns its wall time in seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, foreach=True)

    def step() -> float:
        _synchronize(tokens.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, tokens, labels).backward()
        optimizer.step()
        _synchronize(tokens.device)
        return time.perf_counter() - start

    return step


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


def bench_dtype(cfg: ModelConfig, dtype_name: str, args, device: torch.device) -> dict:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_length), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    ours = build_slimtron(cfg, dtype, device)
    theirs = build_hf_copy(cfg, ours, dtype, device)
    with torch.no_grad():
        initial = (slimtron_loss(ours, tokens, labels).item(), hf_loss(theirs, tokens, labels).item())
    seconds = time_alternating({"slimtron": make_step(ours, slimtron_loss, tokens, labels),
                                "hf": make_step(theirs, hf_loss, tokens, labels)},
                               args.warmup, args.steps)
    tokens_per_step = tokens.numel()
    return {"dtype": dtype_name, "initial_loss": initial,
            "best": {k: tokens_per_step / min(s) for k, s in seconds.items()},
            "median": {k: tokens_per_step / statistics.median(s) for k, s in seconds.items()},
            "peak": flops.device_peak(dtype, device)}


def format_result(result: dict, flops_per_token: float) -> list[str]:
    """Best step (like the peak, the least disturbed by other load) and median step figures."""
    best, median, peak = result["best"], result["median"], result["peak"]
    ours, theirs = result["initial_loss"]
    lines = [f"{result['dtype']}: peak {peak}",
             f"  initial loss slimtron {ours:.4f}  HF {theirs:.4f}  (same weights: should match)"]
    for name in ("slimtron", "hf"):
        achieved = best[name] * flops_per_token
        lines.append(f"  {name:<9} best {best[name]:8.1f} tokens/s  {achieved / 1e9:7.1f} GFLOP/s  "
                     f"MFU {flops.mfu(best[name], flops_per_token, peak):6.1%}   "
                     f"median {median[name]:8.1f} tokens/s")
    lines.append(f"  slimtron / HF tokens/s: best {best['slimtron'] / best['hf']:.3f}, "
                 f"median {median['slimtron'] / median['hf']:.3f}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-100m")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
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
          f"{args.steps} timed steps after {args.warmup} warm-up, AdamW (torch) on both")
    for dtype_name in args.dtypes:
        print("\n".join(format_result(bench_dtype(cfg, dtype_name, args, device), per_token)),
              flush=True)


if __name__ == "__main__":
    main()
