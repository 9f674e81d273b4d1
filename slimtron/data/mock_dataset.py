"""Synthetic samples for benchmarks and smoke runs (``--mock-data``): no corpus needed."""
from __future__ import annotations

import numpy as np


class MockGPTDataset:
    """Sample i is an arithmetic sequence ``(a + b * k) mod vocab`` with (a, b) drawn from a
    generator seeded by (seed, i): any layout sees the same data, and a model can learn it (the
    loss falls), which random tokens would not allow."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, i))
        start, step = rng.integers(0, self.vocab_size), rng.integers(1, 8)
        tokens = (start + step * np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size
        return {"tokens": tokens[:-1], "labels": tokens[1:],
                "loss_mask": np.ones(self.seq_length, dtype=np.float32),
                "position_ids": np.arange(self.seq_length, dtype=np.int64)}
