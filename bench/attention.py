#!/usr/bin/env python3
"""Causal attention, forward and backward: the unfused kernel against PyTorch's SDPA.

``--attention-backend auto`` runs slimtron's unfused kernel on CPU (bmm, masked softmax, bmm over
query blocks that skip the upper triangle; slimtron.model.unfused_attention) and flash elsewhere.
This measures that choice: for each sequence length, the same q, k, v through
``kernels.causal_attention`` with ``backend="flash"`` (SDPA here, flash-attn on a GPU where
installed) and ``backend="unfused"``, the median of --repeats forward+backward passes each, steps
alternating, and the probabilities the unfused kernel keeps for backward (the memory it trades).

Usage: python bench/attention.py [--heads 12] [--groups 12] [--head-dim 64] [--tokens 2048]
                                 [--seq-lengths 256 512 1024 2048] [--dtypes bf16 fp32]
                                 [--repeats 5] [--threads N] [--device cpu]
Each length runs tokens / length sequences, so every row does the same number of tokens.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron.model import kernels  # noqa: E402
from slimtron.model.unfused_attention import kept_probabilities  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backends(s: int, b: int, heads: int, groups: int, d: int, dtype: torch.dtype,
                  device: torch.device, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(s, b, groups, d, generator=g).to(device, dtype).requires_grad_()
            for _ in range(2))
    grad = torch.randn(s, b, heads * d, generator=g).to(device, dtype)
    times = {"flash": [], "unfused": []}
    for step in range(repeats + 1):  # the first pass of each is a warm-up
        for backend in times:
            _sync(device)
            start = time.perf_counter()
            kernels.causal_attention(q, k, v, backend=backend).backward(grad)
            _sync(device)
            if step:
                times[backend].append(time.perf_counter() - start)
            q.grad = k.grad = v.grad = None
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"causal attention fwd+bwd, {args.heads} heads ({args.groups} kv groups) x "
          f"{args.head_dim}, {args.tokens} tokens per row, device {device}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'dtype':>5} {'seq':>5} {'batch':>5} {'flash/SDPA ms':>13} {'unfused ms':>10} "
          f"{'unfused speed-up':>16} {'kept probs MiB':>14}")
    for name in args.dtypes:
        dtype = DTYPES[name]
        for s in args.seq_lengths:
            b = max(1, args.tokens // s)
            t = time_backends(s, b, args.heads, args.groups, args.head_dim, dtype, device,
                              args.repeats)
            kept = b * args.heads * kept_probabilities(s) * dtype.itemsize / 2 ** 20
            print(f"{name:>5} {s:5d} {b:5d} {t['flash'] * 1e3:13.1f} {t['unfused'] * 1e3:10.1f} "
                  f"{t['flash'] / t['unfused']:15.2f}x {kept:14.1f}", flush=True)


if __name__ == "__main__":
    main()
