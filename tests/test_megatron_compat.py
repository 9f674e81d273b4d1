"""tools/preprocess_data.py writes byte-identical corpora to Megatron-LM's tools/preprocess_data.py,
for every tokenizer type both support.

Megatron-LM's script cannot be imported here: it needs ``megatron.training`` (not in the
``megatron-core`` package) and, at Megatron-LM main, ``megatron.core.tokenizers.utils``, which the
installed release keeps under ``megatron.core.tokenizers.text.utils``. So ``megatron_preprocess``
below repeats its per-document steps (``Encoder.encode`` and ``Partition.process_json_file`` of
NVIDIA/Megatron-LM tools/preprocess_data.py at commit d98e8a6, one partition, no sentence
splitting) around Megatron's own pieces from the installed package: its tokenizer
(``megatron.core.tokenizers``), ``DType.optimal_dtype`` and ``IndexedDatasetBuilder``. Our tool
runs as a subprocess, with two workers.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tokenizer_files import (BUNDLED_MODEL, corpus_texts, megatron_gpt2_tokenizer,
                                   megatron_tokenizer, write_gpt2_files)

REPO = Path(__file__).resolve().parent.parent
KEYS = ["text", "title"]


def megatron_preprocess(jsonl: Path, prefix: str, tokenizer, append_eod: bool) -> None:
    """Megatron-LM's per-document logic (see the module docstring) with Megatron's tokenizer."""
    from megatron.core.datasets import indexed_dataset

    dtype = indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size)
    encode = tokenizer.tokenize if hasattr(tokenizer, "tokenize") else tokenizer.text_to_ids
    builders = {key: indexed_dataset.IndexedDatasetBuilder(f"{prefix}_{key}_document.bin",
                                                           dtype=dtype) for key in KEYS}
    with open(jsonl, encoding="utf-8") as fin:
        for line in fin:
            data = json.loads(line)
            for key in KEYS:
                text = data[key]
                sentences = text if isinstance(text, list) else [text]
                doc_ids, sentence_lens = [], []
                for sentence in sentences:
                    ids = encode(sentence)
                    if len(ids) > 0:
                        doc_ids.extend(ids)
                        sentence_lens.append(len(ids))
                if len(doc_ids) > 0 and append_eod:
                    doc_ids.append(tokenizer.eod)
                    sentence_lens[-1] += 1
                builders[key].add_document(doc_ids, sentence_lens)
    for key in KEYS:
        builders[key].finalize(f"{prefix}_{key}_document.idx")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Corpus documents, plus the edge cases: an empty text, whitespace only, a literal special
    token, non-ASCII; two keys per line."""
    texts = corpus_texts(40) + ["", " \n ", "<|endoftext|> and </s> in text", "héllo 日本語 🙂"]
    path = tmp_path_factory.mktemp("compat") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "title": f"document {i}" if i % 7 else ""}) + "\n")
    return path


@pytest.fixture(scope="module")
def null_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("null") / "ids.jsonl"
    with open(path, "w") as f:
        for i in range(30):
            ids = " ".join(str((i * 37 + j * 11) % 500) for j in range(1 + i % 9))
            f.write(json.dumps({"text": ids, "title": str(i)}) + "\n")
    return path


def run_ours(jsonl: Path, prefix: Path, *flags) -> None:
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(jsonl),
           "--output-prefix", str(prefix), "--json-keys", *KEYS, "--workers", "2",
           "--lines-per-batch", "5", *map(str, flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def assert_identical(ours_prefix: Path, megatron_prefix: Path) -> None:
    for key in KEYS:
        for suffix in (".bin", ".idx"):
            ours = Path(f"{ours_prefix}_{key}_document{suffix}").read_bytes()
            theirs = Path(f"{megatron_prefix}_{key}_document{suffix}").read_bytes()
            assert ours == theirs, f"{key} {suffix} differs"


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                            "Llama2Tokenizer"])
def test_sentencepiece_corpora_are_byte_identical(tmp_path, corpus, tokenizer_type):
    theirs = megatron_tokenizer(tokenizer_type, tokenizer_model=BUNDLED_MODEL)
    for eod in (True, False) if tokenizer_type == "SentencePieceTokenizer" else (True,):
        flags = ["--append-eod"] if eod else []
        megatron_preprocess(corpus, str(tmp_path / f"megatron{eod}"), theirs, eod)
        run_ours(corpus, tmp_path / f"ours{eod}", "--tokenizer-type", tokenizer_type,
                 "--tokenizer-model", BUNDLED_MODEL, *flags)
        assert_identical(tmp_path / f"ours{eod}", tmp_path / f"megatron{eod}")


def test_gpt2_bpe_corpus_is_byte_identical(tmp_path, corpus):
    vocab, merges = write_gpt2_files(tmp_path / "gpt2")
    theirs = megatron_gpt2_tokenizer(vocab, merges, tmp_path / "hf")
    megatron_preprocess(corpus, str(tmp_path / "megatron"), theirs, True)
    # No --tokenizer-type: the two files imply GPT2BPETokenizer, as in Megatron-LM.
    run_ours(corpus, tmp_path / "ours", "--vocab-file", vocab, "--merge-file", merges,
             "--append-eod")
    assert_identical(tmp_path / "ours", tmp_path / "megatron")


def test_huggingface_corpus_is_byte_identical(tmp_path, corpus):
    from tests.test_tokenizers import _save_local_hf_tokenizer

    _save_local_hf_tokenizer(tmp_path / "hf")
    theirs = megatron_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf"))
    megatron_preprocess(corpus, str(tmp_path / "megatron"), theirs, True)
    run_ours(corpus, tmp_path / "ours", "--tokenizer-type", "HuggingFaceTokenizer",
             "--tokenizer-model", tmp_path / "hf", "--append-eod")
    assert_identical(tmp_path / "ours", tmp_path / "megatron")


def test_tiktoken_corpus_is_byte_identical(tmp_path, corpus):
    pytest.importorskip("tiktoken")
    import base64

    vocab_file = tmp_path / "tiktoken.json"
    tokens = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the", b"in", b"be", b"nd"]
    vocab_file.write_text(json.dumps([
        {"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
        for i, t in enumerate(tokens)]))
    size = 1000 + len(tokens)
    theirs = megatron_tokenizer("TikTokenizer", tokenizer_model=str(vocab_file), vocab_size=size,
                                tiktoken_pattern="v2")
    megatron_preprocess(corpus, str(tmp_path / "megatron"), theirs, True)
    run_ours(corpus, tmp_path / "ours", "--tokenizer-type", "TikTokenizer", "--tokenizer-model",
             vocab_file, "--vocab-size", size, "--tiktoken-pattern", "v2", "--append-eod")
    assert_identical(tmp_path / "ours", tmp_path / "megatron")


def test_null_tokenizer_corpus_is_byte_identical(tmp_path, null_corpus):
    """Without --append-eod: the installed megatron-core 0.16.1 puts NullTokenizer's eod one id
    higher than Megatron-LM main does (see test_tokenizers); the ids themselves agree."""
    theirs = megatron_tokenizer("NullTokenizer", vocab_size=500)
    megatron_preprocess(null_corpus, str(tmp_path / "megatron"), theirs, False)
    run_ours(null_corpus, tmp_path / "ours", "--tokenizer-type", "NullTokenizer",
             "--vocab-size", 500)
    assert_identical(tmp_path / "ours", tmp_path / "megatron")
