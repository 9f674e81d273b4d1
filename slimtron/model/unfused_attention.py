"""Unfused causal attention: Megatron's ``unfused`` / ``local`` core attention (batched matmul,
masked softmax, batched matmul), computed in blocks of query positions so that the masked upper
triangle is never multiplied.

Block ``i`` of ``QUERY_BLOCK`` query positions attends keys ``[0, end of block i)``: its scores
``[rows, end]`` are one bmm, its diagonal square is masked, its softmax probabilities are kept for
backward (about half of the s x s matrix in all, in the input's dtype, as Megatron's unfused path
keeps all of it). Backward reads the probabilities block by block; dK and dV, which sum over
query blocks, are accumulated in fp32.

With grouped-query attention the query rows of a (batch, group) are ordered (position, head in
group), so that each group's k and v serve all its heads in one bmm and a block of positions is
a contiguous range of rows.

Where it wins: on CPUs PyTorch's SDPA kernel runs far below the bf16 matmul rate, so this is
``--attention-backend auto`` for 16-bit tensors there (bench/attention.py: 1.4-2x faster at 256 to
2048 tokens). It keeps O(s^2) memory per layer that the flash kernels do not, so on GPUs ``auto``
is flash.
"""
from __future__ import annotations

import torch

from slimtron import blockwise

QUERY_BLOCK = 128  # query positions per block (bench/attention.py: 64-128 fastest on CPU)


def unfused_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             dropout_p: float = 0.0, segment_ids=None,
                             block: int = QUERY_BLOCK) -> torch.Tensor:
    """q ``[s, b, heads, d]``; k, v ``[s, b, groups, d]``, each group serving ``heads / groups``
    consecutive query heads; ``segment_ids`` ``[b, s]`` (optional) keeps attention within each
    document. Returns ``[s, b, heads * d]`` (the layout of ``kernels.causal_attention``)."""
    s, b, heads, d = q.shape
    groups = k.shape[2]
    per_group = heads // groups
    # [b * groups, s * per_group, d], rows (position, head); scaled once here (not per score)
    rows = q.view(s, b, groups, per_group, d).permute(1, 2, 0, 3, 4).reshape(
        b * groups, s * per_group, d)
    rows = rows * d ** -0.5 if rows._is_view() else rows.mul_(d ** -0.5)  # never scale q itself
    # copies: a view of v would keep the whole fused QKV output alive for backward
    keys = k.permute(1, 2, 0, 3).contiguous().view(b * groups, s, d)
    values = v.permute(1, 2, 0, 3).contiguous().view(b * groups, s, d)
    out = _UnfusedCausalAttention.apply(rows, keys, values, per_group, block, dropout_p,
                                        segment_ids)
    return out.view(b, groups, s, per_group, d).permute(2, 0, 1, 3, 4).reshape(s, b, heads * d)


def kept_probabilities(s: int, block: int = QUERY_BLOCK) -> int:
    """Probabilities kept per head for a sequence of ``s``: each query block's rows x keys."""
    return sum((end - start) * end for start, end in blockwise.spans(s, block))


def _mask_scores(scores: torch.Tensor, start: int, end: int, per_group: int, batch: int,
                 segment_ids) -> None:
    """-inf where query position p (rows of positions [start, end)) may not see key j < end:
    j > p, or (with documents) another document than p's. In place."""
    device = scores.device
    positions = torch.arange(start, end, device=device)
    keys = torch.arange(end, device=device)
    hidden = keys > positions[:, None]  # [end - start, end]
    if segment_ids is None:
        # only the diagonal square has hidden keys; its rows repeat per head of the group
        square = hidden[:, start:].repeat_interleave(per_group, 0)
        scores[:, :, start:].masked_fill_(square, float("-inf"))
        return
    seg = segment_ids[:, :end]
    hidden = hidden | (seg[:, start:end, None] != seg[:, None, :])  # [b, end - start, end]
    rows = end - start
    by_batch = scores.view(batch, -1, rows, per_group, end)
    by_batch.masked_fill_(hidden[:, None, :, None, :], float("-inf"))


class _UnfusedCausalAttention(torch.autograd.Function):
    """rows ``[bg, s * per_group, d]`` (scaled queries), keys and values ``[bg, s, d]``."""

    @staticmethod
    def forward(ctx, rows, keys, values, per_group, block, dropout_p, segment_ids):
        with torch.profiler.record_function("unfused_attention"):  # one range in profiles
            return _UnfusedCausalAttention._forward(ctx, rows, keys, values, per_group, block,
                                                    dropout_p, segment_ids)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.profiler.record_function("unfused_attention_backward"):
            return _UnfusedCausalAttention._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, rows, keys, values, per_group, block, dropout_p, segment_ids):
        bg, s = keys.shape[0], keys.shape[1]
        batch = segment_ids.shape[0] if segment_ids is not None else bg
        probs, kept, outs = [], [], []
        for start, end in blockwise.spans(s, block):
            scores = torch.bmm(rows[:, start * per_group:end * per_group], keys[:, :end].mT)
            _mask_scores(scores, start, end, per_group, batch, segment_ids)
            p = torch.softmax(scores, dim=-1)
            probs.append(p)
            if dropout_p > 0.0:
                keep = torch.empty_like(p, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
                kept.append(keep)
                p = p * keep / (1.0 - dropout_p)
            outs.append(torch.bmm(p, values[:, :end]))
        ctx.per_group, ctx.block, ctx.dropout_p = per_group, block, dropout_p
        ctx.save_for_backward(rows, keys, values, *probs, *kept)
        return torch.cat(outs, dim=1)

    @staticmethod
    def _backward(ctx, grad_out):
        rows, keys, values, *saved = ctx.saved_tensors
        per_group, dropout_p = ctx.per_group, ctx.dropout_p
        s = keys.shape[1]
        blocks = blockwise.spans(s, ctx.block)
        probs, kept = saved[:len(blocks)], saved[len(blocks):]
        grad_out = grad_out.contiguous()
        accumulate = torch.float64 if keys.dtype == torch.float64 else torch.float32
        grad_keys = torch.zeros(keys.shape, dtype=accumulate, device=keys.device)
        grad_values = torch.zeros(values.shape, dtype=accumulate, device=values.device)
        grad_rows = []
        for i, (start, end) in enumerate(blocks):
            p = probs[i]
            row_range = slice(start * per_group, end * per_group)
            q_block, grad_block = rows[:, row_range], grad_out[:, row_range]
            grad_p = torch.bmm(grad_block, values[:, :end].mT)
            if dropout_p > 0.0:  # as forward: in p's dtype
                dropped = p * kept[i] / (1.0 - dropout_p)
                grad_values[:, :end] += torch.bmm(dropped.mT, grad_block)
                grad_p = grad_p * kept[i] / (1.0 - dropout_p)
            else:
                grad_values[:, :end] += torch.bmm(p.mT, grad_block)
            grad_scores = torch._softmax_backward_data(grad_p, p, -1, p.dtype)
            grad_rows.append(torch.bmm(grad_scores, keys[:, :end]))
            grad_keys[:, :end] += torch.bmm(grad_scores.mT, q_block)
        grad_rows = torch.cat(grad_rows, dim=1)
        return (grad_rows, grad_keys.to(keys.dtype), grad_values.to(values.dtype),
                None, None, None, None)
