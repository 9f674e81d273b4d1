"""Data: the indexed dataset (Python face of csrc/), GPT dataset, blending."""
from slimtron.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder,
                                           best_token_dtype)

__all__ = ["IndexedDataset", "IndexedDatasetBuilder", "best_token_dtype"]
