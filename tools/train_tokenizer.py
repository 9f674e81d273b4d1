#!/usr/bin/env python3
"""Train the bundled sentencepiece BPE tokenizer (data/tokenizer/kjv_bpe8k.model) on a jsonl corpus.

Special ids follow the Llama convention: unk 0, bos 1, eos 2, plus pad 3. Byte fallback makes every
string encodable (unseen characters, and the newline, which sentencepiece never sees in training
because it trains on lines, become byte tokens). Normalisation is the identity and whitespace is
kept as it is, so that decode(encode(text)) == text.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path
from typing import Iterator

import sentencepiece as spm

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO / "data" / "corpus" / "kjv.jsonl.zst"
DEFAULT_OUTPUT = REPO / "data" / "tokenizer" / "kjv_bpe8k.model"


def read_texts(path: Path, key: str) -> Iterator[str]:
    """The `key` field of every line of a .jsonl, .jsonl.gz or .jsonl.zst file."""
    raw = path.read_bytes()
    if path.name.endswith(".zst"):
        import zstandard
        stream = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True)
        raw = stream.read()
    elif path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)[key]


def training_sentences(paths: list[Path], key: str) -> Iterator[str]:
    """Sentencepiece trains on lines; each non-empty line of each document is one sentence."""
    for path in paths:
        for text in read_texts(path, key):
            for line in text.split("\n"):
                if line.strip():
                    yield line


def train(paths: list[Path], output: Path, vocab_size: int, key: str, threads: int) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(paths, key),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=threads,
        minloglevel=2,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(model.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, nargs="+", default=[DEFAULT_INPUT])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for path in args.input:
        if not path.is_file():
            sys.exit(f"error: --input {path}: no such file")
    train(args.input, args.output, args.vocab_size, args.json_key, args.threads)
    sp = spm.SentencePieceProcessor(model_file=str(args.output))
    print(f"wrote {args.output}: vocab {sp.vocab_size()}, unk {sp.unk_id()} bos {sp.bos_id()} "
          f"eos {sp.eos_id()} pad {sp.pad_id()}")


if __name__ == "__main__":
    main()
