"""Context parallelism: the sequence split over the cp ranks, and ring attention across them.

Load balancing (as Megatron): the sequence is cut into ``2 * cp`` equal chunks and cp rank ``i``
holds chunks ``i`` and ``2*cp - 1 - i``, in that order. Under the causal mask a late chunk attends
to more keys than an early one, so pairing them gives every rank the same attention work.

Ring attention: each rank keeps its queries; keys and values (with the segment ids of document
masking) travel around the cp ring, so at step ``j`` rank ``r`` holds those of rank
``(r - j) mod cp``. Each step attends the local queries to the visiting block and merges the partial
result into a running one by log-sum-exp (online softmax); the next block's transfer is posted
before the block is computed, so the exchange overlaps the compute where the backend can. The
backward pass runs the same ring again and recomputes each block's probabilities from the saved
log-sum-exp; the key/value grads travel with their block and arrive home after the last step.
Only the local q, k, v, output and log-sum-exp are saved, so activation memory falls as 1/cp.

Grouped-query attention is computed with the query heads of a group folded into the rows of one
matrix product against that group's key, so K/V are never expanded to one copy per query head.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

# Each kind of transfer has its own tag, so that a message is never matched with another's buffer
# (the K/V of the next step and the grads of the last can be in flight together).
_KV_TAGS, _GRAD_TAGS = (0, 1), (2,)  # (K/V, segment ids), (dK/dV)


# ---- load-balanced sharding (pure functions) ---------------------------------------------------

def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of the ``2 * cp_size`` sequence chunks that cp rank ``cp_rank`` holds."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _check_divisible(length: int, cp_size: int, what: str) -> None:
    if length % (2 * cp_size):
        raise ValueError(f"{what} of length {length} cannot be split into 2 x context-parallel "
                         f"size {cp_size} = {2 * cp_size} equal chunks")


def shard_sequence(x: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This cp rank's two chunks of ``x`` along ``dim`` (1 for ``[b, s]``, 0 for ``[s, b, h]``)."""
    if cp_size == 1:
        return x
    _check_divisible(x.shape[dim], cp_size, f"dimension {dim}")
    chunks = x.chunk(2 * cp_size, dim=dim)
    first, second = chunk_ids(cp_size, cp_rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The full tensor from every cp rank's shard (in cp rank order): inverse of shard_sequence."""
    cp_size = len(shards)
    chunks: list[Optional[torch.Tensor]] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        first, second = chunk_ids(cp_size, rank)
        chunks[first], chunks[second] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def local_positions(seq_length: int, cp_size: int, cp_rank: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions (``[s / cp]`` int64) of this cp rank's tokens."""
    return shard_sequence(torch.arange(seq_length, device=device), 0, cp_size, cp_rank)


def shard_batch(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """A micro-batch (every value ``[b, s]``) cut to this cp rank's two chunks of the sequence.
    ``position_ids`` are sharded like the tokens, so they keep their global (or per-document)
    values and RoPE sees each token's true position."""
    return {key: shard_sequence(value, 1, cp_size, cp_rank) for key, value in batch.items()}


# ---- ring exchange -----------------------------------------------------------------------------

class _RingTransfer:
    """Send tensors to the next cp rank and receive same-shaped ones from the previous, posted as
    one batch at construction, tensor i with tag ``tags[i]``; ``wait()`` returns the received
    tensors (``None`` passes through).
    With one cp rank the ring is this rank alone and the tensors come straight back; so do meta
    tensors (the dry run), which carry no data and have the shapes the ring would deliver."""

    def __init__(self, cp, tensors: Sequence[Optional[torch.Tensor]], tags: Sequence[int]):
        self.requests = []
        if cp.size == 1 or tensors[0].device.type == "meta":
            self.received = list(tensors)
            return
        next_rank = cp.ranks[(cp.rank + 1) % cp.size]
        prev_rank = cp.ranks[(cp.rank - 1) % cp.size]
        ops, self.received = [], []
        for tensor, tag in zip(tensors, tags):
            if tensor is None:
                self.received.append(None)
                continue
            buffer = torch.empty_like(tensor)
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), next_rank, cp.group, tag=tag))
            ops.append(dist.P2POp(dist.irecv, buffer, prev_rank, cp.group, tag=tag))
            self.received.append(buffer)
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[Optional[torch.Tensor]]:
        for request in self.requests:
            request.wait()
        return self.received


# ---- one block of attention --------------------------------------------------------------------

def _pair_mask(q_chunk: int, k_chunk: int, n: int, q_segments, k_segments, device):
    """(visible, mask) for queries of chunk ``q_chunk`` against keys of chunk ``k_chunk`` (both
    ``n`` tokens). ``visible`` False: the causal mask hides the whole block. ``mask`` None: every
    key is visible; otherwise a bool ``[n, n]`` or ``[b, n, n]`` (True = attend)."""
    if k_chunk > q_chunk:
        return False, None
    mask = None
    if k_chunk == q_chunk:
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if q_segments is not None:
        same = q_segments[:, :, None] == k_segments[:, None, :]
        mask = same if mask is None else same & mask
    return True, mask


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """A row with no visible key has log-sum-exp -inf; subtract 0 there so its weights are 0."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _scores(q, k, mask, scale):
    """q ``[b, g, h, n, d]``, k ``[b, g, m, d]`` -> fp32 scores ``[b, g, h, n, m]``."""
    scores = torch.einsum("bghnd,bgmd->bghnm", q.float(), k.float()) * scale
    if mask is not None:
        mask = mask[:, None, None] if mask.dim() == 3 else mask
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def _block_forward(q, k, v, mask, scale):
    """Softmax attention of one block: (output ``[b, g, h, n, d]``, log-sum-exp ``[b, g, h, n]``),
    both fp32 and normalised within the block only."""
    scores = _scores(q, k, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse).unsqueeze(-1))
    return torch.einsum("bghnm,bgmd->bghnd", probs, v.float()), lse


def _merge(out, lse, block_out, block_lse) -> None:
    """Fold a block's partial result into the running (out, lse), in place (online softmax)."""
    merged = torch.logaddexp(lse, block_lse)
    safe = _finite(merged)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - safe).unsqueeze(-1))
    lse.copy_(merged)


def _block_backward(q, k, v, dout, delta, lse, mask, scale):
    """Grads of one block given the final log-sum-exp (so the probabilities are exact):
    (dq ``[b, g, h, n, d]``, dk, dv ``[b, g, m, d]``), fp32."""
    probs = torch.exp(_scores(q, k, mask, scale) - lse.unsqueeze(-1))
    dv = torch.einsum("bghnm,bghnd->bgmd", probs, dout)
    dprobs = torch.einsum("bghnd,bgmd->bghnm", dout, v.float())
    dscores = probs * (dprobs - delta.unsqueeze(-1)) * scale
    dq = torch.einsum("bghnm,bgmd->bghnd", dscores, k.float())
    dk = torch.einsum("bghnm,bghnd->bgmd", dscores, q.float())
    return dq, dk, dv


# ---- the autograd function ---------------------------------------------------------------------

def _visible_pairs(cp, source: int, n: int, q_segments, k_segments, device):
    """(q half, kv half, mask) of every block that the causal mask does not hide entirely."""
    q_chunks, k_chunks = chunk_ids(cp.size, cp.rank), chunk_ids(cp.size, source)
    pairs = []
    for qh, q_chunk in enumerate(q_chunks):
        for kh, k_chunk in enumerate(k_chunks):
            q_seg = None if q_segments is None else q_segments[:, qh * n:(qh + 1) * n]
            k_seg = None if k_segments is None else k_segments[:, kh * n:(kh + 1) * n]
            visible, mask = _pair_mask(q_chunk, k_chunk, n, q_seg, k_seg, device)
            if visible:
                pairs.append((slice(qh * n, (qh + 1) * n), slice(kh * n, (kh + 1) * n), mask))
    return pairs


def _heads_first(q: torch.Tensor, groups: int) -> torch.Tensor:
    """q ``[s, b, heads, d]`` -> ``[b, groups, heads/groups, s, d]`` (a view)."""
    s, b, heads, d = q.shape
    return q.view(s, b, groups, heads // groups, d).permute(1, 2, 3, 0, 4)


class _RingAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, segment_ids, cp, scale):
        s, b, heads, d = q.shape
        groups = k.shape[2]
        qh = _heads_first(q, groups)
        kv = torch.stack([k, v]).permute(0, 2, 3, 1, 4).contiguous()  # [2, b, g, s, d]
        n = s // 2
        out = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qh.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        k_segments = segment_ids
        for step in range(cp.size):
            transfer = (_RingTransfer(cp, [kv, k_segments], _KV_TAGS) if step < cp.size - 1
                        else None)
            source = (cp.rank - step) % cp.size
            for qs, ks, mask in _visible_pairs(cp, source, n, segment_ids, k_segments, q.device):
                block_out, block_lse = _block_forward(qh[:, :, :, qs], kv[0][:, :, ks],
                                                      kv[1][:, :, ks], mask, scale)
                _merge(out[:, :, :, qs], lse[:, :, :, qs], block_out, block_lse)
            if transfer is not None:
                kv, k_segments = transfer.wait()
        out = out.to(q.dtype).permute(3, 0, 1, 2, 4).reshape(s, b, heads * d)
        ctx.save_for_backward(q, k, v, out, lse, segment_ids)
        ctx.cp, ctx.scale = cp, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, segment_ids = ctx.saved_tensors
        cp, scale = ctx.cp, ctx.scale
        s, b, heads, d = q.shape
        groups = k.shape[2]
        n = s // 2
        qh = _heads_first(q, groups)
        dout = _heads_first(grad_out.reshape(s, b, heads, d), groups).float()
        delta = (dout * _heads_first(out.view(s, b, heads, d), groups).float()).sum(-1)
        dq = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).permute(0, 2, 3, 1, 4).contiguous()
        k_segments, grads_in_flight = segment_ids, None
        for step in range(cp.size):
            transfer = (_RingTransfer(cp, [kv, k_segments], _KV_TAGS) if step < cp.size - 1
                        else None)
            source = (cp.rank - step) % cp.size
            # The grads of the visiting block, accumulated by the ranks it has visited so far.
            dkv = (torch.zeros(kv.shape, dtype=torch.float32, device=q.device) if step == 0
                   else grads_in_flight.wait()[0])
            for qs, ks, mask in _visible_pairs(cp, source, n, segment_ids, k_segments, q.device):
                dq_block, dk_block, dv_block = _block_backward(
                    qh[:, :, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], dout[:, :, :, qs],
                    delta[:, :, :, qs], lse[:, :, :, qs], mask, scale)
                dq[:, :, :, qs] += dq_block
                dkv[0][:, :, ks] += dk_block
                dkv[1][:, :, ks] += dv_block
            grads_in_flight = _RingTransfer(cp, [dkv], _GRAD_TAGS)
            if transfer is not None:
                kv, k_segments = transfer.wait()
        dkv = grads_in_flight.wait()[0]  # after the last step, this rank's own block is home
        dq = dq.permute(3, 0, 1, 2, 4).reshape(s, b, heads, d).to(q.dtype)
        dk, dv = (t.permute(2, 0, 1, 3).to(k.dtype) for t in dkv)
        return dq, dk, dv, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp,
                   segment_ids: Optional[torch.Tensor] = None,
                   softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention over a sequence sharded by ``shard_sequence`` across the cp ranks.

    q ``[s_local, b, heads, d]``; k, v ``[s_local, b, groups, d]`` (each group serves
    ``heads / groups`` consecutive query heads), as ``kernels.causal_attention``; ``segment_ids``
    ``[b, s_local]`` (optional): a token attends only to earlier tokens of its own segment. ``cp``
    is the context-parallel axis (``size``, ``rank``, ``ranks``, ``group``); with size 1 this is
    plain (document-masked) causal attention. Returns ``[s_local, b, heads * d]``.
    """
    s, b, heads, d = q.shape
    if s % 2:
        raise ValueError(f"ring attention: the local sequence length {s} must be even (two chunks)")
    if heads % k.shape[2]:
        raise ValueError(f"ring attention: {heads} query heads do not divide into "
                         f"{k.shape[2]} groups")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    return _RingAttention.apply(q, k, v, segment_ids, cp, scale)
