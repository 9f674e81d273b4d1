"""Autoregressive generation with a key/value cache, under tensor parallelism too.

The prompt runs through the model once; every later step feeds only the newest token, and each
attention layer attends over the keys and values it cached before (``KVCache.attend`` is the hook
``SelfAttention.forward`` calls when the model's forward is given ``kv_cache=``). Under TP each rank
caches its own query groups.

The model returns vocab-parallel logits: they are gathered over TP, the padded vocabulary is cut
off, and every TP rank draws the same token (identical logits and an identically seeded generator;
the token is still broadcast from TP rank 0 so the ranks can never drift apart).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from slimtron.model.kernels import torch_attention
from slimtron.parallel import comm


class KVCache:
    """Per attention module: keys and values ``[max_length, b, groups, head_dim]``, filled up to
    ``offset`` (the number of positions already processed)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.offset = 0
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Store the new ``k, v`` ``[s, b, groups, d]`` of ``module`` after its cached ones and
        attend the new queries ``q`` ``[s, b, heads, d]`` causally over all of them.
        Returns ``[s, b, heads * d]``, as ``kernels.causal_attention``."""
        s, b, heads, d = q.shape
        end = self.offset + s
        if end > self.max_length:
            raise ValueError(f"KV cache: {end} positions exceed its length {self.max_length}")
        if id(module) not in self._kv:
            shape = (self.max_length,) + tuple(k.shape[1:])
            self._kv[id(module)] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self._kv[id(module)]
        keys[self.offset:end] = k
        values[self.offset:end] = v
        return _attention(q, keys[:end], values[:end], self.offset)

    def advance(self, num_positions: int):
        """Called after each model forward: the positions just processed are now cached."""
        self.offset += num_positions


def _attention(q, k, v, offset: int) -> torch.Tensor:
    """Query ``i`` sits at position ``offset + i`` and sees keys ``0 .. offset + i``."""
    s = q.shape[0]
    mask = None
    if s > 1:
        query_pos = offset + torch.arange(s, device=q.device)
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= query_pos[:, None]
    return torch_attention(q, k, v, attn_mask=mask)


# ------------------------------------------------------------------------------------ sampling
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits ``[b, V]`` with everything outside the top-k and outside the nucleus of
    probability ``top_p`` set to -inf (the most likely token always stays)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        drop_sorted = before > top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, *, greedy: bool, temperature: float, top_k: int, top_p: float,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token ``[b]`` from fp32 logits ``[b, V]``."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _full_vocab_logits(model, vocab_parallel: torch.Tensor) -> torch.Tensor:
    """Last position's logits over the real vocabulary, fp32, identical on every TP rank."""
    last = vocab_parallel[:, -1, :].float().contiguous()
    full = comm.gather_along(last, -1, model.tp.group)
    return full[:, :model.config.vocab_size]


def _same_on_tp_ranks(tokens: torch.Tensor, group) -> torch.Tensor:
    if comm.group_size(group) > 1:
        dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
    return tokens


def _check_arguments(model, tokens, max_new_tokens, temperature, top_k, top_p, greedy):
    if not (model.pre_process and model.post_process):
        raise ValueError("generate: the model must hold every layer (pipeline-model-parallel size 1)")
    if model.sequence_parallel:
        raise ValueError("generate: build the model without sequence parallelism")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"generate: tokens must be [batch, prompt length >= 1], got {tuple(tokens.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and (temperature <= 0 or top_k < 0 or not 0 < top_p <= 1):
        raise ValueError(f"generate: need temperature > 0, top_k >= 0, 0 < top_p <= 1; got "
                         f"{temperature}, {top_k}, {top_p}")
    cfg = model.config
    total = tokens.shape[1] + max_new_tokens
    if cfg.position_embedding_type == "learned_absolute" and total > cfg.max_position_embeddings:
        raise ValueError(f"generate: prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds max_position_embeddings ({cfg.max_position_embeddings})")


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, greedy: bool = False, seed: int = 0,
             eod: Optional[int] = None) -> torch.Tensor:
    """Continue the prompts ``tokens`` ``[b, s]`` (same length) by up to ``max_new_tokens`` tokens.

    Returns ``[b, s + n]`` on the model's device: a sequence that produced ``eod`` is filled with
    ``eod`` afterwards, and generation stops early once every sequence has. Every TP rank must
    call it with the same arguments; all return the same tokens.
    """
    _check_arguments(model, tokens, max_new_tokens, temperature, top_k, top_p, greedy)
    tokens = tokens.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    batch, prompt_len = tokens.shape
    cache = KVCache(prompt_len + max_new_tokens)
    generator = None
    if not greedy:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    out = tokens
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    step_input = tokens
    for _ in range(max_new_tokens):
        positions = torch.arange(cache.offset, cache.offset + step_input.shape[1],
                                 device=tokens.device).expand(batch, -1)
        logits = model(step_input, position_ids=positions, kv_cache=cache)
        cache.advance(step_input.shape[1])
        next_tokens = sample(_full_vocab_logits(model, logits), greedy=greedy,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)
        next_tokens = _same_on_tp_ranks(next_tokens, model.tp.group)
        if eod is not None:
            next_tokens = next_tokens.masked_fill(done, eod)
            done |= next_tokens == eod
        out = torch.cat([out, next_tokens[:, None]], dim=1)
        step_input = next_tokens[:, None]
        if eod is not None and bool(done.all()):
            break
    model.train(was_training)
    return out
