"""Issue 12's training-side Megatron flags, each doing what it does in Megatron."""
import numpy as np
import pytest

from slimtron.config import ConfigError
from slimtron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


# ---- --no-mmap-bin-files ---------------------------------------------------------------------

def test_no_mmap_reads_the_same_tokens(tmp_path):
    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 60000, size=n) for n in (5, 1, 17, 9)]
    for tokens in documents:
        builder.add_document(tokens)
    builder.finalize()
    mapped, read = IndexedDataset(prefix), IndexedDataset(prefix, mmap=False)
    assert read._bin_map.size == 0  # nothing mapped
    for i, tokens in enumerate(documents):
        assert np.array_equal(read[i], tokens) and np.array_equal(read[i], mapped[i])
        if len(tokens) > 4:
            assert np.array_equal(read.get(i, 1, 3), tokens[1:4])
    import pickle
    assert pickle.loads(pickle.dumps(read)).mmap is False
