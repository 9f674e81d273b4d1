#!/usr/bin/env python3
"""Data-pipeline benchmark: preprocessing throughput and GPT dataset index build time.

1. tools/preprocess_data.py on the bundled corpus with 1 and 2 workers (MB/s of jsonl read and
   tokens/s), against the raw tokenizer's encode rate on the same texts in this process (the
   ceiling one worker can reach); the ratio says what the pipeline costs on top of tokenizing.
2. A synthetic corpus of --tokens uint16 tokens (default 1e9, 2 GB, documents of 1000-1999
   tokens) written through the C++ builder into a temporary directory (removed afterwards), then
   the time to build the GPT dataset indices over it (document shuffle, sample index, sample
   shuffle for the train/valid/test splits), to reload them from the cache, and to build a
   three-way blend.

Usage: python bench/preprocess.py [--tokens 1e9] [--seq-length 2048] [--skip-index]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import preprocess_data  # noqa: E402  (tools/ is not a package)

from slimtron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: E402
from slimtron.data.tokenizers import build_tokenizer  # noqa: E402

CORPUS = REPO / "data" / "corpus" / "kjv.jsonl.zst"
TOKENIZER = ("GPTSentencePieceTokenizer", str(REPO / "data" / "tokenizer" / "kjv_bpe8k.model"))


# ------------------------------------------------------------------------------------ preprocessing

def bench_preprocess(workers: int, out_dir: str) -> tuple[float, float, float]:
    """(MB/s, tokens/s, seconds) of a whole preprocess run, pool start-up and writing included."""
    args = preprocess_data.parse_args([
        "--input", str(CORPUS), "--output-prefix", os.path.join(out_dir, f"w{workers}"),
        "--tokenizer-type", TOKENIZER[0], "--tokenizer-model", TOKENIZER[1],
        "--workers", str(workers), "--log-interval", str(10 ** 9)])
    start = time.perf_counter()
    _, progress = preprocess_data.run(args)
    seconds = time.perf_counter() - start
    return progress.nbytes / 1e6 / seconds, progress.tokens / seconds, seconds


def bundled_texts() -> tuple[list[str], int]:
    """The corpus's texts and its size in jsonl bytes (what preprocess MB/s counts)."""
    with preprocess_data.open_binary(str(CORPUS)) as fh:
        raw = fh.read()
    return [json.loads(line)["text"] for line in io.BytesIO(raw)], len(raw)


def bench_raw_encode(texts: list[str], jsonl_bytes: int) -> tuple[float, float]:
    """(jsonl MB/s equivalent, tokens/s) of the tokenizer alone on the same documents."""
    tokenizer = build_tokenizer(*TOKENIZER)
    start = time.perf_counter()
    tokens = sum(len(tokenizer.tokenize(text)) for text in texts)
    seconds = time.perf_counter() - start
    return jsonl_bytes / 1e6 / seconds, tokens / seconds


# ------------------------------------------------------------------------------- synthetic corpus

def write_synthetic_corpus(prefix: str, total_tokens: int, seed: int = 0) -> tuple[int, float]:
    """Documents of 1000-1999 random uint16 tokens up to total_tokens; (documents, seconds)."""
    rng = np.random.default_rng(seed)
    chunk_tokens = 1 << 26
    documents = 0
    start = time.perf_counter()
    with IndexedDatasetBuilder(prefix, np.uint16, temp_suffix=".tmp") as builder:
        written = 0
        while written < total_tokens:
            want = min(chunk_tokens, total_tokens - written)
            lengths = rng.integers(1000, 2000, size=want // 1000 + 1)
            lengths = lengths[:np.searchsorted(np.cumsum(lengths), want) + 1]
            lengths[-1] -= lengths.sum() - want  # the last document ends exactly at `want`
            tokens = rng.integers(0, 8000, size=want, dtype=np.uint16)
            for start_tok, length in zip(np.cumsum(lengths) - lengths, lengths.tolist()):
                if length > 0:
                    builder.add_document(tokens[start_tok:start_tok + length])
                    documents += 1
            written += want
    return documents, time.perf_counter() - start


# ------------------------------------------------------------------------------------ GPT indices

def bench_gpt_indices(prefix: str, seq_length: int, cache_root: str) -> dict:
    """Seconds to build (and reload) the GPT dataset indices through slimtron.data."""
    from slimtron.data.blended_dataset import build_train_valid_test_datasets

    timings = {}
    for label, cache in (("train/valid/test, one epoch each (cold)", "single"),
                         ("same, loaded from the index cache (warm)", "single")):
        start = time.perf_counter()
        datasets = build_train_valid_test_datasets(
            prefix, "969,30,1", seq_length, 1234, num_samples=(None, None, None),
            cache_dir=os.path.join(cache_root, cache))
        timings[label] = time.perf_counter() - start
    samples = [len(d) for d in datasets]
    blend = [0.5, prefix, 0.3, prefix, 0.2, prefix]  # three sources (one corpus, own indices each)
    start = time.perf_counter()
    build_train_valid_test_datasets(blend, "969,30,1", seq_length, 1234,
                                    num_samples=(samples[0], samples[1], samples[2]),
                                    cache_dir=os.path.join(cache_root, "blend"))
    timings["blend of 3 sources, same sample counts (cold)"] = time.perf_counter() - start
    return {"samples": samples, "timings": timings}


def bench_cpp_helpers(prefix: str, seq_length: int, seed: int = 1234) -> dict:
    """Without slimtron.data's GPT dataset: the same index steps straight on the C++ helpers."""
    from slimtron import _C

    ds = IndexedDataset(prefix)
    sizes = np.ascontiguousarray(ds.sequence_lengths, dtype=np.int32)
    train_docs = int(round(len(ds) * 0.969))
    rng = np.random.RandomState(seed)
    timings = {}
    start = time.perf_counter()
    doc_idx = np.arange(train_docs, dtype=np.int64)
    rng.shuffle(doc_idx)
    tokens_per_epoch = int(sizes[:train_docs].sum(dtype=np.int64))
    sample_idx = _C.build_sample_idx(sizes, doc_idx, seq_length, 1, tokens_per_epoch)
    shuffle_idx = np.arange(len(sample_idx) - 1, dtype=np.int64)
    rng.shuffle(shuffle_idx)
    timings["train document/sample/shuffle index"] = time.perf_counter() - start
    start = time.perf_counter()
    _C.build_blending_indices(np.array([0.5, 0.3, 0.2]), len(shuffle_idx))
    timings["blending index (3 datasets)"] = time.perf_counter() - start
    return {"samples": [len(shuffle_idx)], "timings": timings}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--skip-index", action="store_true", help="only the preprocessing part")
    parser.add_argument("--tmpdir", default=None, help="where the synthetic corpus goes")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="slimtron_bench_") as out_dir:
        texts, jsonl_bytes = bundled_texts()
        raw_mbs, raw_tps = bench_raw_encode(texts, jsonl_bytes)
        print(f"bundled corpus: {len(texts)} documents, {jsonl_bytes / 1e6:.2f} MB of jsonl")
        print(f"  raw tokenizer encode (this process): {raw_mbs:6.2f} MB/s {raw_tps:>12,.0f} tokens/s")
        for workers in (1, 2):
            mbs, tps, seconds = bench_preprocess(workers, out_dir)
            print(f"  preprocess_data --workers {workers}:      {mbs:6.2f} MB/s {tps:>12,.0f} "
                  f"tokens/s  ({seconds:.2f} s, {tps / raw_tps:.2f}x the raw encode rate)")

    if args.skip_index:
        return
    tmp_root = tempfile.mkdtemp(prefix="slimtron_bench_", dir=args.tmpdir)
    try:
        prefix = os.path.join(tmp_root, "synthetic")
        total = int(args.tokens)
        documents, seconds = write_synthetic_corpus(prefix, total)
        size_gb = os.path.getsize(prefix + ".bin") / 1e9
        print(f"synthetic corpus: {total:,} tokens in {documents:,} documents ({size_gb:.2f} GB), "
              f"written in {seconds:.1f} s ({size_gb * 1e3 / seconds:.0f} MB/s through the builder)")
        try:
            result = bench_gpt_indices(prefix, args.seq_length, os.path.join(tmp_root, "cache"))
            how = "slimtron.data.build_train_valid_test_datasets"
        except ImportError:
            result = bench_cpp_helpers(prefix, args.seq_length)
            how = "C++ helpers"
        samples = "/".join(f"{n:,}" for n in result["samples"])
        print(f"GPT dataset indices ({how}), seq_length {args.seq_length}, {samples} samples:")
        for step, seconds in result["timings"].items():
            print(f"  {step:48s} {seconds:7.2f} s")
    finally:
        shutil.rmtree(tmp_root)


if __name__ == "__main__":
    main()
