"""Cross entropy over vocabulary-parallel logits, without ever forming a full-vocabulary tensor.

Each rank holds logits for vocabulary rows ``[start, start + V/tp)``. The max, the sum of
exponentials and the target's logit are each reduced over the TP group (three small all-reduces of
``[...]``-shaped tensors); the gradient is ``softmax - one_hot`` on the local slice. Columns at or past
the real vocabulary size are padding and are masked to ``-inf``, so padding never changes the loss.
All math is fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from slimtron.parallel import comm
from slimtron.parallel.state import Axis


def _group(tp: Optional[Axis]):
    """The tensor-parallel group (None: one process, nothing to reduce)."""
    return None if tp is None else tp.group


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
                                 tp: Optional[Axis] = None) -> torch.Tensor:
    """Per-token fp32 loss, shaped like ``target``.

    ``logits``: ``[..., padded_vocab / tp]`` on each TP rank (rank r holds rows r*V/tp onward).
    ``vocab_size``: the real vocabulary; columns at or past it are padding and ignored.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross entropy: logits {tuple(logits.shape)} do not match "
                         f"target {tuple(target.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, _group(tp))


# ---- distillation: KL(teacher || student) over vocab-parallel logits ---------------------------

def _log_sum_exp(x: torch.Tensor, group) -> torch.Tensor:
    """log(sum(exp(x))) over the last dimension of every rank's columns (width 0 allowed)."""
    local = torch.logsumexp(x, dim=-1)
    if comm.group_size(group) == 1:
        return local
    top = comm.all_reduce(local.clone(), group, op=dist.ReduceOp.MAX)
    return top + torch.log(comm.all_reduce((local - top).exp(), group))


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, vocab_size, temperature, group):
        ctx.input_dtype, ctx.padded = student.dtype, student.shape[-1]
        vocab_start = comm.group_rank(group) * student.shape[-1]
        real = max(0, min(student.shape[-1], vocab_size - vocab_start))  # padding never enters
        log_p_s = student[..., :real].float() / temperature
        log_p_t = teacher[..., :real].float() / temperature
        log_p_s.sub_(_log_sum_exp(log_p_s, group).unsqueeze(-1))
        log_p_t.sub_(_log_sum_exp(log_p_t, group).unsqueeze(-1))
        p_t = log_p_t.exp()
        kl = comm.all_reduce(log_p_t.sub_(log_p_s).mul_(p_t).sum(dim=-1), group)
        ctx.temperature = temperature
        ctx.save_for_backward(log_p_s.exp_(), p_t)
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad_kl):
        p_s, p_t = ctx.saved_tensors
        # d(T^2 KL)/d(student logit) = T^2 * (p_s - p_t) / T; padding columns get zero.
        real = p_s.sub_(p_t).mul_((ctx.temperature * grad_kl).unsqueeze(-1))
        grad = real.new_zeros(*real.shape[:-1], ctx.padded)
        grad[..., :real.shape[-1]] = real
        return grad.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 vocab_size: int, temperature: float = 1.0,
                                 tp: Optional[Axis] = None) -> torch.Tensor:
    """Per-token fp32 ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, shaped like the
    logits without their last dimension (Hinton et al.'s T^2 keeps the gradient's scale
    independent of T). Both inputs hold this rank's ``padded_vocab / tp`` columns; only
    ``[...]``-shaped reductions cross the TP group and the teacher gets no gradient."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} differ (same tokenizer and "
                         "tensor-parallel size needed)")
    if not temperature > 0:
        raise ValueError(f"distillation: temperature must be positive, got {temperature}")
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), vocab_size,
                                  float(temperature), _group(tp))
