#!/usr/bin/env python3
"""Tokenize jsonl corpora into Megatron-compatible indexed datasets (.bin/.idx).

Each input line is a JSON object; the string under each ``--json-keys`` key is one document of the
output ``{output_prefix}_{key}_document`` (with ``--split-by-meta``, of
``{output_prefix}_{value}_{key}_document``, one corpus per value of that dotted key). Inputs may be
``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` files or globs; blank lines are ignored.

Each document is written as Megatron-LM's tools/preprocess_data.py writes it (without
``--split-sentences``): the tokenizer's ids, then eod under ``--append-eod`` unless the document has
no tokens; a document with no tokens is an empty document. For the same input, flags and tokenizer
the .bin/.idx pair is byte-identical to Megatron-LM's.

Worker processes tokenize batches of lines; the main process writes their results in input order
through the C++ builder, so the output does not depend on ``--workers``. Lines that cannot be used
(not UTF-8, not JSON, not an object, a missing key, a non-string value) are skipped and reported,
or stop the run under ``--strict`` (Megatron-LM's script stops at the first). A compressed input
that is corrupt or cut short stops the run naming the file. Outputs are written under temporary
names and renamed only when every output is complete: a failed or killed run leaves nothing that
looks like a finished corpus.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import gzip
import io
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

try:
    import zstandard
except ImportError:  # only .zst inputs need it
    zstandard = None

from slimtron.config import ConfigError
from slimtron.data.indexed_dataset import IndexedDatasetBuilder, best_token_dtype
from slimtron.data.tokenizers import TOKENIZER_TYPES, build_tokenizer, resolve_tokenizer_type

BATCH_BYTES = 256 * 1024
REPORTED_BAD_LINES = 10
READ_ERRORS = (OSError, EOFError) + ((zstandard.ZstdError,) if zstandard else ())


class BadLine(Exception):
    """A line that cannot become a document; the message is the reason."""


class StrictFailure(Exception):
    """--strict met a bad line; the message is `file:line: reason`."""


# ---------------------------------------------------------------------------------------- reading

def expand_inputs(patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ConfigError(f"--input {pattern}: no such file")
        paths.extend(m for m in matches if m not in paths)
    return paths


def open_binary(path: str) -> io.BufferedIOBase:
    """The decompressed bytes of a .jsonl, .jsonl.gz or .jsonl.zst file."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        if zstandard is None:
            raise ConfigError(f"--input {path}: reading .zst needs the zstandard package")
        return io.BufferedReader(ZstdFramesReader(open(path, "rb")), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


class ZstdFramesReader(io.RawIOBase):
    """The decompressed bytes of one or more concatenated zstd frames. Unlike zstandard's
    stream_reader, input that ends inside a frame (a download cut short) is an EOFError, not a
    quiet end of data."""

    CHUNK = 1 << 20

    def __init__(self, raw):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressor of the frame being read; None between frames
        self._pending = b""  # compressed bytes not yet given to a frame
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            if not self._decompress_more():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress_more(self) -> bool:
        """Adds to self._out; False at a clean end of input (between frames)."""
        if not self._pending:
            self._pending = self._raw.read(self.CHUNK)
            if not self._pending:
                if self._frame is not None:
                    raise EOFError("compressed data ends inside a zstd frame (truncated file)")
                return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        data, self._pending = self._pending, b""
        self._out += self._frame.decompress(data)
        if self._frame.eof:
            self._pending = self._frame.unused_data
            self._frame = None
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()


@dataclass
class Batch:
    file_index: int
    first_line: int  # 1-based number of lines[0] in its file
    lines: list[bytes]


def read_batches(paths: list[str], batch_lines: int) -> Iterator[Batch]:
    """Consecutive lines of each file, in batches of at most batch_lines lines / ~BATCH_BYTES."""
    for file_index, path in enumerate(paths):
        try:
            yield from _file_batches(file_index, path, batch_lines)
        except READ_ERRORS as err:
            raise ValueError(f"{path}: cannot read: {err}") from None


def _file_batches(file_index: int, path: str, batch_lines: int) -> Iterator[Batch]:
    with open_binary(path) as fh:
        lines: list[bytes] = []
        size, first = 0, 1
        for lineno, line in enumerate(fh, 1):
            lines.append(line)
            size += len(line)
            if len(lines) >= batch_lines or size >= BATCH_BYTES:
                yield Batch(file_index, first, lines)
                lines, size, first = [], 0, lineno + 1
        if lines:
            yield Batch(file_index, first, lines)


# -------------------------------------------------------------------------------------- tokenizing

@dataclass(frozen=True)
class TokenizerSpec:
    """What builds the tokenizer (Megatron's tokenizer flags); pickled to the workers."""
    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None
    tiktoken_pattern: Optional[str] = None

    @property
    def names(self) -> str:
        return self.tokenizer_model or self.vocab_file or self.tokenizer_type


@functools.lru_cache(maxsize=None)
def load_tokenizer(spec: TokenizerSpec):
    """One tokenizer per process (workers load theirs on their first batch)."""
    return build_tokenizer(spec.tokenizer_type, spec.tokenizer_model, vocab_file=spec.vocab_file,
                           merge_file=spec.merge_file, vocab_size=spec.vocab_size,
                           tiktoken_pattern=spec.tiktoken_pattern)


def lookup_dotted(obj: dict, dotted: str):
    value = obj
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BadLine(f"lacks split key '{dotted}'")
        value = value[part]
    if not isinstance(value, str):
        raise BadLine(f"split key '{dotted}' is not a string")
    if not value:
        raise BadLine(f"split key '{dotted}' is empty")
    return value


def parse_line(line: bytes, keys: list[str], split_key: Optional[str]):
    """(split value or None, {key: text}) of one line; raises BadLine."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLine("not valid UTF-8") from None
    try:
        obj = json.loads(decoded)
    except ValueError:
        raise BadLine("not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object")
    texts = {}
    for key in keys:
        if key not in obj:
            raise BadLine(f"lacks key '{key}'")
        if not isinstance(obj[key], str):
            raise BadLine(f"key '{key}' is not a string")
        texts[key] = obj[key]
    return (lookup_dotted(obj, split_key) if split_key else None), texts


@dataclass
class OutputChunk:
    """Documents of one output from one batch: tokens back to back, and each one's length."""
    tokens: list = field(default_factory=list)
    lengths: list = field(default_factory=list)


@dataclass
class BatchResult:
    file_index: int
    nbytes: int = 0
    documents: int = 0  # documents written, over all outputs
    empty: int = 0  # documents written without tokens (text the tokenizer turns into nothing)
    bad: list = field(default_factory=list)  # (line number, reason)
    outputs: dict = field(default_factory=dict)  # (split value, key) -> OutputChunk


@dataclass
class Encoder:
    """Turns a batch of lines into token arrays; pickled to the workers (without its tokenizer)."""
    tokenizer: TokenizerSpec
    keys: list
    split_key: Optional[str]
    append_eod: bool
    dtype: np.dtype

    def encode_batch(self, batch: Batch) -> BatchResult:
        tokenizer = load_tokenizer(self.tokenizer)
        result = BatchResult(batch.file_index)
        for lineno, line in enumerate(batch.lines, batch.first_line):
            result.nbytes += len(line)
            if not line.strip():
                continue
            try:
                split_value, texts = parse_line(line, self.keys, self.split_key)
            except BadLine as bad:
                result.bad.append((lineno, str(bad)))
                continue
            for key, text in texts.items():
                result.documents += 1
                ids = list(tokenizer.tokenize(text))
                if not ids:
                    result.empty += 1
                elif self.append_eod:  # Megatron: no eod after a document without tokens
                    ids.append(tokenizer.eod)
                chunk = result.outputs.setdefault((split_value, key), OutputChunk())
                chunk.tokens.extend(ids)
                chunk.lengths.append(len(ids))
        for chunk in result.outputs.values():
            chunk.tokens = np.asarray(chunk.tokens, dtype=self.dtype)
            chunk.lengths = np.asarray(chunk.lengths, dtype=np.int64)
        return result


# ----------------------------------------------------------------------------------------- writing

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def output_prefix(prefix: str, split_value: Optional[str], key: str) -> str:
    if split_value is None:
        return f"{prefix}_{key}_document"
    return f"{prefix}_{SAFE_NAME.sub('_', split_value)}_{key}_document"


class Outputs:
    """One builder per (split value, key), created on first use.

    Builders finalize into temporary names; ``commit`` renames every output only after all are
    complete (indexes last, since a reader needs the .idx), so nothing looks finished before then.
    """

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = dtype
        self.temp_suffix = f".tmp{os.getpid()}"
        self.builders: dict = {}
        self.names: dict = {}  # output prefix -> split value, to catch two values with one name
        self.documents: dict = {}
        self.tokens: dict = {}

    def _builder(self, split_value, key) -> IndexedDatasetBuilder:
        ident = (split_value, key)
        if ident not in self.builders:
            name = output_prefix(self.prefix, split_value, key)
            if name in self.names:
                raise ConfigError(f"--split-by-meta values {self.names[name]!r} and "
                                  f"{split_value!r} both map to output {name}")
            self.names[name] = split_value
            self.builders[ident] = IndexedDatasetBuilder(
                name, self.dtype, bin_path=name + ".bin" + self.temp_suffix,
                idx_path=name + ".idx" + self.temp_suffix)
            self.documents[ident] = 0
            self.tokens[ident] = 0
        return self.builders[ident]

    def add(self, result: BatchResult) -> None:
        for ident, chunk in result.outputs.items():
            builder = self._builder(*ident)
            start = 0
            for length in chunk.lengths.tolist():
                # A document without tokens has no sequence at all, as Megatron writes it.
                builder.add_document(chunk.tokens[start:start + length], [length] if length else [])
                start += length
            self.documents[ident] += len(chunk.lengths)
            self.tokens[ident] += len(chunk.tokens)

    def commit(self) -> None:
        for builder in self.builders.values():
            builder.finalize()
        builders = self.builders.values()
        for written in [b.bin_path for b in builders] + [b.idx_path for b in builders]:
            os.replace(written, written[:-len(self.temp_suffix)])

    def abort(self) -> None:
        for builder in self.builders.values():
            builder.abort()


# ------------------------------------------------------------------------------------------ driver

@dataclass
class Progress:
    start: float = field(default_factory=time.monotonic)
    documents: int = 0
    nbytes: int = 0
    tokens: int = 0
    empty: int = 0
    bad_count: int = 0
    bad_examples: list = field(default_factory=list)
    next_log: int = 0

    def rates(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.nbytes / 1e6 / elapsed:.2f} MB/s, "
                f"{self.tokens / elapsed:,.0f} tokens/s")


def run(args) -> tuple[Outputs, Progress]:
    paths = expand_inputs(args.input)
    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                         args.merge_file, args.vocab_size, args.tiktoken_pattern)
    tokenizer = load_tokenizer(spec)
    if args.append_eod and tokenizer.eod is None:
        raise ConfigError(f"--append-eod: tokenizer {spec.names} has no eod token")
    dtype = best_token_dtype(tokenizer.vocab_size)
    encoder = Encoder(spec, args.json_keys, args.split_by_meta, args.append_eod, dtype)
    outputs = Outputs(args.output_prefix, dtype)
    progress = Progress(next_log=args.log_interval)
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
    try:
        with pool or contextlib.nullcontext():
            # imap keeps input order; a task is a whole batch so IPC stays small next to the work.
            encode = pool.imap if pool else map
            results = encode(encoder.encode_batch, read_batches(paths, args.lines_per_batch))
            write_in_order(results, outputs, progress, paths, args)
        outputs.commit()
    except BaseException:
        outputs.abort()
        raise
    return outputs, progress


def write_in_order(results, outputs: Outputs, progress: Progress, paths: list[str], args) -> None:
    for result in results:
        account(progress, result, paths, args.strict)
        outputs.add(result)
        while progress.documents >= progress.next_log:
            print(f"processed {progress.documents} documents ({progress.rates()})",
                  file=sys.stderr, flush=True)
            progress.next_log += args.log_interval


def account(progress: Progress, result: BatchResult, paths: list[str], strict: bool) -> None:
    for lineno, reason in result.bad:
        where = f"{paths[result.file_index]}:{lineno}: {reason}"
        if strict:
            raise StrictFailure(where)
        if len(progress.bad_examples) < REPORTED_BAD_LINES:
            progress.bad_examples.append(where)
    progress.bad_count += len(result.bad)
    progress.documents += result.documents
    progress.nbytes += result.nbytes
    progress.empty += result.empty
    progress.tokens += sum(len(chunk.tokens) for chunk in result.outputs.values())


def print_summary(outputs: Outputs, progress: Progress) -> None:
    for ident in sorted(outputs.builders, key=lambda i: (i[0] or "", i[1])):
        name = output_prefix(outputs.prefix, *ident)
        print(f"{name}: {outputs.documents[ident]} documents, {outputs.tokens[ident]} tokens")
    print(f"total: {progress.documents} documents, {progress.tokens} tokens, "
          f"{progress.nbytes / 1e6:.2f} MB in {time.monotonic() - progress.start:.1f} s "
          f"({progress.rates()})")
    print(f"{progress.empty} documents without tokens (written empty, as Megatron-LM does)")
    print(f"skipped {progress.bad_count} bad lines")
    for where in progress.bad_examples:
        print(f"  {where}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="jsonl files or globs (.jsonl, .jsonl.gz, .jsonl.zst)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract, one output per key")
    group.add_argument("--split-by-meta", default=None, metavar="DOTTED_KEY",
                       help="one output per value of this key, e.g. meta.redpajama_set_name")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first bad line instead of skipping it")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default=None, choices=sorted(TOKENIZER_TYPES),
                       help="default GPT2BPETokenizer when --vocab-file and --merge-file are given")
    group.add_argument("--tokenizer-model", default=None,
                       help="sentencepiece model, HuggingFace tokenizer directory or tiktoken "
                            "vocabulary")
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer's ids; TikTokenizer's vocabulary size")
    group.add_argument("--tiktoken-pattern", default=None, choices=["v1", "v2"])
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's eod id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True)
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="documents between progress lines")
    group.add_argument("--lines-per-batch", type=int, default=1024,
                       help="lines per worker task (a task also ends after ~256 KB)")
    args = parser.parse_args(argv)
    args.tokenizer_type = resolve_tokenizer_type(args.tokenizer_type, args.vocab_file,
                                                 args.merge_file)
    if args.tokenizer_type is None:
        parser.error("--tokenizer-type is required (or --vocab-file with --merge-file for "
                     "GPT-2 BPE)")
    for flag in ("workers", "log_interval", "lines_per_batch"):
        value = getattr(args, flag)
        if value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    out_dir = os.path.dirname(args.output_prefix) or "."
    if not os.path.isdir(out_dir):
        parser.error(f"--output-prefix {args.output_prefix}: directory {out_dir} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The worker processes are the parallelism; a HuggingFace tokenizer's own threads would only
    # contend with them (and it warns when forked after using them).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        outputs, progress = run(args)
    except StrictFailure as failure:
        print(f"error: {failure} (--strict; no output written)", file=sys.stderr)
        return 1
    except ValueError as err:  # ConfigError, or an input file that cannot be read
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(outputs, progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
