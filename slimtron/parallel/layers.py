"""Tensor-parallel layers with Megatron's names and semantics.

Layers create their parameters empty (on any device, ``meta`` included) and tag them with the
attributes of docs/CONVENTIONS.md; the model fills them afterwards from (seed, global name)
(``slimtron.model.init``). Each layer receives the tensor-parallel axis (``pstate.tp``): shapes
come from its size and rank, communication from its group, so a planning state (sizes, no groups)
builds the same shapes without talking.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from slimtron.config import ConfigError
from slimtron.parallel import comm
from slimtron.parallel.state import Axis


def set_parallel_attributes(param: nn.Parameter, *, full_shape, tensor_model_parallel: bool = False,
                            partition_dim: int = -1, partition_chunks: int = 1,
                            sequence_parallel: bool = False, shared_embedding: bool = False) -> None:
    """Tag ``param`` with the attributes every other module reads (docs/CONVENTIONS.md).

    The TP layers flag their parameters ``tensor_model_parallel`` at every tp size (tp=1 included):
    the flag says how the parameter *is cut*, so checkpoint resharding works from a TP=1 model too.
    """
    param.tensor_model_parallel = tensor_model_parallel
    param.partition_dim = partition_dim if tensor_model_parallel else -1
    param.partition_chunks = partition_chunks if tensor_model_parallel else 1
    param.sequence_parallel = sequence_parallel
    param.shared_embedding = shared_embedding
    param.full_shape = tuple(full_shape)
    param.global_name = getattr(param, "global_name", "")


def empty_parameter(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(tuple(shape), dtype=dtype, device=device))


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ConfigError(f"{what} ({numerator}) is not divisible by the tensor-model-parallel "
                          f"size ({denominator})")
    return numerator // denominator


class VocabParallelEmbedding(nn.Module):
    """Embedding table with vocabulary rows split over TP ranks.

    Ids outside this rank's rows give zero vectors; the sum over ranks (all-reduce, or reduce-scatter
    along the sequence under sequence parallelism) assembles the full lookup. Input ``[b, s]``;
    output ``[b, s, h]`` after the all-reduce, or ``[s/tp, b, h]`` with ``reduce_scatter_embeddings``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: Axis, *,
                 reduce_scatter_embeddings: bool = False, params_dtype=torch.float32, device=None):
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        per_rank = divide(num_embeddings, tp.size, "padded vocabulary size")
        self.vocab_start = tp.rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = empty_parameter((per_rank, embedding_dim), params_dtype, device)
        set_parallel_attributes(self.weight, full_shape=(num_embeddings, embedding_dim),
                                tensor_model_parallel=True, partition_dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if comm.group_size(self.tp.group) > 1:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight)
        if self.reduce_scatter_embeddings:
            return comm.reduce_scatter_to_sequence_parallel(out.transpose(0, 1).contiguous(),
                                                            self.tp)
        return comm.reduce_from_tp(out, self.tp)


class _LinearWithTPInput(torch.autograd.Function):
    """``F.linear`` entering a tensor-parallel region, as Megatron's linear with async grad
    communication: the input gradient is all-reduced over TP (replicated input) or reduce-scattered
    along the sequence (sequence parallelism). Under sequence parallelism the input arrives as the
    local ``[s/tp, b, h]`` slice, is all-gathered for the product and only the slice is saved;
    backward gathers it again for the weight gradient, so no full ``[s, b, h]`` copy outlives the
    forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel):
        ctx.group, ctx.sequence_parallel, ctx.has_bias = group, sequence_parallel, bias is not None
        ctx.save_for_backward(x, weight)
        full = comm.all_gather_dim0(x, group) if sequence_parallel else x
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_input = grad.matmul(weight)  # a fresh tensor: reduced in place, no copy
        if ctx.sequence_parallel:
            grad_input = comm.reduce_scatter_dim0(grad_input, ctx.group)
        else:
            comm.all_reduce(grad_input, ctx.group)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            full = comm.all_gather_dim0(x, ctx.group) if ctx.sequence_parallel else x
            grad_weight = grad_2d.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_bias = grad_2d.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A's output rows split over TP ranks: weight ``[out/tp, in]``.

    The input is replicated (its gradient all-reduced), or, under sequence parallelism, arrives as
    ``[s/tp, b, h]`` and is all-gathered along the sequence first. The output stays split
    (``[..., out/tp]``) unless ``gather_output``. ``partition_chunks`` > 1 says the full weight is
    that many stacked blocks, each split separately (SwiGLU [gate; up]); rank r's output is then
    [gate_r; up_r]. ``skip_weight_param_allocation``: the weight is passed to forward (tied output).
    """

    def __init__(self, input_size: int, output_size: int, tp: Axis, *, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 partition_chunks: int = 1, skip_weight_param_allocation: bool = False,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        if gather_output and (sequence_parallel or partition_chunks > 1):
            raise ConfigError("ColumnParallelLinear: gather_output cannot be combined with "
                              "sequence_parallel or partition_chunks > 1")
        self.tp = tp
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        per_rank = divide(output_size, tp.size * partition_chunks,
                          "column-parallel output size" + (f" / {partition_chunks} chunks"
                                                            if partition_chunks > 1 else ""))
        per_rank *= partition_chunks
        sharded = dict(tensor_model_parallel=True, partition_dim=0,
                       partition_chunks=partition_chunks)
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = empty_parameter((per_rank, input_size), params_dtype, device)
            set_parallel_attributes(self.weight, full_shape=(output_size, input_size), **sharded)
        if bias:
            self.bias = empty_parameter((per_rank,), params_dtype, device)
            set_parallel_attributes(self.bias, full_shape=(output_size,), **sharded)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        if weight is None:
            raise ValueError("ColumnParallelLinear built with skip_weight_param_allocation needs "
                             "the weight passed to forward")
        if comm.group_size(self.tp.group) > 1:
            out = _LinearWithTPInput.apply(x, weight, self.bias, self.tp.group,
                                           self.sequence_parallel)
        else:
            out = F.linear(x, weight, self.bias)
        if self.gather_output:
            out = comm.gather_from_tp(out, self.tp)
        return out


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A's input columns split over TP ranks: weight ``[out, in/tp]``.

    Each rank's partial product is all-reduced (or reduce-scattered along the sequence under
    sequence parallelism) and the bias, replicated, is added after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, tp: Axis, *, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ConfigError("RowParallelLinear: sequence_parallel needs input_is_parallel")
        self.tp = tp
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.input_size, self.output_size = input_size, output_size
        per_rank = divide(input_size, tp.size, "row-parallel input size")
        self.weight = empty_parameter((output_size, per_rank), params_dtype, device)
        set_parallel_attributes(self.weight, full_shape=(output_size, input_size),
                                tensor_model_parallel=True, partition_dim=1)
        if bias:
            self.bias = empty_parameter((output_size,), params_dtype, device)
            set_parallel_attributes(self.bias, full_shape=(output_size,),
                                    sequence_parallel=sequence_parallel)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = comm.scatter_to_tp(x, self.tp)
        out = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = comm.reduce_scatter_to_sequence_parallel(out, self.tp)
        else:
            out = comm.reduce_from_tp(out, self.tp)
        return out if self.bias is None else out + self.bias
