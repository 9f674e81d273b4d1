"""The pre-norm transformer decoder, built from tensor-parallel layers.

Activations are ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism, where norms and hidden
dropout run on this rank's slice of the sequence). Attention and MLP are tensor-parallel regions:
column-parallel in, row-parallel out. The fused QKV weight is grouped: for each query group its q
heads, then its k head, then its v head, so a TP shard of dim 0 is a set of whole groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from slimtron.config import ModelConfig, check_recompute
from slimtron.model import kernels
from slimtron.parallel.context_parallel import ring_attention
from slimtron.parallel.layers import (ColumnParallelLinear, RowParallelLinear, divide,
                                      empty_parameter, set_parallel_attributes)
from slimtron.parallel.random import RNGStatesTracker, checkpoint_with_rng


# ---- activation recomputation ------------------------------------------------------------

@dataclass(frozen=True)
class Recompute:
    """What to recompute in backward. ``full``: whole layers, either groups of ``num_layers``
    consecutive layers (``uniform``) or only the first ``num_layers`` layers of the chunk
    (``block``). ``selective``: only the attention core (softmax(QK^T)V)."""
    granularity: str
    method: Optional[str] = None
    num_layers: int = 1

    def __post_init__(self):
        check_recompute(self.granularity or "no recompute", self.method,
                        self.num_layers if self.granularity == "full" else None)

    @classmethod
    def from_training_config(cls, training) -> Optional["Recompute"]:
        """From ``TrainingConfig.recompute_*`` (None when recomputation is off)."""
        if training.recompute_granularity is None:
            return None
        return cls(training.recompute_granularity, training.recompute_method,
                   training.recompute_num_layers or 1)


RecomputeArg = Union[None, str, Recompute]


def as_recompute(recompute: RecomputeArg) -> Optional[Recompute]:
    """Accept None, a Recompute, or "selective" / "full" (full = every layer, one at a time)."""
    if recompute is None or isinstance(recompute, Recompute):
        return recompute
    if recompute == "full":
        return Recompute("full", "uniform", 1)
    return Recompute(recompute)


# ---- norms -------------------------------------------------------------------------------

class Norm(nn.Module):
    """LayerNorm (weight, bias) or RMSNorm (weight) over the hidden dimension, replicated over TP.
    Under sequence parallelism each rank sees a slice of the sequence, so the grads are partial."""

    def __init__(self, config: ModelConfig, hidden_size: int, *, sequence_parallel: bool,
                 params_dtype, device):
        super().__init__()
        self.kind = config.normalization
        self.eps = config.norm_epsilon
        # --apply-layernorm-1p: the weight holds gamma - 1 (zero-centered; it starts at zero).
        self.zero_centered = config.apply_layernorm_1p
        self.weight = empty_parameter((hidden_size,), params_dtype, device)
        set_parallel_attributes(self.weight, full_shape=(hidden_size,),
                                sequence_parallel=sequence_parallel)
        if self.kind == "LayerNorm":
            self.bias = empty_parameter((hidden_size,), params_dtype, device)
            set_parallel_attributes(self.bias, full_shape=(hidden_size,),
                                    sequence_parallel=sequence_parallel)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered else self.weight
        if self.kind == "LayerNorm":
            return kernels.layer_norm(x, weight, self.bias, self.eps)
        return kernels.rms_norm(x, weight, self.eps)


# ---- rotary position embedding -------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """Rotary embedding, rotate-half form (as Megatron and HF Llama); no parameters or buffers.
    ``percent`` < 1 rotates only the first ``head_dim * percent`` dims of each head (Megatron's
    ``--rotary-percent``); the frequencies are those of a head of that many dims."""

    def __init__(self, head_dim: int, base: float, percent: float = 1.0):
        super().__init__()
        self.head_dim = int(head_dim * percent)  # the rotated dims
        self.base = base

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[b, s]`` -> (cos, sin), each ``[s, b, 1, rotated dims]`` in fp32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                                 device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.base ** exponents)
        angles = positions.t().float().unsqueeze(-1) * inv_freq  # [s, b, d/2]
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[s, b, heads, d]``; computed in fp32, returned in x's dtype. Dims past cos's last
    (partial rotary) pass through unchanged."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rotated = apply_rotary(x[..., :rotary_dim], cos, sin)
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)
    return kernels.rotary(x, cos, sin)


# ---- attention and MLP ---------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, pstate, *, sequence_parallel: bool,
                 rng_tracker: RNGStatesTracker, selective_recompute: bool, params_dtype, device):
        super().__init__()
        self.heads = divide(config.num_attention_heads, pstate.tp.size, "num attention heads")
        self.groups = divide(config.num_query_groups, pstate.tp.size, "num query groups")
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout
        self.backend = config.attention_backend
        self.cp = pstate.cp  # context parallel: ring attention over the sequence's chunks
        self.rng_tracker = rng_tracker
        self.selective_recompute = selective_recompute
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        layer = dict(sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, qkv_size, pstate.tp,
            bias=config.add_bias_linear or config.add_qkv_bias, **layer)
        self.linear_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, pstate.tp,
            bias=config.add_bias_linear, input_is_parallel=True, **layer)

    def forward(self, x: torch.Tensor, rotary=None, kv_cache=None,
                segment_ids=None) -> torch.Tensor:
        qkv = self.linear_qkv(x)
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, self.groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, :self.heads_per_group].reshape(s, b, self.heads, self.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:  # generation: attend over earlier steps' keys too
            return self.linear_proj(kv_cache.attend(self, q, k, v))
        if self.selective_recompute:
            core = self._recomputed_core_attention(q, k, v, segment_ids)
        else:
            core = self._core_attention(q, k, v, segment_ids)
        return self.linear_proj(core)

    # Eager under --compile-layers: torch.compile cannot trace checkpoint's RNG-replay context.
    @torch.compiler.disable
    def _recomputed_core_attention(self, q, k, v, segment_ids=None):
        return checkpoint_with_rng(self._core_attention, self.rng_tracker, q, k, v, segment_ids)

    def _core_attention(self, q, k, v, segment_ids=None):
        if self.cp.size > 1:  # config refuses attention dropout with context parallelism
            return ring_attention(q, k, v, self.cp, segment_ids)
        p = self.dropout if self.training else 0.0
        if p == 0.0:
            return kernels.causal_attention(q, k, v, segment_ids=segment_ids, backend=self.backend)
        with self.rng_tracker.fork():  # this rank's heads draw their own mask
            return kernels.causal_attention(q, k, v, dropout_p=p, segment_ids=segment_ids,
                                            backend=self.backend)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, pstate, *, sequence_parallel: bool, params_dtype, device):
        super().__init__()
        divide(config.ffn_hidden_size, pstate.tp.size, "ffn hidden size")
        self.swiglu = config.swiglu
        chunks = 2 if config.swiglu else 1
        layer = dict(bias=config.add_bias_linear, sequence_parallel=sequence_parallel,
                     params_dtype=params_dtype, device=device)
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, chunks * config.ffn_hidden_size,
                                               pstate.tp, partition_chunks=chunks, **layer)
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, pstate.tp,
                                            input_is_parallel=True, **layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.swiglu:
            h = kernels.swiglu(h)
        else:
            h = F.gelu(h)
        return self.linear_fc2(h)


# ---- layer and block -----------------------------------------------------------------------

def hidden_dropout(x: torch.Tensor, p: float, training: bool, sequence_parallel: bool,
                   rng_tracker: RNGStatesTracker) -> torch.Tensor:
    """Dropout on the residual stream: replicated over TP it uses the default generator (same mask
    on every TP rank); split over the sequence it uses the tracker (each slice its own mask)."""
    if not training or p == 0.0:
        return x
    if sequence_parallel:
        with rng_tracker.fork():
            return F.dropout(x, p, training=True)
    return F.dropout(x, p, training=True)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, pstate, *, sequence_parallel: bool,
                 rng_tracker: RNGStatesTracker, selective_recompute: bool, params_dtype, device):
        super().__init__()
        common = dict(sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)
        self.sequence_parallel = sequence_parallel
        self.hidden_dropout = config.hidden_dropout
        self.rng_tracker = rng_tracker
        self.input_layernorm = Norm(config, config.hidden_size, **common)
        self.self_attention = SelfAttention(config, pstate, rng_tracker=rng_tracker,
                                            selective_recompute=selective_recompute, **common)
        self.pre_mlp_layernorm = Norm(config, config.hidden_size, **common)
        self.mlp = MLP(config, pstate, **common)

    def _dropout(self, x):
        return hidden_dropout(x, self.hidden_dropout, self.training, self.sequence_parallel,
                              self.rng_tracker)

    def forward(self, x: torch.Tensor, rotary=None, kv_cache=None,
                segment_ids=None) -> torch.Tensor:
        x = x + self._dropout(self.self_attention(self.input_layernorm(x), rotary, kv_cache,
                                                  segment_ids))
        return x + self._dropout(self.mlp(self.pre_mlp_layernorm(x)))


class TransformerBlock(nn.Module):
    """The layers of one model chunk, keyed by global layer index, plus the final norm on the last
    chunk. Applies full recomputation per ``recompute``."""

    def __init__(self, config: ModelConfig, pstate, layer_numbers: Sequence[int], *,
                 post_process: bool, sequence_parallel: bool, rng_tracker: RNGStatesTracker,
                 recompute: Optional[Recompute], params_dtype, device):
        super().__init__()
        self.recompute = recompute
        self.rng_tracker = rng_tracker
        selective = recompute is not None and recompute.granularity == "selective"
        common = dict(sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(config, pstate, rng_tracker=rng_tracker,
                                     selective_recompute=selective, **common)
            for i in layer_numbers})
        self.final_layernorm = Norm(config, config.hidden_size, **common) if post_process else None

    def compile_layers(self) -> None:
        """torch.compile each layer's call in place (``nn.Module.compile``: parameter names and
        the state_dict stay the same); the first call of each layer compiles it."""
        for layer in self.layers.values():
            layer.compile()

    def _checkpointed(self, layers, x, rotary, segment_ids=None):
        def run(h, segments, *rot):
            for layer in layers:
                h = layer(h, rot or None, None, segments)
            return h
        return checkpoint_with_rng(run, self.rng_tracker, x, segment_ids, *(rotary or ()))

    def forward(self, x: torch.Tensor, rotary=None, kv_cache=None,
                segment_ids=None) -> torch.Tensor:
        """``segment_ids`` ``[b, s]`` (optional): attention stays within each document."""
        layers = list(self.layers.values())
        full = (self.recompute is not None and self.recompute.granularity == "full"
                and kv_cache is None)
        if full and self.recompute.method == "uniform":
            step = self.recompute.num_layers
            for start in range(0, len(layers), step):
                x = self._checkpointed(layers[start:start + step], x, rotary, segment_ids)
        else:
            checkpointed = self.recompute.num_layers if full else 0  # "block": the first n layers
            for i, layer in enumerate(layers):
                x = (self._checkpointed([layer], x, rotary, segment_ids) if i < checkpointed
                     else layer(x, rotary, kv_cache, segment_ids))
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x
