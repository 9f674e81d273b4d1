"""Data parallelism: contiguous gradient buffers and bucketed gradient reduction.

Every trainable parameter of the model chunks gets ``param.main_grad``, a view into one contiguous
gradient buffer per parameter dtype (fp32 by default, whatever the parameter dtype). A
post-accumulate-grad hook adds each backward's ``param.grad`` into ``main_grad`` and frees
``param.grad``, so micro-batch gradients accumulate in fp32 and ``param.grad`` stays ``None``.

Buffers are cut into buckets of about ``bucket_size`` elements. Parameters are laid out in reverse
order of creation (the last layers' gradients are ready first in backward) and a bucket never spans
two model chunks. ``finish_grad_sync()`` averages every bucket over the data-parallel group:

- all-reduce, so every rank holds the whole averaged gradient; or
- with the distributed optimizer, reduce-scatter: buckets are padded to a multiple of the
  data-parallel size and rank ``r`` owns (holds the averaged gradient of) the contiguous range
  ``[r * n / dp, (r + 1) * n / dp)`` of every bucket. Model parameters are then views into a
  parameter buffer with the same layout, so ``gather_params()`` rebuilds them after the optimizer
  updated each rank's range.

With ``overlap_grad_reduce``, a bucket's collective starts asynchronously as soon as all its
parameters' gradients are ready during the last micro-batch's backward; the caller runs the other
micro-batches inside ``no_sync()`` (as with torch DDP), or, when it cannot tell (pipeline
schedules), declares the number of micro-batches with ``set_microbatches_per_step(m)`` so that a
bucket starts once each of its parameters has had ``m`` gradients. ``finish_grad_sync()`` launches
whatever has not started (e.g. buckets holding unused parameters) and waits for all of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from slimtron import blockwise
from slimtron.config import ConfigError
from slimtron.parallel.comm import all_gather_single, reduce_scatter_single


@dataclass
class BucketPlan:
    """Where a bucket lives in its buffer: ``[start, end)`` (end padded) and its params' indices."""
    start: int
    end: int
    param_indices: list


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_buffer(numels: list, chunk_ids: list, bucket_size: int, pad_to: int = 1,
                isolated: Optional[list] = None):
    """Lay out parameters (given in buffer order) into buckets.

    Returns ``(offsets, buckets, total)``: each parameter's start offset, the bucket plans, and the
    buffer size. A bucket closes once it holds at least ``bucket_size`` elements or when the next
    parameter belongs to another model chunk; each bucket's size is padded to a multiple of
    ``pad_to``. An ``isolated`` parameter gets a bucket of its own.
    """
    isolated = isolated or [False] * len(numels)
    offsets, buckets, members = [], [], []
    position = bucket_start = 0

    def close():
        nonlocal position, bucket_start, members
        end = bucket_start + _round_up(position - bucket_start, pad_to)
        buckets.append(BucketPlan(bucket_start, end, members))
        position = bucket_start = end
        members = []

    for index, (numel, chunk) in enumerate(zip(numels, chunk_ids)):
        if members and (chunk != chunk_ids[members[-1]] or isolated[index]):
            close()
        offsets.append(position)
        position += numel
        members.append(index)
        if position - bucket_start >= bucket_size or isolated[index]:
            close()
    if members:
        close()
    return offsets, buckets, position


def param_label(param: torch.Tensor) -> str:
    name = getattr(param, "global_name", None)
    return name if name is not None else f"parameter of shape {tuple(param.shape)}"


class Bucket:
    """Parameters whose gradients are reduced by one collective, and that collective's state."""

    def __init__(self, params: list, start: int, grad_data: torch.Tensor,
                 param_data: Optional[torch.Tensor]):
        self.params = params
        self.start = start  # offset in the buffer
        self.grad_data = grad_data
        self.param_data = param_data
        self.reset()

    def reset(self, grads_per_step: int = 1) -> None:
        self.handle = None
        self.launched = False
        self._remaining = {id(p): grads_per_step for p in self.params}
        self._incomplete = len(self.params)

    def shard(self, data: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
        size = data.numel() // dp_size
        return data[dp_rank * size:(dp_rank + 1) * size]

    def mark_ready(self, param: torch.Tensor) -> bool:
        """Count one gradient of ``param`` towards the step; True once the whole bucket is done."""
        if self.launched or self._remaining[id(param)] == 0:
            raise RuntimeError(
                f"gradient of {param_label(param)} arrived after its bucket's reduction started: "
                "run every micro-batch but the last inside DataParallelGrads.no_sync(), or call "
                "set_microbatches_per_step()")
        self._remaining[id(param)] -= 1
        if self._remaining[id(param)] == 0:
            self._incomplete -= 1
        return self._incomplete == 0


class GradBuffer:
    """One contiguous gradient buffer (and, for the distributed optimizer, parameter buffer) for
    the parameters of one dtype."""

    def __init__(self, params: list, chunk_ids: list, grad_dtype: torch.dtype, bucket_size: int,
                 pad_to: int, keep_param_buffer: bool):
        self.params = params
        self.dtype = params[0].dtype
        device = params[0].device
        # The tied embedding's grad is all-reduced between first and last stage after the DP
        # reduction: a bucket of its own gives it the same DP ranges on both stages.
        isolated = [bool(getattr(p, "shared_embedding", False)) for p in params]
        offsets, plans, total = plan_buffer([p.numel() for p in params], chunk_ids, bucket_size,
                                            pad_to, isolated)
        self.numel = total
        self.grad_data = torch.zeros(total, dtype=grad_dtype, device=device)
        self.param_data = (torch.zeros(total, dtype=self.dtype, device=device)
                           if keep_param_buffer else None)
        self.ranges = {}
        for param, offset in zip(params, offsets):
            self._place(param, offset)
        self.buckets = [self._bucket(plan) for plan in plans]

    def _place(self, param: torch.Tensor, offset: int) -> None:
        end = offset + param.numel()
        self.ranges[id(param)] = (offset, end)
        if self.param_data is not None:
            self.param_data[offset:end].copy_(param.data.reshape(-1))
            param.data = self.param_data[offset:end].view(param.shape)
        param.main_grad = self.grad_data[offset:end].view(param.shape)

    def _bucket(self, plan: BucketPlan) -> Bucket:
        param_data = (self.param_data[plan.start:plan.end]
                      if self.param_data is not None else None)
        return Bucket([self.params[i] for i in plan.param_indices], plan.start,
                      self.grad_data[plan.start:plan.end], param_data)


def _trainable_params_in_buffer_order(model_chunks: Iterable[torch.nn.Module]):
    """Trainable parameters of all chunks, reversed (last created first), with their chunk index."""
    seen, params, chunk_ids = set(), [], []
    for chunk_index, chunk in enumerate(model_chunks):
        for param in chunk.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
                chunk_ids.append(chunk_index)
    return params[::-1], chunk_ids[::-1]


class DataParallelGrads:
    """Gradient buffers of a model (all its chunks) and their reduction over the DP group."""

    def __init__(self, model_chunks, pstate, bucket_size: int = 40_000_000,
                 overlap_grad_reduce: bool = False, use_distributed_optimizer: bool = False,
                 grad_dtype: torch.dtype = torch.float32):
        if bucket_size < 1:
            raise ConfigError(f"--ddp-bucket-size must be positive, got {bucket_size}")
        if isinstance(model_chunks, torch.nn.Module):
            model_chunks = [model_chunks]
        # Context-parallel ranks are replicas too, each with the grads of its part of the
        # sequence: grads are averaged, and the distributed optimizer sharded, over dp x cp.
        axis = pstate.dp_cp
        self.dp_group, self.dp_size, self.dp_rank = axis.group, axis.size, axis.rank
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self._sync_enabled = True
        self._grads_per_step = 1

        params, chunk_ids = _trainable_params_in_buffer_order(model_chunks)
        if not params:
            raise ConfigError("DataParallelGrads: the model chunks have no trainable parameters")
        self.params = params
        pad_to = self.dp_size if use_distributed_optimizer else 1
        self.buffers = [GradBuffer([p for p, _ in group], [c for _, c in group], grad_dtype,
                                   bucket_size, pad_to, keep_param_buffer=use_distributed_optimizer)
                        for group in self._group_by_dtype(params, chunk_ids)]
        self._bucket_of, self._buffer_of = {}, {}
        for buffer in self.buffers:
            for bucket in buffer.buckets:
                for param in bucket.params:
                    self._bucket_of[id(param)] = bucket
                    self._buffer_of[id(param)] = buffer
        for param in params:
            # A model given to a new DataParallelGrads moves to its buffers: drop the old hook so
            # that gradients are not added twice.
            previous = getattr(param, "_slimtron_grad_hook", None)
            if previous is not None:
                previous.remove()
            param._slimtron_grad_hook = param.register_post_accumulate_grad_hook(
                self._on_grad_ready)

    @staticmethod
    def _group_by_dtype(params, chunk_ids):
        groups = {}
        for param, chunk in zip(params, chunk_ids):
            groups.setdefault(param.dtype, []).append((param, chunk))
        return list(groups.values())

    @property
    def buckets(self) -> list:
        return [bucket for buffer in self.buffers for bucket in buffer.buckets]

    # ---- backward side -------------------------------------------------------------------------
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        blockwise.add_(param.main_grad, param.grad)  # 16-bit grads into fp32, in cache
        param.grad = None
        if self.overlap_grad_reduce and self._sync_enabled:
            bucket = self._bucket_of[id(param)]
            if bucket.mark_ready(param):
                self._launch(bucket)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients without reducing them (every micro-batch but the last)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def set_microbatches_per_step(self, count: int) -> None:
        """With overlap_grad_reduce, the alternative to ``no_sync()`` for callers (pipeline
        schedules) that cannot tell which backward is a parameter's last: a bucket starts once
        each of its parameters has received ``count`` gradients in the step."""
        if count < 1:
            raise ConfigError(f"micro-batches per step must be at least 1, got {count}")
        self._grads_per_step = count
        for bucket in self.buckets:
            bucket.reset(count)

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        if self.dp_size == 1:
            return
        bucket.grad_data.div_(self.dp_size)
        if self.use_distributed_optimizer:
            own = bucket.shard(bucket.grad_data, self.dp_rank, self.dp_size)
            bucket.handle = reduce_scatter_single(own, bucket.grad_data, group=self.dp_group,
                                                  async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.grad_data, group=self.dp_group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Average gradients over the DP group (start what has not started, wait for all)."""
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.reset(self._grads_per_step)

    def zero_grad(self) -> None:
        for buffer in self.buffers:
            buffer.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset(self._grads_per_step)
        for param in self.params:
            param.grad = None

    # ---- distributed-optimizer side ------------------------------------------------------------
    def param_shard_range(self, param: torch.Tensor) -> Optional[tuple]:
        """The part of ``param`` (as ``(start, end)`` into its flattened tensor) that lies in this
        rank's range of its bucket, or None; the whole parameter without the distributed
        optimizer."""
        if not self.use_distributed_optimizer:
            return 0, param.numel()
        bucket = self._bucket_of[id(param)]
        size = bucket.grad_data.numel() // self.dp_size
        own_start = bucket.start + self.dp_rank * size
        own_end = own_start + size
        start, end = self._buffer_of[id(param)].ranges[id(param)]
        lo, hi = max(start, own_start), min(end, own_end)
        if lo >= hi:
            return None
        return lo - start, hi - start

    def gather_params(self) -> None:
        """All-gather every rank's updated range of the parameter buffers (dist-opt)."""
        if not self.use_distributed_optimizer or self.dp_size == 1:
            return
        handles = []
        for bucket in self.buckets:
            own = bucket.shard(bucket.param_data, self.dp_rank, self.dp_size)
            handles.append(all_gather_single(bucket.param_data, own, group=self.dp_group,
                                             async_op=True))
        for handle in handles:
            handle.wait()
