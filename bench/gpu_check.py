#!/usr/bin/env python3
"""The one-GPU check (run by bench/gpu_check.sh): single-device parity on the GPU, then a ~1B
Llama's whole training step in bf16 against HF's LlamaForCausalLM, and its peak memory against
the memory model's prediction.

1. Parity, the device against the CPU (fp32, TF32 off; the CPU is the reference every other test
   uses): the model's loss and gradients; kernels (RMSNorm, SwiGLU, causal attention, forward and
   backward); three optimizer steps (grad buffer, distributed optimizer at dp=1, clipping, fused
   AdamW on the device); fp16 loss scaling skipping the same overflowing steps on both.
2. Throughput: ``bench/step_throughput.py``'s bf16 comparison (slimtron's real optimizer path vs
   HF with autocast and torch AdamW) on the ~1B model, MFU against the vendor peak of
   ``slimtron.flops``; on the GPU also slimtron with ``--compile-layers``; each side's step split
   into matmul, attention and the rest (``--breakdown``).
3. Memory: ``torch.cuda.max_memory_allocated`` over slimtron's steps next to
   ``slimtron.memory.plan_stage`` (weights + grads + optimizer + activations).

``--cpu`` runs the same code on the CPU with tiny sizes (both sides of a parity check are then the
CPU: it checks that the script runs); exit status 1 when a parity check fails.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_throughput  # noqa: E402
from slimtron import flops, memory  # noqa: E402
from slimtron.config import (Config, ModelConfig, OptimizerConfig, ParallelConfig,  # noqa: E402
                             TrainingConfig, model_preset)
from slimtron.model import GPTModel, kernels  # noqa: E402
from slimtron.optim import build_optimizer  # noqa: E402
from slimtron.parallel.data_parallel import DataParallelGrads  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402

CPU = torch.device("cpu")


def llama_1b() -> ModelConfig:
    """TinyLlama's shape: 1.1B parameters."""
    return ModelConfig(num_layers=22, hidden_size=2048, ffn_hidden_size=5632,
                       num_attention_heads=32, num_query_groups=4, seq_length=2048,
                       vocab_size=32000, normalization="RMSNorm", position_embedding_type="rope",
                       swiglu=True, add_bias_linear=False,
                       untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                       attention_dropout=0.0)


def small_llama() -> ModelConfig:
    cfg = model_preset("tiny-llama")
    cfg.seq_length = cfg.max_position_embeddings = 64
    return cfg


class Report:
    def __init__(self):
        self.failures = []

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failures.append(name)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _batch(cfg: ModelConfig, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=g)
    return tokens.to(device), torch.roll(tokens, -1, dims=1).to(device)


# ---- 1. parity ---------------------------------------------------------------------------------
def check_model(report: Report, device: torch.device) -> None:
    cfg = small_llama()
    results = []
    for where in (CPU, device):
        model = GPTModel(cfg, ParallelState.single(where), device=where)
        tokens, labels = _batch(cfg, 2, where)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (cpu_loss, cpu_grads), (dev_loss, dev_grads) = results
    worst = max(_relative(dev_grads[n], cpu_grads[n]) for n in cpu_grads)
    report.check("model loss", _relative(dev_loss, cpu_loss) < 1e-5,
                 f"{dev_loss.item():.6f} vs CPU {cpu_loss.item():.6f}")
    report.check("model grads", worst < 1e-4, f"worst relative difference {worst:.2e}")


def check_kernels(report: Report, device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 64, generator=g)
    w = torch.randn(64, generator=g)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    cases = {
        "rms_norm": (lambda x, w: kernels.rms_norm(x, w, 1e-5), (x, w)),
        "swiglu": (kernels.swiglu, (x,)),
        "causal_attention": (kernels.causal_attention, (q, k, v)),
        "unfused_attention": (lambda q, k, v: kernels.causal_attention(q, k, v, backend="unfused"),
                              (q, k, v)),
    }
    for name, (fn, inputs) in cases.items():
        outs = []
        for where in (CPU, device):
            args = [t.to(where).requires_grad_() for t in inputs]
            out = fn(*args)
            out.float().pow(2).sum().backward()
            outs.append([out] + [a.grad for a in args])
        worst = max(_relative(d, c) for d, c in zip(outs[1], outs[0]))
        report.check(f"kernel {name}", worst < 1e-4, f"forward and grads within {worst:.1e}")


def _train(cfg: ModelConfig, device: torch.device, precision: str, steps: int, **optim):
    model = GPTModel(cfg, ParallelState.single(device), device=device,
                     params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                                   "fp16": torch.float16}[precision])
    pstate = ParallelState.single(device)
    grads = DataParallelGrads([model], pstate, use_distributed_optimizer=True)
    config = OptimizerConfig(lr=1e-3, clip_grad=1.0, weight_decay=0.1, lr_decay_style="constant",
                             bf16=precision == "bf16", fp16=precision == "fp16", **optim)
    opt = build_optimizer([model], config, ParallelConfig(use_distributed_optimizer=True), pstate,
                          grads, train_iters=steps)
    oks = []
    for step in range(steps):
        tokens, labels = _batch(cfg, 2, device, seed=step)
        opt.zero_grad()
        opt.scale_loss(model(tokens, labels=labels).mean()).backward()
        grads.finish_grad_sync()
        oks.append(opt.step()[0])
    return {n: p.detach() for n, p in model.named_parameters()}, oks


def check_optimizer(report: Report, device: torch.device) -> None:
    cfg = small_llama()
    cpu, _ = _train(cfg, CPU, "fp32", 3)
    dev, _ = _train(cfg, device, "fp32", 3)
    worst = max(_relative(dev[n], cpu[n]) for n in cpu)
    report.check("optimizer fp32 (3 steps)", worst < 1e-5, f"parameters within {worst:.1e}")
    # fp16 from a loss scale that overflows (on the CPU: steps 1-2 skipped, then updates): the
    # device skips the first, backs off and updates by the last, its weights finite.
    _, cpu_ok = _train(cfg, CPU, "fp16", 4, initial_loss_scale=2.0 ** 22, hysteresis=1)
    params, dev_ok = _train(cfg, device, "fp16", 4, initial_loss_scale=2.0 ** 22, hysteresis=1)
    finite = all(torch.isfinite(p).all().item() for p in params.values())
    report.check("loss scaler fp16", not dev_ok[0] and dev_ok[-1] and finite,
                 f"updates {dev_ok} (CPU {cpu_ok})")


# ---- 2. throughput, 3. memory --------------------------------------------------------------------
def check_throughput(cfg: ModelConfig, device: torch.device, args) -> None:
    result = step_throughput.bench_dtype(cfg, "bf16", args, device)
    print("\n".join(step_throughput.format_result(result, flops.flops_per_token(cfg))), flush=True)


def check_memory(cfg: ModelConfig, device: torch.device, args) -> None:
    if device.type != "cuda":
        print("  (peak memory is measured on CUDA only)")
        return
    gc.collect()  # the throughput check's two models
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = step_throughput.build_slimtron(cfg, torch.bfloat16, device)
    tokens, labels = _batch(cfg, args.micro_batch_size, device)
    step = step_throughput.make_slimtron_step(model, "bf16", tokens, labels)
    times = [step() for _ in range(3)]
    measured = torch.cuda.max_memory_allocated(device) - base
    config = Config(model=cfg, optim=OptimizerConfig(bf16=True),
                    parallel=ParallelConfig(use_distributed_optimizer=True),
                    training=TrainingConfig(micro_batch_size=args.micro_batch_size,
                                            global_batch_size=args.micro_batch_size))
    config.validate(1, check_files=False)
    predicted = memory.plan_stage(config, 0, 1)
    gib = 2.0 ** 30
    print(f"  peak memory: measured {measured / gib:.2f} GiB, predicted {predicted.peak / gib:.2f} "
          f"GiB (weights {predicted.weights / gib:.2f}, grads {predicted.grads / gib:.2f}, "
          f"optimizer {predicted.optimizer / gib:.2f}, activations "
          f"{predicted.activations / gib:.2f}); measured / predicted "
          f"{measured / predicted.peak:.3f}; step {statistics.median(times):.3f} s", flush=True)
    del model, step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args(argv)
    device = CPU if args.cpu else torch.device("cuda")
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu to run the tiny CPU version)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    report = Report()
    if not args.skip_parity:
        print("1. parity with the CPU (fp32, TF32 off)")
        check_model(report, device)
        check_kernels(report, device)
        check_optimizer(report, device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as training runs
    cfg = small_llama() if args.cpu else llama_1b()
    # Batch 2 x 2048 keeps both models and their optimizers within an 80 GB GPU.
    # --breakdown: where each side's step goes, and the ceiling of slimtron/HF; on the GPU also
    # slimtron with --compile-layers, timed in turn with the two others (is it a win there?).
    bench = argparse.Namespace(micro_batch_size=2,
                               warmup=0 if args.cpu else 2, steps=1 if args.cpu else 5,
                               breakdown=True, side_by_side=not args.cpu)
    cfg.seq_length = cfg.max_position_embeddings = 64 if args.cpu else 2048
    print(f"2. one training step, bf16, {'tiny-llama' if args.cpu else 'Llama 1.1B'} "
          f"(batch {bench.micro_batch_size} x {cfg.seq_length})", flush=True)
    check_throughput(cfg, device, bench)
    print("3. peak memory of slimtron's step next to the memory model")
    check_memory(cfg, device, bench)
    print(f"gpu_check: {len(report.failures)} parity failure(s) {report.failures or ''}; "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
