"""Cross entropy over vocabulary-parallel logits, without ever forming a full-vocabulary tensor.

Each rank holds logits for vocabulary rows ``[start, start + V/tp)``. Columns at or past the real
vocabulary size are padding and are masked to ``-inf``, so padding never changes the loss.

Fused, as Megatron's ``--cross-entropy-loss-fusion`` (always on here): one pass over the logits
per step, in blocks of token rows sized to stay in cache on the CPU (one block on a GPU). Each
block is converted to fp32 (fp64 for fp64 logits) once; its row max, ``exp(x - max)`` and row sums
are taken there, and the exponentials are kept for backward in the logits' dtype (half the bytes
of fp32 probabilities). Only ``[tokens]``-shaped values cross the TP group: three small
all-reduces (max, rescaled sum, target logit). Backward turns the kept exponentials into
``(softmax - one_hot) * grad`` block by block, in fp32, rounding once; the target's entry comes
from its fp32 exponential, so ``p - 1`` never loses precision when ``p`` is near 1. (Kept in
fp16, an exponential below 2^-24 of its row's max, a logit more than 16.6 below it, is zero.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from slimtron import blockwise
from slimtron.parallel import comm
from slimtron.parallel.state import Axis


def _group(tp: Optional[Axis]):
    """The tensor-parallel group (None: one process, nothing to reduce)."""
    return None if tp is None else tp.group


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        x = logits.reshape(-1, logits.shape[-1])
        rows, per_rank = x.shape
        vocab_start = comm.group_rank(group) * per_rank
        first_padded = max(vocab_size - vocab_start, 0)  # local column of the first padded row
        math = _math_dtype(x.dtype)
        blocks = blockwise.row_blocks(rows, per_rank, x.device)
        block = blockwise.row_buffer(blocks, per_rank, math, x.device)
        exps = torch.empty_like(x)  # exp(x - local row max), kept for backward
        local_max = torch.empty(rows, dtype=math, device=x.device)
        local_sum = torch.empty(rows, dtype=math, device=x.device)
        lowest = torch.finfo(math).min  # a row of padding only: max -inf -> exps 0
        for start, end in blocks:
            b = block[:end - start]
            b.copy_(x[start:end])
            b[:, first_padded:] = float("-inf")
            row_max = b.amax(dim=-1, keepdim=True).clamp_(min=lowest)
            b.sub_(row_max).exp_()
            local_max[start:end] = row_max.squeeze(-1)
            local_sum[start:end] = b.sum(dim=-1)
            exps[start:end] = b

        global_max = comm.all_reduce(local_max.clone(), group, op=dist.ReduceOp.MAX)
        rescale = torch.exp(local_max - global_max)  # this rank's exps relative to the global max
        sum_exp = comm.all_reduce(local_sum * rescale, group)

        local_target = target.reshape(-1) - vocab_start
        outside = (local_target < 0) | (local_target >= per_rank)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).to(math)
        target_exp = torch.exp(target_logit - local_max).masked_fill_(outside, 0.0)
        shifted_target = comm.all_reduce((target_logit - global_max).masked_fill_(outside, 0.0),
                                         group)
        loss = torch.log(sum_exp) - shifted_target

        ctx.logits_shape = logits.shape
        ctx.save_for_backward(exps, local_target, outside, rescale / sum_exp, target_exp)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        exps, local_target, outside, per_row, target_exp = ctx.saved_tensors
        grad_loss = grad_loss.reshape(-1).to(per_row.dtype)
        scale = grad_loss * per_row  # grad = exps * scale, minus grad at the target
        target_grad = (target_exp * scale - grad_loss).unsqueeze(-1)
        rows, per_rank = exps.shape
        blocks = blockwise.row_blocks(rows, per_rank, exps.device)
        block = blockwise.row_buffer(blocks, per_rank, per_row.dtype, exps.device)
        grad = exps  # in place: backward through this loss runs once
        for start, end in blocks:
            b = block[:end - start]
            b.copy_(exps[start:end]).mul_(scale[start:end].unsqueeze(-1))
            index = local_target[start:end].unsqueeze(-1)
            hit = ~outside[start:end].unsqueeze(-1)
            b.scatter_(-1, index, torch.where(hit, target_grad[start:end], b.gather(-1, index)))
            grad[start:end] = b
        return grad.view(ctx.logits_shape), None, None, None


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
