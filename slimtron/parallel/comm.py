"""Autograd-aware collectives for tensor and sequence parallelism.

The tensor-parallel region functions take the axis they act on (``pstate.tp``); the plain
collectives take a process group. A ``None`` group (or the axis's) or a group of size one means
"nothing to communicate" and the function returns its input unchanged, so the same model code runs
in one process without any process group.

Naming follows Megatron: ``copy_to_tp`` enters a tensor-parallel region (identity forward,
all-reduce backward), ``reduce_from_tp`` leaves one (all-reduce forward, identity backward); the
sequence-parallel pair gathers / reduce-scatters along the sequence dimension 0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from slimtron.parallel.state import Axis

Group = Optional[dist.ProcessGroup]

# torch 2.13 renamed the single-tensor collectives; the releases before it (torch >= 2.7 is
# required) only have the *_tensor names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# ---- raw collectives (no autograd) -----------------------------------------------------------

def all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; returns ``x``."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x, group=group)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's slice of dim 0."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(f"reduce-scatter: dim 0 of size {x.shape[0]} is not divisible by "
                         f"the group size {world}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x, group=group)
    return out


def split_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's equal slice of ``x`` along ``dim``."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} into {world} equal parts")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def gather_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order."""
    world = group_size(group)
    if world == 1:
        return x
    dim = dim % x.dim()
    gathered = all_gather_dim0(x.movedim(dim, 0), group)
    return gathered.movedim(0, dim).contiguous() if dim else gathered


# ---- autograd functions -------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # The incoming gradient may be the same tensor autograd hands to another branch (a
        # residual sum passes one tensor to both), so it is reduced in a copy.
        return all_reduce(grad.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if not x.is_contiguous() or x.grad_fn is None:  # a leaf (or a view of one) is not ours
            return all_reduce(x.contiguous().clone(), group)
        # An intermediate (a partial product) is reduced in place; marked dirty, so autograd
        # refuses it should an earlier op have saved it for backward.
        ctx.mark_dirty(x)
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            # The gathered tensor fed a tensor-parallel op: every rank holds a partial gradient.
            return reduce_scatter_dim0(grad, ctx.group), None, None
        return split_along(grad, 0, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


def _active(group: Group) -> bool:
    return group_size(group) > 1


def copy_to_tp(x: torch.Tensor, tp: "Axis") -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward."""
    return _CopyToTP.apply(x, tp.group) if _active(tp.group) else x


def reduce_from_tp(x: torch.Tensor, tp: "Axis") -> torch.Tensor:
    """All-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x, tp.group) if _active(tp.group) else x


def scatter_to_tp(x: torch.Tensor, tp: "Axis") -> torch.Tensor:
    """Keep this rank's slice of the last dim forward; all-gather it backward."""
    return _ScatterToTP.apply(x, tp.group) if _active(tp.group) else x


def gather_from_tp(x: torch.Tensor, tp: "Axis") -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's slice backward."""
    return _GatherFromTP.apply(x, tp.group) if _active(tp.group) else x


def scatter_to_sequence_parallel(x: torch.Tensor, tp: "Axis") -> torch.Tensor:
    """Keep this rank's slice of dim 0 (sequence) forward; all-gather backward."""
    return _ScatterToSP.apply(x, tp.group) if _active(tp.group) else x


def gather_from_sequence_parallel(x: torch.Tensor, tp: "Axis",
                                  tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather along dim 0 forward; reduce-scatter backward (or split, when the consumer of the
    gathered tensor is not tensor-parallel and every rank already has the full gradient)."""
    if not _active(tp.group):
        return x
    return _GatherFromSP.apply(x, tp.group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, tp: "Axis") -> torch.Tensor:
    """Sum over ranks and keep this rank's slice of dim 0 forward; all-gather backward."""
    return _ReduceScatterToSP.apply(x, tp.group) if _active(tp.group) else x
