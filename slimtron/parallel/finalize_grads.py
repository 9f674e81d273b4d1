"""The one place that reduces the gradients of replicated parameters after backward.

A step's gradients are complete only after three reductions, in this order:
1. over data parallel (later data x context parallel): every bucket of the grad buffers is averaged
   (all-reduce, or reduce-scatter under the distributed optimizer) by ``DataParallelGrads``;
2. over tensor parallel, the parameters replicated on TP ranks that saw only a slice of the
   sequence under sequence parallelism (norm weights and biases, row-parallel biases) are summed;
3. over the embedding group, the tied word embedding held by the first and the last pipeline stage
   is summed.

Under the distributed optimizer only this rank's range of each bucket is valid after step 1; steps 2
and 3 still sum the right elements because TP ranks lay out their buffers identically, and tied
embeddings sit in a bucket of their own so that first and last stage own the same range of them.
Every group is an argument; a ``None`` or size-1 group is no communication.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from slimtron.parallel import comm


def _as_list(model_or_chunks: Union[nn.Module, Iterable[nn.Module]]) -> list[nn.Module]:
    return [model_or_chunks] if isinstance(model_or_chunks, nn.Module) else list(model_or_chunks)


def _grad_of(param: nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient the optimizer reads: ``main_grad`` (data-parallel buffers) if present."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def _grads_marked(model_chunks, attribute: str) -> list[torch.Tensor]:
    return [_grad_of(p) for m in _as_list(model_chunks) for p in m.parameters()
            if getattr(p, attribute, False) and _grad_of(p) is not None]


def _all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    if not grads or comm.group_size(group) == 1:
        return
    flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), group)
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(reduced.view_as(grad))


def allreduce_sequence_parallel_grads(model_chunks, tp_group) -> None:
    """Sum over TP the grads of replicated parameters that only saw a slice of the sequence."""
    _all_reduce_coalesced(_grads_marked(model_chunks, "sequence_parallel"), tp_group)


def allreduce_embedding_grads(model_chunks, embedding_group) -> None:
    """Sum the tied word-embedding grad of the first and last pipeline stage."""
    _all_reduce_coalesced(_grads_marked(model_chunks, "shared_embedding"), embedding_group)


def finalize_model_grads(model_chunks, grads, *, tp_group, embedding_group,
                         num_tokens: Optional[torch.Tensor] = None) -> None:
    """All three reductions of a step, in order; ``grads`` is the chunks' ``DataParallelGrads``
    (it holds its own data-parallel group). With ``num_tokens`` (--calculate-per-token-loss: the
    micro-batches returned loss sums) the averaged grads become per-token means of the global
    batch: times the replicas averaged over, divided by the global token count (as Megatron)."""
    grads.finish_grad_sync()
    allreduce_sequence_parallel_grads(model_chunks, tp_group)
    allreduce_embedding_grads(model_chunks, embedding_group)
    if num_tokens is not None:
        scale_grads(grads, grads.dp_size / num_tokens.clamp(min=1))


def scale_grads(grads, factor: torch.Tensor) -> None:
    """Multiply every gradient buffer by ``factor`` (a 0-dim device tensor: no sync)."""
    for buffer in grads.buffers:
        buffer.grad_data.mul_(factor.to(buffer.grad_data.device))
