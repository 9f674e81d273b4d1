"""Training FLOPs per token, device peak FLOP/s and model FLOPs utilisation (MFU).

What is counted
---------------
Only matrix multiplies, each ``[m, k] @ [k, n]`` costing ``2*m*k*n`` FLOPs; training costs three
times the forward pass (forward, gradient of the input, gradient of the weight). Per token:

* ``6 * N`` for every weight matrix a token is multiplied by, where ``N`` counts, per layer, the
  fused QKV projection (``h x (a + 2g) * d``, with ``a`` heads, ``g`` query groups, ``d`` head
  dim), the attention output projection (``a*d x h``), the MLP (``h x f`` twice, ``h x 2f`` for
  SwiGLU's gate and up), and once the output layer (``h x padded_vocab``; tied or not, the logits
  are a matmul). The input embedding is a gather and costs nothing; norms, biases, softmax and
  activations are O(h) per token and are left out.
* ``12 * L * s * a*d`` for attention itself: per layer and token ``Q K^T`` and ``softmax(.) V``
  each cost ``2 * s * a*d`` forward. The causal mask halves the useful part, but the kernels
  compute (or the formula counts) the full square, as Megatron-LM does, so MFU figures compare.

With plain multi-head attention (``a*d = h``) this is the ``6N + 12*L*h*s`` of DESIGN.md, and in
general it equals Megatron-LM's closed form for GQA and SwiGLU (tests check both).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from slimtron.config import ModelConfig


def matmul_params_per_layer(model: ModelConfig) -> int:
    """Weights of one transformer layer that multiply every token (biases and norms excluded)."""
    h, d = model.hidden_size, model.kv_channels
    q_size = model.num_attention_heads * d
    kv_size = 2 * model.num_query_groups * d
    fc1_out = model.ffn_hidden_size * (2 if model.swiglu else 1)
    return h * (q_size + kv_size) + q_size * h + h * fc1_out + model.ffn_hidden_size * h


def matmul_params(model: ModelConfig, tensor_model_parallel_size: int = 1) -> int:
    """The ``N`` of ``6N``: all layers' matmul weights plus the output (logits) layer."""
    logits = model.hidden_size * model.padded_vocab_size(tensor_model_parallel_size)
    return model.num_layers * matmul_params_per_layer(model) + logits


def attention_flops_per_token(model: ModelConfig, seq_length: Optional[int] = None) -> float:
    """Training FLOPs per token of the score and context matmuls (full square, as Megatron-LM)."""
    s = seq_length or model.seq_length
    return 12.0 * model.num_layers * s * model.num_attention_heads * model.kv_channels


def flops_per_token(model: ModelConfig, seq_length: Optional[int] = None,
                    tensor_model_parallel_size: int = 1) -> float:
    """Training (forward + backward) FLOPs per token: ``6N + 12 * L * s * heads * head_dim``."""
    return (6.0 * matmul_params(model, tensor_model_parallel_size)
            + attention_flops_per_token(model, seq_length))


# Dense (no sparsity) vendor peaks in FLOP/s. Keys are matched as substrings of
# torch.cuda.get_device_name(), in order, so the more specific names come first.
# "tf32" is what an fp32 matmul runs at when torch allows TF32; "fp32" when it does not.
PEAK_TABLE: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H800", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 tensor cores
]

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s for one dtype and where the figure came from (printed with MFU)."""
    flops: float
    source: str

    def __str__(self) -> str:
        return f"{self.flops / 1e12:.3g} TFLOP/s ({self.source})"


def _dtype_key(dtype: torch.dtype, device: torch.device) -> str:
    if dtype not in _DTYPE_KEYS:
        raise ValueError(f"no peak FLOP/s for dtype {dtype}; use bf16, fp16 or fp32")
    key = _DTYPE_KEYS[dtype]
    if key == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return key


def table_peak(device_name: str, dtype_key: str) -> Optional[float]:
    """The vendor figure for a device name and dtype key, or None if the table lacks it."""
    for pattern, peaks in PEAK_TABLE:
        if pattern in device_name:
            return peaks.get(dtype_key)
    return None


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: torch.dtype, device: str = "cpu", size: int = 1024,
                         seconds: float = 0.25, windows: int = 3) -> float:
    """Best FLOP/s of a square ``size`` matmul over a few timed windows (cached per process).

    The best window, not the mean, because other processes sharing the cores only slow it down.
    """
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev).to(dtype)
    b = torch.randn(size, size, device=dev).to(dtype)
    flops_per_matmul = 2.0 * size ** 3
    a @ b  # warm-up: first call picks kernels and allocates
    best = 0.0
    for _ in range(windows):
        _synchronize(dev)
        start, count = time.perf_counter(), 0
        while True:
            a @ b
            count += 1
            _synchronize(dev)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, count * flops_per_matmul / elapsed)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak(dtype: torch.dtype, device: Optional[torch.device] = None) -> Peak:
    """Peak FLOP/s for matmuls in ``dtype``: the vendor table for known GPUs, else measured."""
    device = torch.device(device or "cpu")
    key = _dtype_key(dtype, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = table_peak(name, key)
        if flops is not None:
            return Peak(flops, f"{name} {key} dense peak from the vendor table")
        label = f"{name} {key}: not in the table, measured matmul peak"
    else:
        label = f"{device.type} {key}: measured matmul peak"
    return Peak(measured_matmul_peak(dtype, str(device)), label)


def mfu(tokens_per_s: float, flops_per_token: float, peak: Union[Peak, float]) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s as a fraction of ``peak``."""
    peak_flops = peak.flops if isinstance(peak, Peak) else float(peak)
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops
