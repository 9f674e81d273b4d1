"""Cross entropy over vocabulary-parallel logits, without ever forming a full-vocabulary tensor.

Each rank holds logits for vocabulary rows ``[start, start + V/tp)``. The max, the sum of
exponentials and the target's logit are each reduced over the TP group (three small all-reduces of
``[...]``-shaped tensors); the gradient is ``softmax - one_hot`` on the local slice. Columns at or past
the real vocabulary size are padding and are masked to ``-inf``, so padding never changes the loss.
All math is fp32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from slimtron.parallel import comm


def _mask_padding(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> None:
    first_padded = vocab_size - vocab_start  # local column index of the first padded row
    if first_padded < logits.shape[-1]:
        logits[..., max(first_padded, 0):] = float("-inf")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        ctx.input_dtype = logits.dtype
        logits = logits.to(torch.float32, copy=True)  # modified in place, kept as the softmax
        per_rank = logits.shape[-1]
        vocab_start = comm.group_rank(group) * per_rank
        _mask_padding(logits, vocab_start, vocab_size)

        logits_max = comm.all_reduce(logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
        logits.sub_(logits_max.unsqueeze(-1))

        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= per_rank)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = comm.all_reduce(target_logit.masked_fill(outside, 0.0), group)

        logits.exp_()
        sum_exp = comm.all_reduce(logits.sum(dim=-1), group)
        loss = torch.log(sum_exp) - target_logit

        logits.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(logits, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # in place, as Megatron: backward through this loss runs once
        # softmax - one_hot(target) on this rank's slice; rows whose target is elsewhere: softmax only.
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 group=None) -> torch.Tensor:
    """Per-token fp32 loss, shaped like ``target``.

    ``logits``: ``[..., padded_vocab / tp]`` on each TP rank (rank r holds rows r*V/tp onward).
    ``vocab_size``: the real vocabulary; columns at or past it are padding and ignored.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross entropy: logits {tuple(logits.shape)} do not match "
                         f"target {tuple(target.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, group)
