"""GPT dataset over an indexed corpus, with Megatron's index semantics, and the on-disk index cache.

A split ("969,30,1") gives each of train/valid/test a contiguous range of documents. Over a range,
``GPTDataset`` builds three indices, exactly as Megatron-Core's GPTDataset does:

- document index: the range's sequences repeated for as many epochs as ``num_samples`` needs and
  shuffled with ``numpy.random.RandomState(seed)`` (a last epoch that would be less than 80% used
  is shuffled separately, so the earlier epochs are seen whole);
- sample index (C++ ``build_sample_idx``): where each sample of ``seq_length + 1`` tokens starts in
  the concatenation of the shuffled documents (a sample may span documents);
- shuffle index: a permutation of the samples, from the same random state.

Sample ``i`` therefore depends only on the corpus and the constructor's arguments, never on the
machine or the data-parallel layout, so training resumes exactly from a consumed-samples count.
Indices are cached as ``.npy`` files keyed by a hash of all they depend on (see ``load_or_build``).
Each index is int32 when its values fit (as Megatron's), else int64: half the bytes on disk and in
memory for any corpus below 2^31 documents and samples. Shuffling draws the same permutation
whatever the integer type, so the samples do not depend on it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from slimtron import _C
from slimtron.config import ConfigError
from slimtron.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
# Megatron's rule: when the last epoch would use less than this fraction of its samples, it is
# shuffled on its own so that it does not displace samples of the complete epochs.
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80
CACHE_FORMAT_VERSION = 2  # 2: int32 indices where the values fit
INT32_MAX = np.iinfo(np.int32).max


def index_dtype(largest_value: int) -> np.dtype:
    """The narrowest of int32 and int64 that holds 0..largest_value."""
    return np.dtype(np.int32) if largest_value <= INT32_MAX else np.dtype(np.int64)


# ---------------------------------------------------------------------------------------- splits

def parse_split(split: str) -> list[float]:
    """"969,30,1" -> normalised train/valid/test fractions (missing trailing parts are 0).
    Quotes around the value ("'99,1,0'", as Megatron's Llama example passes it) and Megatron's
    "/" separator are accepted; anything else that is not a number (a sign, a letter) is an error
    rather than being skipped as Megatron's regex skips it."""
    text = str(split).strip().strip("'\"").strip()
    parts = re.split(r"\s*[,/]\s*", text)
    if not text or not all(re.fullmatch(r"[0-9]*\.?[0-9]+", p) for p in parts):
        raise ConfigError(f"--split {split!r}: expected up to three comma-separated numbers")
    values = [float(p) for p in parts]
    if len(values) > 3 or sum(values) <= 0:
        raise ConfigError(f"--split {split!r}: expected one to three non-negative numbers with a "
                          "positive sum")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(split: str, num_documents: int) -> list[Optional[tuple[int, int]]]:
    """Document range [begin, end) of each of train/valid/test; None for a zero fraction."""
    fractions = parse_split(split)
    bounds = np.concatenate([[0.0], np.cumsum(fractions)])
    ranges = []
    for fraction, low, high in zip(fractions, bounds[:-1], bounds[1:]):
        if fraction == 0:
            ranges.append(None)
        else:
            ranges.append((int(round(low * num_documents)), int(round(high * num_documents))))
    return ranges


# ----------------------------------------------------------------------------------- index cache

def _rank(pstate) -> int:
    if pstate is not None:
        return pstate.rank
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class IndexCache:
    """A set of named arrays saved as ``.npy`` under a key that hashes their description.

    A manifest (written last) records the description and each array's shape, dtype and CRC-32;
    anything that does not match it (a partial write, a corrupt or foreign file) is not trusted.
    """

    def __init__(self, cache_dir: str, label: str, description: dict):
        self.description = json.loads(json.dumps(description, sort_keys=True))
        digest = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()
        self.stem = os.path.join(cache_dir, f"{label}-{digest[:20]}")
        self.manifest_path = self.stem + "-manifest.json"

    def array_path(self, name: str) -> str:
        return f"{self.stem}-{name}.npy"

    def load(self) -> Optional[dict[str, np.ndarray]]:
        """The cached arrays (memory-mapped), or None when absent or not trustworthy."""
        if not os.path.isfile(self.manifest_path):
            return None
        try:
            with open(self.manifest_path) as f:
                manifest = json.load(f)
            if manifest.get("description") != self.description:
                raise ValueError("description differs")
            return {name: self._load_array(name, meta) for name, meta in manifest["arrays"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("index cache %s is not usable (%s); rebuilding", self.stem, err)
            return None

    def _load_array(self, name: str, meta: dict) -> np.ndarray:
        array = np.load(self.array_path(name), mmap_mode="r", allow_pickle=False)
        if list(array.shape) != meta["shape"] or array.dtype.str != meta["dtype"]:
            raise ValueError(f"{name} has shape {array.shape} {array.dtype}, manifest says "
                             f"{meta['shape']} {meta['dtype']}")
        if _crc32(array) != meta["crc32"]:
            raise ValueError(f"{name} fails its checksum")
        return array

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Writes every array, then the manifest; each file appears atomically (temp + rename)."""
        os.makedirs(os.path.dirname(self.stem), exist_ok=True)
        meta = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            _atomic_write(self.array_path(name), lambda f, a=array: np.save(f, a, allow_pickle=False))
            meta[name] = {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": _crc32(array)}
        manifest = json.dumps({"description": self.description, "arrays": meta}, indent=1, sort_keys=True)
        _atomic_write(self.manifest_path, lambda f: f.write(manifest.encode()))


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _atomic_write(path: str, write: Callable) -> None:
    temp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp, "wb") as f:
            write(f)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def load_or_build(cache: Optional[IndexCache], build: Callable[[], dict], pstate=None) -> tuple[dict, bool]:
    """(arrays, whether this rank built them). Rank 0 builds and saves while the others wait at a
    barrier, then they load. A rank that still finds no valid cache (e.g. a node-local cache
    directory) builds its own copy: the result is the same, as building is deterministic.
    Every rank must call this the same number of times (it holds one barrier).
    """
    if cache is None:
        return build(), True
    rank = _rank(pstate)
    arrays = cache.load() if rank == 0 else None
    built = rank == 0 and arrays is None
    if built:
        arrays = _build_and_save(cache, build)
    _barrier()
    if rank != 0:
        arrays = cache.load()
        if arrays is None:
            logger.warning("rank %d: no valid index cache at %s after rank 0 built it; building",
                           rank, cache.stem)
            arrays = _build_and_save(cache, build)
            built = True
    return arrays, built


def _build_and_save(cache: IndexCache, build: Callable[[], dict]) -> dict:
    arrays = build()
    try:
        cache.save(arrays)
    except OSError as err:
        logger.warning("cannot write index cache %s (%s); indices kept in memory only", cache.stem, err)
    return arrays


# ------------------------------------------------------------------------------- document masks

def get_ltor_masks_and_position_ids(tokens: torch.Tensor, eod_id: Optional[int], *,
                                    reset_position_ids: bool, reset_attention_mask: bool,
                                    eod_mask_loss: bool):
    """Megatron's left-to-right masks for one sample ``tokens`` ``[s]``, in the micro-batch
    convention (docs/CONVENTIONS.md): ``(loss_mask [s] float32, position_ids [s] int64,
    segment_ids [s] int64 or None)``.

    The eod token closes its document: the tokens after it start the next one. With
    ``reset_attention_mask`` a token attends only to its own document (``segment_ids`` numbers
    the documents; None without it: one document per sample); with ``reset_position_ids``
    positions restart at 0 after each eod; with ``eod_mask_loss`` eod inputs carry no loss.
    """
    s = tokens.shape[0]
    is_eod = tokens == eod_id if eod_id is not None else torch.zeros(s, dtype=torch.bool)
    loss_mask = torch.ones(s, dtype=torch.float32, device=tokens.device)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    index = torch.arange(s, dtype=torch.int64, device=tokens.device)
    position_ids = index
    if reset_position_ids:
        eod_at = torch.where(is_eod, index, torch.full_like(index, -1))
        last_eod_before = torch.cat([eod_at.new_full((1,), -1), eod_at[:-1]]).cummax(0).values
        position_ids = index - (last_eod_before + 1)
    segment_ids = None
    if reset_attention_mask:
        segment_ids = torch.cumsum(is_eod, 0) - is_eod.long()  # eods strictly before each token
    return loss_mask, position_ids, segment_ids


# ------------------------------------------------------------------------------------ GPT dataset

def _num_epochs(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int) -> int:
    """Fewest epochs holding num_samples samples of seq_length + 1 tokens (one epoch when None)."""
    if num_samples is None:
        return 1
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_gpt_indices(sizes: np.ndarray, sequences: np.ndarray, num_samples: Optional[int],
                      seq_length: int, seed: int) -> dict[str, np.ndarray]:
    """The document, sample and shuffle indices over ``sequences`` (ids into ``sizes``)."""
    tokens_per_epoch = int(sizes[sequences].sum(dtype=np.int64))
    num_epochs = _num_epochs(tokens_per_epoch, num_samples, seq_length)
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    separate_last = (num_epochs > 1 and num_samples - samples_before_last
                     < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch))
    rng = np.random.RandomState(seed)
    doc_dtype = index_dtype(len(sizes) - 1)
    if separate_last:
        doc_idx = np.concatenate([_shuffled_epochs(sequences, num_epochs - 1, rng, doc_dtype),
                                  _shuffled_epochs(sequences, 1, rng, doc_dtype)])
    else:
        doc_idx = _shuffled_epochs(sequences, num_epochs, rng, doc_dtype)
    # Rows hold positions in doc_idx and offsets inside a document (int32 sizes: always fit).
    build_sample_idx = (_C.build_sample_idx_int32 if index_dtype(len(doc_idx)) == np.int32
                        else _C.build_sample_idx)
    sample_idx = build_sample_idx(np.ascontiguousarray(sizes, dtype=np.int32), doc_idx, seq_length,
                                  num_epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    first = samples_before_last if separate_last else total
    sample_dtype = index_dtype(total)
    shuffle_idx = np.concatenate([_shuffled_range(0, first, rng, sample_dtype),
                                  _shuffled_range(first, total, rng, sample_dtype)])
    return {"document_index": doc_idx, "sample_index": sample_idx, "shuffle_index": shuffle_idx}


def _shuffled_epochs(sequences: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                     dtype: np.dtype) -> np.ndarray:
    doc_idx = np.tile(sequences.astype(dtype), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def _shuffled_range(start: int, stop: int, rng: np.random.RandomState,
                    dtype: np.dtype) -> np.ndarray:
    if start == stop:  # an empty range draws nothing from rng
        return np.empty(0, dtype=dtype)
    permutation = np.arange(start, stop, dtype=dtype)
    rng.shuffle(permutation)
    return permutation


def default_cache_dir(indexed: IndexedDataset) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(indexed.path_prefix)), "cache")


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length`` tokens (plus the shifted labels) from documents
    ``document_range = (begin, end)`` of an indexed corpus.

    Every sequence of those documents is one unit of the shuffle (Megatron treats each sequence of
    a GPT corpus as a document). ``len()`` is every sample the built epochs hold, at least
    ``num_samples``; with ``num_samples=None`` one epoch is built. ``cache_dir=None`` caches under
    ``<corpus dir>/cache/``.
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int],
                 num_samples: Optional[int], seq_length: int, seed: int,
                 cache_dir: Optional[str] = None, *, eod_id: Optional[int] = None,
                 eod_mask_loss: bool = False, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, vocab_size: Optional[int] = None,
                 pstate=None):
        for flag, on in (("--eod-mask-loss", eod_mask_loss),
                         ("--reset-position-ids", reset_position_ids),
                         ("--reset-attention-mask", reset_attention_mask)):
            if on and eod_id is None:
                raise ConfigError(f"{flag} needs the tokenizer's end-of-document id (eod_id)")
        if seq_length < 1:
            raise ConfigError(f"--seq-length must be positive, got {seq_length}")
        self.indexed = indexed
        self.seq_length = seq_length
        self.eod_id = eod_id
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.vocab_size = vocab_size
        self.sequences = self._sequences_of(indexed, document_range)
        self.cache = IndexCache(cache_dir or default_cache_dir(indexed), self._cache_label(),
                                self._description(document_range, num_samples, seed))
        def build():
            return build_gpt_indices(indexed.sequence_lengths, self.sequences, num_samples,
                                     seq_length, seed)

        arrays, self.built_indices = load_or_build(self.cache, build, pstate)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self.position_ids = torch.arange(seq_length, dtype=torch.int64, device="cpu")

    @staticmethod
    def _sequences_of(indexed: IndexedDataset, document_range: tuple[int, int]) -> np.ndarray:
        begin, end = document_range
        if not 0 <= begin < end <= indexed.num_documents:
            raise ConfigError(f"{indexed.path_prefix}: document range {begin}..{end} is empty or "
                              f"outside its {indexed.num_documents} documents")
        first, last = int(indexed.document_indices[begin]), int(indexed.document_indices[end])
        if indexed.sequence_lengths[first:last].sum(dtype=np.int64) == 0:
            raise ConfigError(f"{indexed.path_prefix}: documents {begin}..{end} hold no tokens")
        return np.arange(first, last, dtype=np.int64)

    def _cache_label(self) -> str:
        return f"{os.path.basename(self.indexed.path_prefix)}-gpt"

    def _description(self, document_range, num_samples, seed) -> dict:
        idx_stat = os.stat(self.indexed.idx_path)
        return {"class": "GPTDataset", "format": CACHE_FORMAT_VERSION,
                "prefix": os.path.abspath(self.indexed.path_prefix), "idx_bytes": idx_stat.st_size,
                "idx_mtime_ns": idx_stat.st_mtime_ns, "bin_bytes": os.path.getsize(self.indexed.bin_path),
                "document_range": list(document_range), "num_samples": num_samples,
                "seq_length": self.seq_length, "seed": seed}

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample ``i`` (int64)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        j = int(self.shuffle_index[i])
        (first, first_offset), (last, last_offset) = self.sample_index[j], self.sample_index[j + 1]
        doc = self.document_index
        if first == last:
            return self.indexed.get(int(doc[first]), int(first_offset),
                                    int(last_offset - first_offset + 1)).astype(np.int64)
        parts = [self.indexed.get(int(doc[first]), int(first_offset))]
        parts += [self.indexed.get(int(d)) for d in doc[first + 1:last]]
        parts.append(self.indexed.get(int(doc[last]), 0, int(last_offset + 1)))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.sample_tokens(i))
        self._check_vocabulary(i, text)
        tokens, labels = text[:-1], text[1:]
        loss_mask, position_ids, segment_ids = get_ltor_masks_and_position_ids(
            tokens, self.eod_id, reset_position_ids=self.reset_position_ids,
            reset_attention_mask=self.reset_attention_mask, eod_mask_loss=self.eod_mask_loss)
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                  "position_ids": position_ids.clone()}
        if segment_ids is not None:
            sample["segment_ids"] = segment_ids
        return sample

    def _check_vocabulary(self, i: int, text: torch.Tensor) -> None:
        """A corpus made with a larger tokenizer than the model's stops here, not in an index
        error deep inside the embedding."""
        if self.vocab_size is not None and int(text.max()) >= self.vocab_size:
            raise ValueError(f"{self.indexed.path_prefix}: sample {i} holds token id "
                             f"{int(text.max())}, outside the model's vocabulary of "
                             f"{self.vocab_size} (was the corpus made with another tokenizer?)")


def gpt_datasets_for_prefix(prefix: str, split: str, num_samples: Sequence[Optional[int]],
                            seq_length: int, seed: int, **kwargs) -> list[Optional[GPTDataset]]:
    """train/valid/test GPTDatasets of one corpus; None for a split that is empty or not wanted.
    ``mmap_bin_files=False`` (--no-mmap-bin-files) reads the .bin without memory-mapping it."""
    indexed = IndexedDataset(prefix, mmap=kwargs.pop("mmap_bin_files", True))
    ranges = split_document_ranges(split, indexed.num_documents)
    datasets = []
    for name, document_range, wanted in zip(SPLIT_NAMES, ranges, num_samples):
        if document_range is None or wanted == 0:
            datasets.append(None)
        elif document_range[0] == document_range[1]:
            logger.warning("%s: the %s split of %r has no documents (%d in the corpus); no %s data",
                           prefix, name, split, indexed.num_documents, name)
            datasets.append(None)
        else:
            datasets.append(GPTDataset(indexed, document_range, wanted, seq_length, seed, **kwargs))
    return datasets
