"""Tokenizer files built offline for tests: a GPT-2-format vocab.json/merges.txt pair (a small
byte-level BPE trained with `tokenizers` on the bundled corpus, `<|endoftext|>` last, as in GPT-2),
the bundled corpus' first lines, and Megatron-LM's tokenizer objects built from those files."""
import argparse
import io
import json
import os
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = str(REPO / "data" / "tokenizer" / "kjv_bpe8k.model")
BUNDLED_CORPUS = REPO / "data" / "corpus" / "kjv.jsonl.zst"


def corpus_texts(count: int = 200) -> list[str]:
    """The first ``count`` documents of the bundled corpus."""
    with open(BUNDLED_CORPUS, "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        return [json.loads(next(reader))["text"] for _ in range(count)]


def write_gpt2_files(out_dir, vocab_size: int = 1000) -> tuple[str, str]:
    """(vocab.json, merges.txt) of a byte-level BPE in GPT-2's format, trained on the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus_texts(), trainer=trainer)
    core.model.save(out_dir)
    vocab_path, merges_path = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_path) as f:
        vocab = json.load(f)
    vocab["<|endoftext|>"] = len(vocab)
    with open(vocab_path, "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    return vocab_path, merges_path


def megatron_args(tokenizer_type: str, **values) -> argparse.Namespace:
    """The namespace Megatron's build_tokenizer reads, with Megatron-LM main's defaults."""
    defaults = dict(tokenizer_type=tokenizer_type, tokenizer_model=None, vocab_file=None,
                    merge_file=None, vocab_size=None, tokenizer_sentencepiece_legacy=False,
                    tokenizer_special_tokens=None, tokenizer_metadata=None,
                    tokenizer_hf_use_fast=True, trust_remote_code=False,
                    tokenizer_hf_include_special_tokens=True, tiktoken_pattern=None,
                    tiktoken_num_special_tokens=1000)
    defaults.update(values)
    return argparse.Namespace(**defaults)


def megatron_tokenizer(tokenizer_type: str, **values):
    """Megatron-Core's tokenizer (``megatron.core.tokenizers``, what Megatron-LM's preprocess and
    training build) for these flags."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

    return build_tokenizer(megatron_args(tokenizer_type, **values))


def megatron_gpt2_tokenizer(vocab_file: str, merge_file: str, work_dir):
    """Megatron's GPT2BPETokenizer is its HuggingFaceTokenizer wrapper around transformers'
    GPT-2 tokenizer ("gpt2" from the hub) with the user's vocab and merges. The hub is out of
    reach here, so the same wrapper loads a local directory holding what "gpt2" resolves to: the
    GPT-2 tokenizer class, its special tokens, and the two files."""
    import shutil

    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

    work_dir = str(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    shutil.copy(vocab_file, os.path.join(work_dir, "vocab.json"))
    shutil.copy(merge_file, os.path.join(work_dir, "merges.txt"))
    with open(os.path.join(work_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "add_prefix_space": False, "model_max_length": 1024}, f)
    return HuggingFaceTokenizer(work_dir, use_fast=True, include_special_tokens=True)
