"""Per-step overhead and start-up that do not grow with scale.

- Initialisation draws only a rank's own shard, and every TP layout gets the single-process values.
- One training step: device->host synchronisations (Tensor.item / tolist / cpu on the step's
  tensors) at most two and constant in the number of micro-batches and of parameter tensors;
  optimizer-side dispatched ops (TorchDispatchMode) constant in the number of parameter tensors.
"""
from __future__ import annotations

import pytest
import torch

from slimtron.config import ModelConfig
from slimtron.model import init
from slimtron.parallel.sharding import shard


# ---- initialisation -----------------------------------------------------------------------------
def _config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=300,
                make_vocab_size_divisible_by=128)
    base.update(overrides)
    return ModelConfig(**base)


class _CountDraws:
    """Counts the normal values drawn by init (its one drawing function, wrapped)."""

    def __init__(self, monkeypatch):
        self.values = 0
        real = init._normal

        def counted(shape, std, generator):
            out = real(shape, std, generator)
            self.values += out.numel()
            return out
        monkeypatch.setattr(init, "_normal", counted)


CASES = [  # (name, full shape, partition dim, chunks)
    ("decoder.layers.0.mlp.linear_fc1.weight", (256, 64), 0, 2),  # SwiGLU [gate; up]
    ("decoder.layers.0.mlp.linear_fc2.weight", (64, 128), 1, 1),  # row-parallel
    ("decoder.layers.1.self_attention.linear_qkv.weight", (192, 64), 0, 1),
]


@pytest.mark.parametrize("name,full_shape,dim,chunks", CASES)
def test_each_rank_draws_only_its_shard_of_the_single_process_value(monkeypatch, name, full_shape,
                                                                     dim, chunks):
    cfg = _config()
    full = init.initial_shard(name, full_shape, cfg, seed=5, dim=dim, chunks=chunks)
    assert full.shape == full_shape and abs(full.std().item() - 0.02) < 0.01 * 2
    draws = _CountDraws(monkeypatch)
    for tp in (2, 4, 8):
        for rank in range(tp):
            draws.values = 0
            part = init.initial_shard(name, full_shape, cfg, seed=5, dim=dim, chunks=chunks,
                                      tp_size=tp, tp_rank=rank)
            assert torch.equal(part, shard(full, dim, tp, rank, chunks)), (tp, rank)
            assert draws.values == full.numel() // tp  # its own blocks, nothing more


def test_vocabulary_rows_do_not_depend_on_padding_or_its_setting(monkeypatch):
    name = "embedding.word_embeddings.weight"
    cfg = _config(vocab_size=300)
    unpadded = init.initial_shard(name, (300, 64), _config(make_vocab_size_divisible_by=1), 5)
    draws = _CountDraws(monkeypatch)
    for tp in (1, 2, 4):
        padded = cfg.padded_vocab_size(tp)  # 384, 512, 512
        shards = []
        for rank in range(tp):
            draws.values = 0
            shards.append(init.initial_shard(name, (padded, 64), cfg, 5, tp_size=tp, tp_rank=rank))
            real_rows = max(0, min(300, (rank + 1) * padded // tp) - rank * padded // tp)
            # Whole 128-row blocks: a shard holding padding only draws nothing.
            assert draws.values == -(-real_rows // 128) * 128 * 64
        full = torch.cat(shards)
        assert torch.equal(full[:300], unpadded) and full[300:].abs().sum() == 0
