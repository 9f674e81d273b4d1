"""Blending several corpora by weight, and the train/valid/test dataset builder behind --data-path.

``--data-path 0.3 prefixA 0.7 prefixB`` splits each corpus with ``--split``, builds one GPTDataset
per corpus and split, each with ``ceil(ceil(weight * n) * 1.005)`` samples (Megatron's margin, so
the greedy blend never runs a corpus dry), and blends them into ``n`` samples. The blend order comes
from the C++ ``build_blending_indices``: deterministic, so sample ``i`` is the same everywhere.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from slimtron import _C
from slimtron.config import ConfigError
from slimtron.data.gpt_dataset import SPLIT_NAMES, gpt_datasets_for_prefix
from slimtron.data.indexed_dataset import IndexedDataset

SAMPLE_SURPLUS = 0.005


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ConfigError(f"blend weights must be positive numbers, got {list(weights)}")
    return array / array.sum()


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (normalised)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        if len(datasets) != len(weights):
            raise ConfigError(f"{len(datasets)} datasets but {len(weights)} blend weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.dataset_index, self.dataset_sample_index = _C.build_blending_indices(self.weights, int(size))
        self._check_sizes()

    def _check_sizes(self) -> None:
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if count > len(dataset):
                raise ConfigError(f"blended dataset {d} ({_name(dataset)}) has {len(dataset)} samples "
                                  f"but the blend draws {count} from it")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]


def _name(dataset) -> str:
    indexed = getattr(dataset, "indexed", None)
    return indexed.path_prefix if indexed is not None else type(dataset).__name__


def parse_data_path(data_path) -> tuple[list[str], Optional[list[float]]]:
    """``[prefix]``, ``[prefix1, prefix2, ...]`` (weighted by their token counts) or
    ``[w1, prefix1, w2, prefix2, ...]`` -> (prefixes, weights or None when none were given)."""
    items = [data_path] if isinstance(data_path, str) else list(data_path)
    if len(items) == 1 or not any(_is_number(item) for item in items):
        return [str(item) for item in items], None  # unweighted: blended by size
    if len(items) % 2:
        raise ConfigError(f"--data-path {' '.join(map(str, items))}: expected one prefix or "
                          "weight/prefix pairs")
    weights, prefixes = [], []
    for weight, prefix in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(weight))
        except (TypeError, ValueError):
            raise ConfigError(f"--data-path: weight {weight!r} before {prefix!r} is not a number") from None
        prefixes.append(str(prefix))
    normalize_weights(weights)  # validates
    return prefixes, weights


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def build_train_valid_test_datasets(data_path, split: str, seq_length: int, seed: int,
                                    num_samples: Sequence[int] = (0, 0, 0), cache_dir: Optional[str] = None,
                                    eod_id: Optional[int] = None, eod_mask_loss: bool = False,
                                    pstate=None, **document_options
                                    ) -> list[Optional[torch.utils.data.Dataset]]:
    """[train, valid, test] datasets of ``num_samples`` samples each (None where the split is
    empty or no samples are asked for). Collective when torch.distributed is initialised: every
    rank must call it with the same arguments.
    """
    if len(num_samples) != 3:
        raise ConfigError(f"num_samples must give train, valid and test counts, got {num_samples}")
    prefixes, weights = parse_data_path(data_path)
    # document_options: GPTDataset's reset_position_ids, reset_attention_mask, vocab_size
    options = dict(cache_dir=cache_dir, eod_id=eod_id, eod_mask_loss=eod_mask_loss, pstate=pstate,
                   **document_options)
    if len(prefixes) == 1:
        return gpt_datasets_for_prefix(prefixes[0], split, num_samples, seq_length, seed, **options)
    if weights is None:  # several prefixes without weights: each in proportion to its tokens
        weights = [float(IndexedDataset(prefix).num_tokens) for prefix in prefixes]
    if any(n is None for n in num_samples):
        raise ConfigError("a blended --data-path needs a sample count for every split")
    weights = normalize_weights(weights)
    per_source = [[_source_samples(n, w) for n in num_samples] for w in weights]
    per_prefix = [gpt_datasets_for_prefix(prefix, split, counts, seq_length, seed, **options)
                  for prefix, counts in zip(prefixes, per_source)]
    blended = []
    for s, (name, n) in enumerate(zip(SPLIT_NAMES, num_samples)):
        parts = [datasets[s] for datasets in per_prefix]
        if n == 0 or all(part is None for part in parts):
            blended.append(None)
            continue
        missing = [prefix for prefix, part in zip(prefixes, parts) if part is None]
        if missing:
            raise ConfigError(f"--data-path: the {name} split ({split!r}) of {missing[0]} is empty, "
                              "so it cannot be blended")
        blended.append(BlendedDataset(parts, weights, n))
    return blended


def _source_samples(n: int, weight: float) -> int:
    return int(math.ceil(math.ceil(n * weight) * (1 + SAMPLE_SURPLUS)))
