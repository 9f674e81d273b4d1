"""The .bin/.idx writer (C++) and reader: round trips, golden bytes, corrupt files, merging, and
byte-for-byte compatibility with Megatron-Core's memory-mapped indexed dataset."""
import os
import struct
import warnings

import numpy as np
import pytest
import torch

from slimtron.data import IndexedDataset, IndexedDatasetBuilder, best_token_dtype
from slimtron.data.indexed_dataset import DTYPE_CODES


def random_documents(rng, count, vocab=1000, max_len=50):
    # Some empty documents on purpose: they are legal and shift every later pointer by nothing.
    return [rng.integers(0, vocab, size=rng.integers(0, max_len)) for _ in range(count)]


def write_corpus(prefix, documents, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in documents:
            builder.add_document(doc)
    return IndexedDataset(prefix)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_document_round_trip_and_views(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 40)
    ds = write_corpus(str(tmp_path / "c"), docs)
    assert len(ds) == 40 and ds.num_documents == 40 and ds.dtype == np.uint16
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
        assert ds[i].dtype == np.uint16
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, np.arange(41))
    lengths = np.array([len(d) for d in docs])
    np.testing.assert_array_equal(ds.sequence_pointers, np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2)
    longest = int(np.argmax(lengths))
    np.testing.assert_array_equal(ds.get(longest, offset=3, length=5), docs[longest][3:8])
    np.testing.assert_array_equal(ds.get(longest, offset=4), docs[longest][4:])
    np.testing.assert_array_equal(ds[-1], docs[-1])
    # Zero-copy: a sequence is a read-only view of the mapped .bin, not a copy.
    assert not ds[longest].flags.writeable and not ds[longest].flags.owndata
    with pytest.raises(IndexError):
        ds[40]
    with pytest.raises(IndexError):
        ds.get(longest, offset=lengths[longest], length=1)


def test_sentence_items_and_multi_sequence_documents(tmp_path):
    prefix = str(tmp_path / "sentences")
    builder = IndexedDatasetBuilder(prefix, np.int32)
    sentences = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    builder.add_item(sentences[0])
    builder.add_item(torch.tensor(sentences[1]))  # tensors are accepted, as in Megatron
    builder.end_document()
    builder.add_item(sentences[2])
    builder.end_document()
    builder.add_document(np.array(sentences[3] + [11, 12]), lengths=[4, 2])
    builder.finalize()
    ds = IndexedDataset(prefix)
    assert len(ds) == 5 and ds.num_documents == 3
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 3, 5])
    for i, expected in enumerate(sentences + [[11, 12]]):
        np.testing.assert_array_equal(ds[i], expected)
    assert ds.num_tokens == 12


def test_golden_header_bytes(tmp_path):
    prefix = str(tmp_path / "golden")
    write_corpus(prefix, [np.array([5, 6, 7]), np.array([8])], dtype=np.uint16)
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                + struct.pack("<QQ", 2, 3) + struct.pack("<2i", 3, 1) + struct.pack("<2q", 0, 6)
                + struct.pack("<3q", 0, 1, 2))
    assert read_bytes(prefix + ".idx") == expected
    assert read_bytes(prefix + ".bin") == struct.pack("<4H", 5, 6, 7, 8)


def test_best_token_dtype_and_range_checks(tmp_path):
    assert best_token_dtype(50257) == np.uint16
    assert best_token_dtype(65500) == np.int32
    assert best_token_dtype(None) == np.int32
    builder = IndexedDatasetBuilder(str(tmp_path / "r"), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add_document(np.array([1, 70000]))
    with pytest.raises(ValueError, match="sum to"):
        builder.add_document(np.array([1, 2, 3]), lengths=[1, 1])
    with pytest.raises(ValueError, match="not supported"):
        IndexedDatasetBuilder(str(tmp_path / "bad"), np.complex64)
    builder.abort()


def test_temp_suffix_publishes_only_on_finalize(tmp_path):
    prefix = str(tmp_path / "atomic")
    builder = IndexedDatasetBuilder(prefix, np.uint16, temp_suffix=".partial")
    builder.add_document([1, 2, 3])
    assert not IndexedDataset.exists(prefix)
    builder.finalize()
    assert IndexedDataset.exists(prefix) and sorted(os.listdir(tmp_path)) == ["atomic.bin", "atomic.idx"]
    with pytest.raises(RuntimeError, match="already finalized"):
        builder.add_document([4])
    # A failure inside the context manager leaves nothing behind.
    with pytest.raises(KeyError):
        with IndexedDatasetBuilder(str(tmp_path / "failed"), np.uint16, temp_suffix=".tmp") as b:
            b.add_document([1, 2])
            raise KeyError("tokenizer crashed")
    assert sorted(os.listdir(tmp_path)) == ["atomic.bin", "atomic.idx"]
    # Explicit paths are honoured.
    explicit = IndexedDatasetBuilder("unused", np.uint16, bin_path=str(tmp_path / "x.bin"),
                                     idx_path=str(tmp_path / "x.idx"))
    explicit.add_document([9, 9])
    explicit.finalize()
    np.testing.assert_array_equal(IndexedDataset(str(tmp_path / "x"))[0], [9, 9])


def rewrite(path, edit):
    data = edit(bytearray(read_bytes(path)))
    with open(path, "wb") as f:
        f.write(bytes(data))


def poke(offset, value):
    def edit(data):
        data[offset:offset + len(value)] = value
        return data
    return edit


# (what is damaged, how: a function of the prefix, what the error must say)
CORRUPTIONS = [
    ("magic", lambda p: rewrite(p + ".idx", poke(0, b"NOTANIDX")), "not an indexed dataset index"),
    ("version", lambda p: rewrite(p + ".idx", poke(9, struct.pack("<Q", 2))), "unsupported index version 2"),
    ("dtype", lambda p: rewrite(p + ".idx", poke(17, b"\x09")), "unknown dtype code 9"),
    ("truncated idx", lambda p: rewrite(p + ".idx", lambda d: d[:-5]), "truncated"),
    ("truncated header", lambda p: rewrite(p + ".idx", lambda d: d[:20]), "shorter than the 34-byte header"),
    ("short bin", lambda p: rewrite(p + ".bin", lambda d: d[:-2]), "implies"),
    ("long bin", lambda p: rewrite(p + ".bin", lambda d: d + b"\x00\x00"), "implies"),
    ("missing idx", lambda p: os.remove(p + ".idx"), "no such file"),
    ("missing bin", lambda p: os.remove(p + ".bin"), "no such file"),
]


@pytest.mark.parametrize("name,damage,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_files_raise_one_line_value_errors(tmp_path, name, damage, message):
    prefix = str(tmp_path / "corpus")
    write_corpus(prefix, [np.arange(10), np.arange(3)])
    IndexedDataset(prefix)  # intact before the damage
    damage(prefix)
    with pytest.raises(ValueError, match=message) as err:
        IndexedDataset(prefix)
    text = str(err.value)
    assert "\n" not in text and "corpus." in text, text


def test_add_index_merges_corpora(tmp_path):
    rng = np.random.default_rng(1)
    first = random_documents(rng, 5)
    write_corpus(str(tmp_path / "a"), first)
    prefix_b = str(tmp_path / "b")
    builder = IndexedDatasetBuilder(prefix_b, np.uint16)
    builder.add_item([1, 2])
    builder.add_item([3])
    builder.end_document()
    builder.finalize()
    merged_prefix = str(tmp_path / "merged")
    with IndexedDatasetBuilder(merged_prefix, np.uint16) as merged:
        merged.add_document([42, 43])
        merged.add_index(str(tmp_path / "a"))
        merged.add_index(prefix_b)
        merged.add_document([44])
    ds = IndexedDataset(merged_prefix)
    expected = [[42, 43]] + first + [[1, 2], [3], [44]]
    assert len(ds) == len(expected)
    for i, seq in enumerate(expected):
        np.testing.assert_array_equal(ds[i], seq)
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 2, 3, 4, 5, 6, 8, 9])
    with pytest.raises(ValueError, match="dtype"):
        IndexedDatasetBuilder(str(tmp_path / "m32"), np.int32).add_index(prefix_b)


def test_empty_corpus(tmp_path):
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix, np.uint16).finalize()
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_pickles_by_prefix(tmp_path):
    import pickle
    ds = write_corpus(str(tmp_path / "p"), [np.arange(7)])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[0], np.arange(7))


@pytest.fixture(scope="module")
def megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that apex / Transformer Engine are absent
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_core_compatibility_both_ways(tmp_path, megatron, dtype):
    rng = np.random.default_rng(2)
    docs = random_documents(rng, 30, vocab=60000)
    ours = str(tmp_path / "ours")
    write_corpus(ours, docs, dtype=dtype)
    theirs = str(tmp_path / "theirs")
    builder = megatron.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc.astype(np.int64), [len(doc)])
    builder.finalize(theirs + ".idx")

    assert read_bytes(ours + ".idx") == read_bytes(theirs + ".idx")
    assert read_bytes(ours + ".bin") == read_bytes(theirs + ".bin")

    from_megatron = IndexedDataset(theirs)
    by_megatron = megatron.IndexedDataset(ours)
    assert len(by_megatron) == len(from_megatron) == len(docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(by_megatron[i], doc)
        np.testing.assert_array_equal(from_megatron[i], doc)
    np.testing.assert_array_equal(by_megatron.document_indices, from_megatron.document_indices)


def test_megatron_core_sentence_level_and_merge_identical(tmp_path, megatron):
    sentences = [[[1, 2], [3, 4, 5]], [[6]], [[7, 8, 9], [10], [11, 12]]]
    parts = {}
    for name, make in (("ours", IndexedDatasetBuilder), ("theirs", None)):
        prefix = str(tmp_path / name)
        builder = (IndexedDatasetBuilder(prefix, np.uint16) if make
                   else megatron.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16))
        for doc in sentences:
            for sentence in doc:
                builder.add_item(torch.tensor(sentence))
            builder.end_document()
        builder.finalize() if make else builder.finalize(prefix + ".idx")
        parts[name] = prefix
    assert read_bytes(parts["ours"] + ".idx") == read_bytes(parts["theirs"] + ".idx")
    # Merging: ours merges Megatron's corpus, Megatron merges ours; results are identical.
    merged_ours = str(tmp_path / "merged_ours")
    with IndexedDatasetBuilder(merged_ours, np.uint16) as b:
        b.add_index(parts["ours"])
        b.add_index(parts["theirs"])
    merged_theirs = str(tmp_path / "merged_theirs")
    mb = megatron.IndexedDatasetBuilder(merged_theirs + ".bin", dtype=np.uint16)
    mb.add_index(parts["ours"])
    mb.add_index(parts["theirs"])
    mb.finalize(merged_theirs + ".idx")
    for ext in (".bin", ".idx"):
        assert read_bytes(merged_ours + ext) == read_bytes(merged_theirs + ext)
    assert DTYPE_CODES[8] == np.uint16
