"""Synthetic samples for benchmarks and smoke runs (``--mock-data``): no corpus needed."""
from __future__ import annotations

import numpy as np
import torch

from slimtron.config import ConfigError
from slimtron.data.gpt_dataset import get_ltor_masks_and_position_ids


class MockGPTDataset:
    """Sample i is an arithmetic sequence ``(a + b * k) mod vocab`` with (a, b) drawn from a
    generator seeded by (seed, i): any layout sees the same data, and a model can learn it (the
    loss falls), which random tokens would not allow. The tokenizer's eod id, where it occurs,
    closes a document for the document-masking flags, as in a real corpus."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234, *,
                 eod_id=None, eod_mask_loss: bool = False, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed
        self.eod_id = eod_id
        self.masks = dict(eod_mask_loss=eod_mask_loss, reset_position_ids=reset_position_ids,
                          reset_attention_mask=reset_attention_mask)
        if any(self.masks.values()) and eod_id is None:
            raise ConfigError("--eod-mask-loss, --reset-position-ids and --reset-attention-mask "
                              "need a tokenizer with an end-of-document id (--tokenizer-type)")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, i))
        start, step = rng.integers(0, self.vocab_size), rng.integers(1, 8)
        tokens = (start + step * np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size
        if not any(self.masks.values()):
            return {"tokens": tokens[:-1], "labels": tokens[1:],
                    "loss_mask": np.ones(self.seq_length, dtype=np.float32),
                    "position_ids": np.arange(self.seq_length, dtype=np.int64)}
        inputs = torch.from_numpy(tokens[:-1])
        loss_mask, positions, segments = get_ltor_masks_and_position_ids(inputs, self.eod_id,
                                                                         **self.masks)
        sample = {"tokens": inputs, "labels": torch.from_numpy(tokens[1:]),
                  "loss_mask": loss_mask, "position_ids": positions}
        if segments is not None:
            sample["segment_ids"] = segments
        return sample
