"""Layout-independent initialisation: every parameter's full tensor is a function of (seed, name).

Each full parameter is drawn from its own generator, seeded by a stable hash of the seed and the
parameter's global name, and then cut with ``sharding.shard_like``: a model at any TP/PP layout
starts from exactly the values of the single-process model.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from slimtron.config import ModelConfig
from slimtron.parallel.sharding import shard_like

VOCAB_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight")
SCALED_INIT_PARAMETERS = ("linear_proj.weight", "linear_fc2.weight")


def parameter_seed(seed: int, global_name: str) -> int:
    """A 63-bit seed that depends only on (seed, global_name), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}/{global_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _normal(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device="cpu").normal_(0.0, std,
                                                                         generator=generator)


def full_initial_value(global_name: str, full_shape, config: ModelConfig, seed: int) -> torch.Tensor:
    """The full fp32 (CPU) initial value of a parameter, by the rules of its name:
    zeros for biases, ones for norm weights, normal(0, std) for weights with the output projections
    (linear_proj, linear_fc2) scaled by 1/sqrt(2 * num_layers), padded vocabulary rows zero."""
    full_shape = tuple(full_shape)
    if global_name.endswith(".bias"):
        return torch.zeros(full_shape, device="cpu")
    if len(full_shape) == 1:  # norm weights are the only 1-d weights
        return torch.ones(full_shape, device="cpu")
    generator = torch.Generator().manual_seed(parameter_seed(seed, global_name))
    std = config.init_method_std
    if global_name.endswith(SCALED_INIT_PARAMETERS):
        std = std / math.sqrt(2.0 * config.num_layers)
    if global_name in VOCAB_PARAMETERS:
        # Draw only the real rows so that the values do not depend on the (tp-dependent) padding.
        real = _normal((config.vocab_size,) + full_shape[1:], std, generator)
        padding = torch.zeros((full_shape[0] - config.vocab_size,) + full_shape[1:], device="cpu")
        return torch.cat([real, padding])
    return _normal(full_shape, std, generator)


@torch.no_grad()
def initialize_parameters(model: nn.Module, config: ModelConfig, seed: int, pstate) -> None:
    """Fill every parameter of ``model`` (tagged with global_name/full_shape) with its shard of the
    full initial value. Parameters on the meta device are left alone."""
    for param in model.parameters():
        if param.device.type == "meta":
            continue
        full = full_initial_value(param.global_name, param.full_shape, config, seed)
        param.copy_(shard_like(full, param, pstate.tp_size, pstate.tp_rank))
