"""Layout-independent initialisation that draws only the shard a rank holds.

A parameter's full initial value is defined block by block: along its partition dimension each of
its ``partition_chunks`` chunks is cut into blocks, and block ``i`` is drawn from its own generator,
seeded by a stable hash of (seed, global name, i). A rank draws only the blocks its TP shard
overlaps (exactly its own blocks whenever the TP size divides the block count), so start-up does
1/tp of the drawing, and every TP/PP layout starts from exactly the values of the single-process
model. Blocks: ``gcd(rows per chunk, 64)`` equal blocks per chunk (any power-of-two TP up to 64
that divides the rows splits on block boundaries); vocabulary parameters use blocks of 128 rows
(with Megatron's default ``--make-vocab-size-divisible-by 128`` every TP shard is whole blocks;
with other settings a rank also draws the parts of the one or two blocks its shard cuts), and the
padding rows (past ``vocab_size``) are zero, so neither the padding nor its setting changes a value.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from slimtron.config import ModelConfig

VOCAB_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight")
SCALED_INIT_PARAMETERS = ("linear_proj.weight", "linear_fc2.weight")


def parameter_seed(seed: int, global_name: str) -> int:
    """A 63-bit seed that depends only on (seed, global_name), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}/{global_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _normal(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device="cpu").normal_(0.0, std,
                                                                         generator=generator)


MAX_BLOCKS_PER_CHUNK = 64
VOCAB_BLOCK_ROWS = 128


def _std(global_name: str, config: ModelConfig) -> float:
    std = config.init_method_std
    if global_name.endswith(SCALED_INIT_PARAMETERS):
        std = std / math.sqrt(2.0 * config.num_layers)
    return std


def block_rows(global_name: str, full_shape, dim: int, chunks: int, config: ModelConfig) -> int:
    """Rows (slices along ``dim``) per block of a normally drawn parameter."""
    if global_name in VOCAB_PARAMETERS:
        return VOCAB_BLOCK_ROWS
    per_chunk = full_shape[dim] // chunks
    return per_chunk // math.gcd(per_chunk, MAX_BLOCKS_PER_CHUNK)


def _draw_rows(global_name: str, full_shape, dim: int, rows: range, config: ModelConfig,
               seed: int, chunks: int) -> torch.Tensor:
    """Rows ``rows`` (a contiguous range along ``dim``) of the full initial value."""
    size = block_rows(global_name, full_shape, dim, chunks, config)
    real = config.vocab_size if global_name in VOCAB_PARAMETERS else full_shape[dim]
    std = _std(global_name, config)
    parts = []
    for block in range(rows.start // size, -(-rows.stop // size)):
        shape = list(full_shape)
        shape[dim] = size
        if block * size < real:
            generator = torch.Generator().manual_seed(
                parameter_seed(seed, f"{global_name}/block{block}"))
            values = _normal(tuple(shape), std, generator)
            if block * size + size > real:  # zero the vocabulary padding
                values.narrow(dim, real - block * size, block * size + size - real).zero_()
        else:
            values = torch.zeros(tuple(shape), device="cpu")
        low, high = max(rows.start, block * size), min(rows.stop, block * size + size)
        parts.append(values.narrow(dim, low - block * size, high - low))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].contiguous()


def initial_shard(global_name: str, full_shape, config: ModelConfig, seed: int, *,
                  dim: int = 0, chunks: int = 1, tp_size: int = 1,
                  tp_rank: int = 0) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard (``sharding.shard`` layout) of the full fp32 (CPU) initial value
    of a parameter, by the rules of its name: zeros for biases, ones for norm weights, normal(0,
    std) for weights, the output projections (linear_proj, linear_fc2) scaled by 1/sqrt(2 *
    num_layers), padded vocabulary rows zero. ``tp_size=1`` gives the full value."""
    full_shape = tuple(full_shape)
    shape = list(full_shape)
    shape[dim] //= tp_size
    if global_name.endswith(".bias"):
        return torch.zeros(shape, device="cpu")
    if len(full_shape) == 1:  # norm weights are the only 1-d weights
        # --apply-layernorm-1p stores gamma - 1: the same identity scale at the start.
        return (torch.zeros if config.apply_layernorm_1p else torch.ones)(shape, device="cpu")
    per_chunk = full_shape[dim] // chunks
    piece = per_chunk // tp_size
    starts = [c * per_chunk + tp_rank * piece for c in range(chunks)]
    pieces = [_draw_rows(global_name, full_shape, dim, range(start, start + piece), config, seed,
                         chunks) for start in starts]
    return torch.cat(pieces, dim=dim) if chunks > 1 else pieces[0]


def full_initial_value(global_name: str, full_shape, config: ModelConfig, seed: int,
                       chunks: int = 1) -> torch.Tensor:
    """The full fp32 (CPU) initial value of a parameter (see ``initial_shard``); ``chunks`` is its
    ``partition_chunks`` (the block layout follows the partition dimension 0 here: use
    ``initial_shard`` with the parameter's ``partition_dim`` for others)."""
    return initial_shard(global_name, full_shape, config, seed, chunks=chunks)


def parameter_initial_shard(param: torch.Tensor, config: ModelConfig, seed: int,
                            pstate) -> torch.Tensor:
    """The initial value of this rank's ``param`` (tagged with global_name/full_shape)."""
    if not getattr(param, "tensor_model_parallel", False):
        return initial_shard(param.global_name, param.full_shape, config, seed)
    return initial_shard(param.global_name, param.full_shape, config, seed,
                         dim=param.partition_dim, chunks=getattr(param, "partition_chunks", 1),
                         tp_size=pstate.tp.size, tp_rank=pstate.tp.rank)


@torch.no_grad()
def initialize_parameters(model: nn.Module, config: ModelConfig, seed: int, pstate) -> None:
    """Fill every parameter of ``model`` (tagged with global_name/full_shape) with its shard of the
    full initial value, drawing only that shard. Parameters on the meta device are left alone."""
    for param in model.parameters():
        if param.device.type == "meta":
            continue
        param.copy_(parameter_initial_shard(param, config, seed, pstate))


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give every parameter of ``model`` (built on the meta device) uninitialised storage on
    ``device``, keeping its tags (global_name, tensor_model_parallel, ...) and requires_grad: the
    model a checkpoint load is about to fill, with nothing drawn or written."""
    done: dict[int, nn.Parameter] = {}  # a parameter held by two modules stays one parameter
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in done:
                real = nn.Parameter(torch.empty_like(param, device=device),
                                    requires_grad=param.requires_grad)
                real.__dict__.update(param.__dict__)
                done[id(param)] = real
            module._parameters[name] = done[id(param)]
