"""The one place that knows how a full tensor maps to its tensor-parallel shards.

A full tensor is ``chunks`` equal blocks along ``dim`` (SwiGLU's fc1 is [gate; up], so 2); each
block is cut into ``tp_size`` equal pieces and rank ``r`` holds piece ``r`` of every block, in block
order. With ``chunks=1`` this is the plain Megatron split: rank ``r`` holds the r-th contiguous slice.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _check(size: int, dim: int, tp_size: int, chunks: int) -> None:
    if tp_size < 1 or chunks < 1:
        raise ValueError(f"shard: tp_size ({tp_size}) and chunks ({chunks}) must be positive")
    if size % (tp_size * chunks):
        raise ValueError(f"shard: dim {dim} of size {size} is not divisible by "
                         f"tp_size {tp_size} x chunks {chunks}")


def shard(full: torch.Tensor, dim: int, tp_size: int, tp_rank: int, chunks: int = 1) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of ``full`` (a new contiguous tensor)."""
    _check(full.shape[dim], dim, tp_size, chunks)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"shard: tp_rank {tp_rank} is outside [0, {tp_size})")
    blocks = full.chunk(chunks, dim=dim)
    pieces = [block.chunk(tp_size, dim=dim)[tp_rank] for block in blocks]
    return torch.cat(pieces, dim=dim).contiguous()


def unshard(shards: Sequence[torch.Tensor], dim: int, chunks: int = 1) -> torch.Tensor:
    """The full tensor from every rank's shard, given in rank order (inverse of ``shard``)."""
    if not shards:
        raise ValueError("unshard: no shards given")
    _check(shards[0].shape[dim] * len(shards), dim, len(shards), chunks)
    per_rank_blocks = [s.chunk(chunks, dim=dim) for s in shards]
    blocks = [torch.cat([rank_blocks[c] for rank_blocks in per_rank_blocks], dim=dim)
              for c in range(chunks)]
    return torch.cat(blocks, dim=dim)


def shard_like(full: torch.Tensor, param: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """``full`` sharded the way ``param`` is (by its parameter attributes); replicated -> as is."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return shard(full, param.partition_dim, tp_size, tp_rank, getattr(param, "partition_chunks", 1))


def unshard_like(shards: Sequence[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``param`` from its per-rank shards; replicated -> the first one."""
    if not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    return unshard(shards, param.partition_dim, getattr(param, "partition_chunks", 1))
