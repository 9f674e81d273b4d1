"""Memory-mapped indexed dataset: a ``.bin`` of raw tokens and an ``.idx`` describing its sequences.

The format is byte-compatible with Megatron-Core's memory-mapped indexed dataset, so corpora made by
either tool load in the other. ``.idx`` layout (little-endian)::

    b"MMIDIDX\\x00\\x00"   magic
    <Q                   version (1)
    <B                   dtype code (see DTYPE_CODES)
    <Q                   sequence count N
    <Q                   document-index count D (documents + 1)
    int32[N]             sequence lengths (tokens)
    int64[N]             sequence byte pointers into .bin
    int64[D]             document indices: document k is sequences [doc[k], doc[k+1])

A Megatron "multimodal" index may carry N extra int8 sequence modes at the end; they are ignored.

``IndexedDatasetBuilder`` writes through the C++ writer in ``slimtron._C``; ``IndexedDataset`` reads
with numpy memory maps (every access is a zero-copy view).
"""
from __future__ import annotations

import os
import struct
from typing import Optional, Sequence

import numpy as np

from slimtron import _C

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count

DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def best_token_dtype(vocab_size: Optional[int]) -> np.dtype:
    """The smallest dtype Megatron would store token ids of this vocabulary in."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def bin_path_of(path_prefix: str) -> str:
    return path_prefix + ".bin"


def idx_path_of(path_prefix: str) -> str:
    return path_prefix + ".idx"


def _dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        known = ", ".join(str(d) for d in CODE_OF_DTYPE)
        raise ValueError(f"indexed dataset dtype {dtype} is not supported; use one of {known}")
    return CODE_OF_DTYPE[dtype]


def _as_tokens(tokens, dtype: np.dtype) -> np.ndarray:
    """Tokens as a contiguous 1-D array of ``dtype``; integer values that do not fit are an error."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {array.shape}")
    if array.dtype != dtype and array.size and dtype.kind in "iu" and array.dtype.kind in "iub":
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise ValueError(f"token ids {low}..{high} do not fit the corpus dtype {dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


class IndexedDatasetBuilder:
    """Writes ``{path_prefix}.bin`` and ``{path_prefix}.idx``.

    ``bin_path``/``idx_path`` override the file names. With ``temp_suffix`` the files are written
    under ``name + temp_suffix`` and only renamed into place by ``finalize()`` (the index last), so
    an interrupted run never leaves files that look finished. As a context manager the builder
    finalizes on success and removes its partial files on an exception.
    """

    def __init__(self, path_prefix: str, dtype=np.int32, *, bin_path: Optional[str] = None,
                 idx_path: Optional[str] = None, temp_suffix: Optional[str] = None):
        self.dtype = np.dtype(dtype)
        self.bin_path = bin_path or bin_path_of(path_prefix)
        self.idx_path = idx_path or idx_path_of(path_prefix)
        suffix = temp_suffix or ""
        self._writing = (self.bin_path + suffix, self.idx_path + suffix)
        self._writer = _C.IndexedDatasetWriter(self._writing[0], self._writing[1],
                                               _dtype_code(self.dtype), self.dtype.itemsize)

    def add_item(self, tokens) -> None:
        """Appends one sequence (e.g. a sentence) to the current document; see ``end_document``."""
        array = _as_tokens(tokens, self.dtype)
        self._writer.add_sequences(array, np.array([array.size], dtype=np.int64))

    def end_document(self) -> None:
        """Closes the current document (the sequences added since the previous one)."""
        self._writer.end_document()

    def add_document(self, tokens, lengths: Optional[Sequence[int]] = None) -> None:
        """Appends a whole document: one sequence, or several when ``lengths`` splits ``tokens``."""
        array = _as_tokens(tokens, self.dtype)
        lengths = np.array([array.size] if lengths is None else lengths, dtype=np.int64).reshape(-1)
        self._writer.add_sequences(array, lengths)
        self._writer.end_document()

    def add_index(self, path_prefix: str) -> None:
        """Appends another corpus of the same dtype (its tokens, sequences and documents)."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{other.idx_path}: dtype {other.dtype} differs from the builder's "
                             f"{self.dtype}; cannot merge")
        self._writer.append_corpus(np.ascontiguousarray(other.sequence_lengths),
                                   np.ascontiguousarray(other.document_indices), other.bin_path)

    def finalize(self) -> None:
        """Writes the index and moves both files to their final names."""
        self._writer.finalize()
        for written, final in ((self._writing[0], self.bin_path), (self._writing[1], self.idx_path)):
            if written != final:
                os.replace(written, final)

    def abort(self) -> None:
        """Removes the files written so far (a builder that did not finish)."""
        if not self._writer.finalized:
            try:
                self._writer.finalize()  # closes the .bin
            except (OSError, RuntimeError):
                pass
        for path in self._writing:
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._writer.finalized:
                self.finalize()
        else:
            self.abort()


def _read_header(idx_path: str, idx_size: int) -> tuple[np.dtype, int, int]:
    """Validates the fixed header of an .idx; returns (dtype, sequence count, doc-index count)."""
    if idx_size < HEADER.size:
        raise ValueError(f"{idx_path}: truncated index: {idx_size} bytes, shorter than the "
                         f"{HEADER.size}-byte header")
    with open(idx_path, "rb") as f:
        magic, version, code, num_sequences, num_doc_indices = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise ValueError(f"{idx_path}: not an indexed dataset index (magic {magic!r}, "
                         f"expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
    if code not in DTYPE_CODES:
        raise ValueError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    return DTYPE_CODES[code], num_sequences, num_doc_indices


def _check_exists(path: str) -> int:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    return os.path.getsize(path)


class IndexedDataset:
    """Read-only view of a ``.bin``/``.idx`` pair; ``ds[i]`` is sequence ``i`` as a numpy view."""

    def __init__(self, path_prefix: str, mmap: bool = True):
        self.path_prefix = path_prefix
        self.mmap = mmap  # False (--no-mmap-bin-files): each read opens the .bin and reads it
        self.bin_path = bin_path_of(path_prefix)
        self.idx_path = idx_path_of(path_prefix)
        self._open()

    def _open(self) -> None:
        idx_size = _check_exists(self.idx_path)
        bin_size = _check_exists(self.bin_path)
        self.dtype, n, d = _read_header(self.idx_path, idx_size)
        body = n * (4 + 8) + d * 8
        expected = HEADER.size + body
        if idx_size not in (expected, expected + n):  # + n: Megatron's optional int8 modes
            raise ValueError(f"{self.idx_path}: truncated or oversized index: {idx_size} bytes, but "
                             f"its header ({n} sequences, {d} document indices) implies {expected}")
        self._idx_map = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx_map, np.int32, n, offset)
        self.sequence_pointers = np.frombuffer(self._idx_map, np.int64, n, offset + 4 * n)
        self.document_indices = np.frombuffer(self._idx_map, np.int64, d, offset + 12 * n)
        self._check_consistency(bin_size)
        # np.memmap cannot map an empty file; an empty corpus reads from an empty buffer instead.
        self._bin_map = (np.memmap(self.bin_path, dtype=np.uint8, mode="r")
                         if bin_size and self.mmap else np.empty(0, dtype=np.uint8))

    def _check_consistency(self, bin_size: int) -> None:
        n, docs = len(self.sequence_lengths), self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != n:
            first_last = (int(docs[0]), int(docs[-1])) if len(docs) else "none"
            raise ValueError(f"{self.idx_path}: document indices must run from 0 to the sequence "
                             f"count {n}, got {first_last}")
        implied = 0 if n == 0 else int(self.sequence_pointers[-1]) + \
            int(self.sequence_lengths[-1]) * self.dtype.itemsize
        if implied != bin_size:
            raise ValueError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} implies "
                             f"{implied}")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.path_prefix} ({n} sequences)")
        i = i % n
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}..{offset + length} out of range for sequence {i} "
                             f"of {self.path_prefix} ({size} tokens)")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        if not self.mmap:
            return self._read(start, length)
        return np.frombuffer(self._bin_map, self.dtype, length, start)

    def _read(self, start: int, length: int) -> np.ndarray:
        tokens = np.empty(length, self.dtype)
        with open(self.bin_path, "rb", buffering=0) as f:
            f.seek(start)
            f.readinto(memoryview(tokens).cast("B"))
        return tokens

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(idx_path_of(path_prefix)) and os.path.isfile(bin_path_of(path_prefix))

    # Pickled by prefix (DataLoader workers re-map the files instead of copying them).
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix, "mmap": self.mmap}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"], state.get("mmap", True))

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}, {len(self)} sequences, "
                f"{self.num_documents} documents, dtype={self.dtype})")
