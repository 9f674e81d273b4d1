"""GPT dataset indices (C++ helpers vs slow Python references), sample contents, blending, splits,
the index cache (reuse, rebuild of bad files, rank 0 builds for all), and parity with
Megatron-Core's GPTDataset / BlendedDataset."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from slimtron import _C
from slimtron.config import ConfigError
from slimtron.data import (BlendedDataset, GPTDataset, IndexedDataset, IndexedDatasetBuilder,
                           build_train_valid_test_datasets, parse_data_path, split_document_ranges)
from slimtron.data import gpt_dataset
from tests.distributed import run_distributed

EOD = 0


# ------------------------------------------------------------------------------ slow references

def reference_sample_idx(sizes, doc_idx, seq_length):
    """Where token j * seq_length of the concatenated documents lives, found by listing every token."""
    where = [(position, offset) for position, doc in enumerate(doc_idx) for offset in range(sizes[doc])]
    num_samples = (len(where) - 1) // seq_length
    rows = [where[j * seq_length] for j in range(1, num_samples + 1)]
    return np.array([(0, 0)] + rows, dtype=np.int64).reshape(-1, 2)


def reference_blending(weights, size):
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = [0] * len(weights)
    dataset_index, sample_index = [], []
    for i in range(size):
        lags = [w * max(i, 1) - c for w, c in zip(weights, counts)]
        best = lags.index(max(lags))
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return np.array(dataset_index), np.array(sample_index)


# ------------------------------------------------------------------------------------- corpora

def make_corpus(prefix, num_docs, seed, max_len=40, vocab=500):
    """Documents of 1..max_len tokens, each ending with EOD, plus one empty document."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, vocab, rng.integers(0, max_len)), EOD) for _ in range(num_docs)]
    docs.insert(num_docs // 2, np.array([], dtype=np.int64))
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for doc in docs:
            builder.add_document(doc)
    return docs


@pytest.fixture
def corpora(tmp_path):
    prefixes = [str(tmp_path / name) for name in ("books", "web")]
    make_corpus(prefixes[0], 60, seed=1)
    make_corpus(prefixes[1], 90, seed=2)
    return prefixes


# ----------------------------------------------------------------------------------- C++ helpers

@pytest.mark.parametrize("seq_length,max_len,num_epochs", [(8, 3, 1), (8, 40, 1), (5, 12, 3), (1, 4, 2)])
def test_sample_idx_matches_reference(seq_length, max_len, num_epochs):
    rng = np.random.default_rng(seq_length * 100 + max_len)
    sizes = rng.integers(0, max_len + 1, size=30).astype(np.int32)  # includes empty documents
    sizes[0] = max(sizes[0], 1)
    doc_idx = np.tile(np.arange(30), num_epochs)
    rng.shuffle(doc_idx)
    tokens_per_epoch = int(sizes.sum())
    ours = _C.build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, reference_sample_idx(sizes, doc_idx, seq_length))


def test_sample_idx_rejects_inconsistent_arguments():
    sizes = np.array([3, 4], dtype=np.int32)
    with pytest.raises(ValueError, match="outside 0..1"):
        _C.build_sample_idx(sizes, np.array([0, 2]), 2, 1, 7)
    with pytest.raises(ValueError, match="hold 7 tokens"):
        _C.build_sample_idx(sizes, np.array([0, 1]), 2, 2, 7)
    with pytest.raises(ValueError, match="positive"):
        _C.build_sample_idx(sizes, np.array([0, 1]), 0, 1, 7)


def test_blending_matches_reference_and_tracks_weights():
    rng = np.random.default_rng(3)
    for weights in ([0.3, 0.7], [1, 1, 1], rng.random(5) + 0.01, [0.999, 0.001]):
        dataset_index, sample_index = _C.build_blending_indices(np.asarray(weights, float), 2000)
        ref_index, ref_sample = reference_blending(weights, 2000)
        np.testing.assert_array_equal(dataset_index, ref_index)
        np.testing.assert_array_equal(sample_index, ref_sample)
        # Over every prefix, no dataset runs a whole sample ahead of its share; with two datasets
        # none falls a whole sample behind either. (With more, this greedy rule, Megatron's, can
        # lag by up to ~1.4 samples: measured over random weights.)
        normalized = np.asarray(weights) / np.sum(weights)
        counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[dataset_index], axis=0)
        deviation = counts - np.arange(1, 2001)[:, None] * normalized[None, :]
        assert deviation.max() < 1.0
        assert deviation.min() > (-1.0 if len(weights) == 2 else -1.5)
    with pytest.raises(ValueError, match="non-negative"):
        _C.build_blending_indices(np.array([0.5, -1.0]), 10)


def test_cpp_helpers_agree_with_megatron_core(megatron_helpers):
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 50, size=40).astype(np.int32)
    doc_idx = np.tile(np.arange(40, dtype=np.int32), 2)
    rng.shuffle(doc_idx)
    theirs = megatron_helpers.build_sample_idx_int64(sizes, doc_idx, 16, 2, int(sizes.sum()), True, 1)
    ours = _C.build_sample_idx(sizes, doc_idx.astype(np.int64), 16, 2, int(sizes.sum()))
    np.testing.assert_array_equal(ours, theirs)
    weights = np.array([0.2, 0.5, 0.3])
    their_index = np.zeros(500, dtype=np.int16)
    their_sample = np.zeros(500, dtype=np.int64)
    megatron_helpers.build_blending_indices(their_index, their_sample, weights, 3, 500, False)
    our_index, our_sample = _C.build_blending_indices(weights, 500)
    np.testing.assert_array_equal(our_index, their_index)
    np.testing.assert_array_equal(our_sample, their_sample)


# ----------------------------------------------------------------------------------- GPT dataset

def test_split_ranges_and_data_path_parsing():
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("100,0,0", 10) == [(0, 10), None, None]
    assert split_document_ranges("8, 2", 10) == [(0, 8), (8, 10), None]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ConfigError, match="--split"):
            split_document_ranges(bad, 10)
    assert parse_data_path(["only"]) == (["only"], None)
    assert parse_data_path(["0.3", "a", 0.7, "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ConfigError, match="weight/prefix pairs"):
        parse_data_path(["0.3", "a", "b"])
    with pytest.raises(ConfigError, match="not a number"):
        parse_data_path(["x", "a", "0.5", "b"])
    with pytest.raises(ConfigError, match="positive"):
        parse_data_path(["0", "a", "1", "b"])


def test_samples_are_the_right_slices_of_the_shuffled_documents(corpora, tmp_path):
    indexed = IndexedDataset(corpora[0])
    seq = 16
    ds = GPTDataset(indexed, (5, 50), num_samples=150, seq_length=seq, seed=7,
                    cache_dir=str(tmp_path / "cache"), eod_id=EOD, eod_mask_loss=True)
    assert len(ds) >= 150
    first, last = indexed.document_indices[5], indexed.document_indices[50]
    # Several epochs: every sequence of the range appears equally often in the document index.
    epochs = len(ds.document_index) // (last - first)
    assert epochs > 1
    assert sorted(ds.document_index) == sorted(np.tile(np.arange(first, last), epochs))
    assert sorted(ds.shuffle_index) == list(range(len(ds)))
    flat = np.concatenate([indexed[int(d)] for d in ds.document_index]).astype(np.int64)
    for i in range(len(ds)):
        start = int(ds.shuffle_index[i]) * seq
        expected = flat[start:start + seq + 1]
        sample = ds[i]
        assert len(ds.sample_tokens(i)) == seq + 1
        np.testing.assert_array_equal(sample["tokens"].numpy(), expected[:-1])
        np.testing.assert_array_equal(sample["labels"].numpy(), expected[1:])
        np.testing.assert_array_equal(sample["loss_mask"].numpy(), (expected[:-1] != EOD).astype(np.float32))
        assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
        assert sample["loss_mask"].dtype == torch.float32
        assert torch.equal(sample["position_ids"], torch.arange(seq))
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ConfigError, match="eod"):
        GPTDataset(indexed, (0, 10), 10, seq, 7, str(tmp_path / "cache"), eod_mask_loss=True)
    with pytest.raises(ConfigError, match="document range"):
        GPTDataset(indexed, (10, 10), 10, seq, 7, str(tmp_path / "cache"))


def test_cache_is_reused_deterministic_and_rebuilt_when_bad(corpora, tmp_path, monkeypatch):
    indexed = IndexedDataset(corpora[1])
    args = dict(document_range=(0, 80), num_samples=60, seq_length=12, seed=3)
    built = GPTDataset(indexed, cache_dir=str(tmp_path / "a"), **args)
    other_dir = GPTDataset(indexed, cache_dir=str(tmp_path / "b"), **args)
    assert built.built_indices and other_dir.built_indices
    expected = [built.sample_tokens(i) for i in range(len(built))]
    assert all(np.array_equal(e, other_dir.sample_tokens(i)) for i, e in enumerate(expected))
    assert not np.array_equal(expected[0], GPTDataset(indexed, cache_dir=str(tmp_path / "a"),
                                                      **{**args, "seed": 4}).sample_tokens(0))

    def must_not_build(*_args, **_kwargs):
        raise AssertionError("indices were rebuilt although a valid cache exists")

    with monkeypatch.context() as patch:
        patch.setattr(gpt_dataset, "build_gpt_indices", must_not_build)
        loaded = GPTDataset(indexed, cache_dir=str(tmp_path / "a"), **args)
    assert not loaded.built_indices
    assert isinstance(loaded.sample_index, np.memmap)  # loaded, memory-mapped

    def damage_and_reload(damage):
        damage(loaded.cache)
        again = GPTDataset(indexed, cache_dir=str(tmp_path / "a"), **args)
        assert again.built_indices
        assert all(np.array_equal(e, again.sample_tokens(i)) for i, e in enumerate(expected))

    def overwrite(path, data):
        with open(path, "wb") as f:
            f.write(data)

    def flip_a_value(cache):
        array = np.load(cache.array_path("shuffle_index"))
        array[[0, 1]] = array[[1, 0]]
        np.save(cache.array_path("shuffle_index"), array)

    def foreign_description(cache):
        with open(cache.manifest_path) as f:
            manifest = json.load(f)
        manifest["description"]["seed"] = 99
        overwrite(cache.manifest_path, json.dumps(manifest).encode())

    damage_and_reload(lambda c: overwrite(c.array_path("sample_index"), b"garbage"))
    damage_and_reload(lambda c: overwrite(c.array_path("document_index"),
                                          open(c.array_path("document_index"), "rb").read()[:-8]))
    damage_and_reload(flip_a_value)
    damage_and_reload(foreign_description)
    damage_and_reload(lambda c: overwrite(c.manifest_path, b"{not json"))
    damage_and_reload(lambda c: os.remove(c.array_path("shuffle_index")))
    # A changed corpus has a new key: its indices are built afresh, not taken from the old ones.
    make_corpus(corpora[1], 90, seed=5)
    assert GPTDataset(IndexedDataset(corpora[1]), cache_dir=str(tmp_path / "a"), **args).built_indices
    assert not [name for name in os.listdir(tmp_path / "a") if name.endswith(".tmp")]


def test_default_cache_dir_is_beside_the_corpus(corpora):
    ds = GPTDataset(IndexedDataset(corpora[0]), (0, 20), 5, 8, 1)
    assert ds.cache.stem.startswith(os.path.join(os.path.dirname(corpora[0]), "cache", "books-gpt-"))


def test_train_valid_test_single_and_blended(corpora, tmp_path):
    cache = str(tmp_path / "cache")
    train, valid, test = build_train_valid_test_datasets([corpora[0]], "80,20,0", 16, 1, (40, 10, 5),
                                                         cache_dir=cache)
    assert isinstance(train, GPTDataset) and len(train) >= 40 and len(valid) >= 10 and test is None
    assert train.document_index.max() < valid.document_index.min()  # disjoint document ranges

    data_path = ["0.25", corpora[0], 0.75, corpora[1]]
    train, valid, test = build_train_valid_test_datasets(data_path, "90,10,0", 16, 1, (400, 20, 0),
                                                         cache_dir=cache)
    assert isinstance(train, BlendedDataset) and len(train) == 400 and len(valid) == 20 and test is None
    # ceil(ceil(n * w) * 1.005) samples per source, as Megatron builds them.
    assert len(train.datasets[0]) >= 101 and len(train.datasets[1]) >= 302
    counts = np.cumsum(np.eye(2, dtype=np.int64)[train.dataset_index], axis=0)
    assert np.abs(counts - np.arange(1, 401)[:, None] * np.array([0.25, 0.75])).max() < 1.0
    for i in (0, 1, 399):
        source = train.datasets[train.dataset_index[i]]
        assert torch.equal(train[i]["tokens"], source[int(train.dataset_sample_index[i])]["tokens"])
    # Prefixes without weights blend in proportion to their token counts (as --data-path A B).
    unweighted, _, _ = build_train_valid_test_datasets(list(corpora[:2]), "90,10,0", 16, 1,
                                                       (400, 20, 0), cache_dir=cache)
    tokens = np.array([IndexedDataset(p).num_tokens for p in corpora[:2]], dtype=np.float64)
    counts = np.bincount(unweighted.dataset_index, minlength=2)
    assert np.abs(counts - 400 * tokens / tokens.sum()).max() < 1.5
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    tiny = str(tmp_path / "tiny")
    make_corpus(tiny, 4, seed=3)  # 5 documents: its 5% valid split is empty
    with pytest.raises(ConfigError, match="valid split .* of .*tiny is empty"):
        build_train_valid_test_datasets(["1", corpora[0], "1", tiny], "95,5,0", 16, 1, (10, 10, 0),
                                        cache_dir=cache)
    with pytest.raises(ConfigError, match="draws"):
        BlendedDataset([train.datasets[0], train.datasets[1]], [0.5, 0.5], 10_000)


# -------------------------------------------------------------------------------- distributed

def _build_on_two_ranks(rank, world_size, data_path, cache):
    train, valid, _ = build_train_valid_test_datasets(data_path, "90,10,0", 16, 1, (200, 20, 0),
                                                      cache_dir=cache)
    built = [ds.built_indices for ds in train.datasets + valid.datasets]
    samples = torch.stack([train[i]["tokens"] for i in range(0, 200, 7)])
    return built, samples


def test_rank_zero_builds_others_load(corpora, tmp_path):
    data_path = ["1", corpora[0], "2", corpora[1]]
    results = run_distributed(_build_on_two_ranks, 2, data_path, str(tmp_path / "cache"))
    (built0, samples0), (built1, samples1) = results
    assert all(built0) and not any(built1)
    assert torch.equal(samples0, samples1)


# ---------------------------------------------------------------------- Megatron-Core parity

@pytest.fixture(scope="module")
def megatron_helpers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    return helpers_cpp


class _Tokenizer:
    """What Megatron-Core's GPT dataset reads from a tokenizer."""
    eod = EOD
    pad = -1
    vocab_size = 500
    unique_identifiers = {"class": "test-tokenizer"}


def test_same_samples_as_megatron_core(corpora, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    sizes, seq, seed, split = [300, 20, 5], 16, 1234, "80,15,5"
    for blend, data_path, eod_mask_loss in (
            (([corpora[0]], None), [corpora[0]], True),
            ((corpora, [0.3, 0.7]), ["0.3", corpora[0], "0.7", corpora[1]], False)):
        config = GPTDatasetConfig(random_seed=seed, sequence_length=seq, blend=blend, split=split,
                                  tokenizer=_Tokenizer(), reset_position_ids=False,
                                  reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
                                  path_to_cache=None)
        theirs = BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()
        ours = build_train_valid_test_datasets(data_path, split, seq, seed, sizes,
                                               cache_dir=str(tmp_path / "cache"), eod_id=EOD,
                                               eod_mask_loss=eod_mask_loss)
        for their_split, our_split, n in zip(theirs, ours, sizes):
            # Megatron's blend may hold a few more than n samples; the first n are the contract.
            for i in range(n):
                a, b = their_split[i], our_split[i]
                for key in ("tokens", "labels", "loss_mask", "position_ids"):
                    assert torch.equal(a[key], b[key]), (blend, i, key)


def test_indices_are_int32_where_they_fit_with_the_same_values_as_int64():
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 30, size=50).astype(np.int32)
    indices = gpt_dataset.build_gpt_indices(sizes, np.arange(50, dtype=np.int64), 200, 8, seed=3)
    assert {name: a.dtype for name, a in indices.items()} == {
        "document_index": np.int32, "sample_index": np.int32, "shuffle_index": np.int32}
    doc_idx = indices["document_index"]
    wide = _C.build_sample_idx(sizes, doc_idx.astype(np.int64), 8, len(doc_idx) // 50,
                               int(sizes.sum()))
    np.testing.assert_array_equal(indices["sample_index"], wide)
    # Shuffling draws the same permutation whatever the integer type.
    for dtype in (np.int32, np.int64):
        again = gpt_dataset.build_gpt_indices(sizes, np.arange(50, dtype=dtype), 200, 8, seed=3)
        for name, array in indices.items():
            np.testing.assert_array_equal(again[name], array)
    assert gpt_dataset.index_dtype(2 ** 31 - 1) == np.int32
    assert gpt_dataset.index_dtype(2 ** 31) == np.int64
