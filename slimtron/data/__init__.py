"""Data: the indexed dataset (Python face of csrc/), GPT dataset, blending."""
from slimtron.data.blended_dataset import (BlendedDataset, build_train_valid_test_datasets,
                                           parse_data_path)
from slimtron.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from slimtron.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder,
                                           best_token_dtype)

__all__ = ["BlendedDataset", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder",
           "best_token_dtype", "build_train_valid_test_datasets", "parse_data_path", "parse_split",
           "split_document_ranges"]
