"""Tokenizers with Megatron-LM's ``--tokenizer-type`` names and Megatron-LM's behaviour.

Every tokenizer has ``vocab_size``, ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str`` and
the special ids ``eod`` (appended after each document by ``--append-eod``), ``bos``, ``eos`` and
``pad`` (None where the tokenizer has no such token). The behaviour is that of Megatron-LM's main
branch (``megatron.core.tokenizers``, which its ``tools/preprocess_data.py`` and ``pretrain_gpt.py``
use), so the same preprocess command gives the same ids in both tools:

- ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``: one sentencepiece
  model, as Megatron's one sentencepiece wrapper for all three names (``legacy=False``): the model's
  own pieces, no bos or eos added to the text, no extra special tokens, ``eod`` is the model's eos.
- ``GPT2BPETokenizer``: GPT-2's byte-level BPE from ``--vocab-file`` (vocab.json) and
  ``--merge-file`` (merges.txt), as ``transformers``' GPT-2 tokenizer that Megatron wraps:
  ``<|endoftext|>`` is a special token (added after the vocabulary if missing) and is eod, bos and
  eos; no padding token.
- ``HuggingFaceTokenizer``: ``transformers.AutoTokenizer`` from a local directory (never a
  download); ``tokenize`` adds the special tokens the tokenizer itself defines (Megatron's default),
  ``eod`` is eos.
- ``NullTokenizer``: ``--vocab-size N`` ids and no text: ``tokenize("3 1 4")`` is ``[3, 1, 4]``;
  ``eod`` is ``N - 1``; no padding token.
- ``TikTokenizer``: a tiktoken vocabulary file (Megatron's JSON format), when ``tiktoken`` is
  installed.

Every load failure (a missing file, a file that is not a model of that kind) is one ConfigError
naming the file.
"""
from __future__ import annotations

import base64
import json
import os
from abc import ABC, abstractmethod
from typing import Iterable, Optional

from slimtron.config import ConfigError


class Tokenizer(ABC):
    """The interface the rest of slimtron relies on."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the model's real vocabulary)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        ...

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        ...

    @property
    @abstractmethod
    def eos(self) -> Optional[int]:
        ...

    @property
    @abstractmethod
    def bos(self) -> Optional[int]:
        ...

    @property
    @abstractmethod
    def pad(self) -> Optional[int]:
        ...

    @property
    def eod(self) -> Optional[int]:
        """Id appended after each document (``--append-eod``)."""
        return self.eos


def _optional_id(value: Optional[int]) -> Optional[int]:
    """Sentencepiece reports a missing special token as -1, transformers as None."""
    return None if value is None or value < 0 else int(value)


def _require_file(flag: str, path: Optional[str], what: str) -> str:
    if not path or not os.path.isfile(path):
        raise ConfigError(f"{flag} {path!r}: no such {what} file")
    return path


def _load(path: str, what: str, loader):
    """``loader()``, with any failure to read ``path`` as one ConfigError naming it."""
    try:
        return loader()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - each library has its own exceptions for bad files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: not a {what} ({reason})") from None


def _ids(ids: Iterable[int]) -> list[int]:
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------- sentencepiece

class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model used as Megatron-LM does for this name (see the module docstring)."""

    def __init__(self, model_file: str):
        import sentencepiece

        _require_file("--tokenizer-model", model_file, "sentencepiece model")
        self.model_file = model_file
        self._sp = _load(model_file, "sentencepiece model",
                         lambda: sentencepiece.SentencePieceProcessor(model_file=model_file))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode_ids(_ids(ids))

    @property
    def eos(self) -> Optional[int]:
        return _optional_id(self._sp.eos_id())

    @property
    def bos(self) -> Optional[int]:
        return _optional_id(self._sp.bos_id())

    @property
    def pad(self) -> Optional[int]:
        return _optional_id(self._sp.pad_id())


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """Megatron-LM gives this name the same sentencepiece wrapper."""


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM gives this name the same sentencepiece wrapper (no bos added to the text)."""


# ----------------------------------------------------------------------------------------- GPT-2

GPT2_END_OF_TEXT = "<|endoftext|>"


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE from a vocab.json / merges.txt pair, built on ``tokenizers``."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import AddedToken, Tokenizer as CoreTokenizer, decoders, models, pre_tokenizers

        _require_file("--vocab-file", vocab_file, "GPT-2 vocabulary (vocab.json)")
        _require_file("--merge-file", merge_file, "GPT-2 merges (merges.txt)")
        self.vocab_file, self.merge_file = vocab_file, merge_file
        vocab = _load(vocab_file, "GPT-2 vocabulary (vocab.json)", lambda: _read_vocab(vocab_file))
        merges = _load(merge_file, "GPT-2 merges file (merges.txt)", lambda: _read_merges(merge_file))
        core = _load(vocab_file, "GPT-2 vocabulary/merges pair", lambda: CoreTokenizer(
            models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                       fuse_unk=False)))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        core.add_special_tokens([AddedToken(GPT2_END_OF_TEXT, special=True, normalized=False)])
        self._core = core
        self._eot = core.token_to_id(GPT2_END_OF_TEXT)

    @property
    def vocab_size(self) -> int:
        return self._core.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._core.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._core.decode(_ids(ids), skip_special_tokens=True)

    @property
    def eos(self) -> Optional[int]:
        return self._eot

    @property
    def bos(self) -> Optional[int]:
        return self._eot

    @property
    def pad(self) -> Optional[int]:
        return None


def _read_vocab(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError("expected a JSON object of token -> id")
    return vocab


def _read_merges(path: str) -> list:
    merges = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if (lineno == 1 and line.startswith("#version")) or not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"line {lineno} is not a pair of tokens")
            merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------------- HuggingFace

class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, pretrained_dir: str, add_special_tokens: bool = True, **kwargs):
        if not pretrained_dir or not os.path.isdir(pretrained_dir):
            raise ConfigError(f"--tokenizer-model {pretrained_dir!r}: no such tokenizer directory "
                              "(HuggingFaceTokenizer loads local directories only)")
        from transformers import AutoTokenizer

        self.model_file = pretrained_dir
        self.add_special_tokens = add_special_tokens
        self._tok = _load(pretrained_dir, "HuggingFace tokenizer directory",
                          lambda: AutoTokenizer.from_pretrained(pretrained_dir,
                                                                local_files_only=True, **kwargs))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_ids(ids), skip_special_tokens=True)

    @property
    def eos(self) -> Optional[int]:
        return _optional_id(self._tok.eos_token_id)

    @property
    def bos(self) -> Optional[int]:
        return _optional_id(self._tok.bos_token_id)

    @property
    def pad(self) -> Optional[int]:
        return _optional_id(self._tok.pad_token_id)


# ------------------------------------------------------------------------------------------ null

class NullTokenizer(Tokenizer):
    """No text model: ``vocab_size`` ids written as space-separated numbers; eod is the last id."""

    def __init__(self, vocab_size: Optional[int]):
        if vocab_size is None or int(vocab_size) < 1:
            raise ConfigError(f"--tokenizer-type NullTokenizer needs --vocab-size (a positive "
                              f"number), got {vocab_size}")
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(" ")]
        except ValueError:
            raise ValueError(f"NullTokenizer reads space-separated ids, got {text[:40]!r}") from None

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(i) for i in _ids(ids))

    @property
    def eos(self) -> Optional[int]:
        return self._vocab_size - 1

    @property
    def bos(self) -> Optional[int]:
        return None

    @property
    def pad(self) -> Optional[int]:
        return None


# -------------------------------------------------------------------------------------- tiktoken

TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
          r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
TIKTOKEN_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]
TIKTOKEN_DEFAULT_VOCAB = 2 ** 17  # Megatron's size when --vocab-size is not given


class TikTokenizer(Tokenizer):
    """Megatron's tiktoken format: a JSON list of {"rank", "token_bytes" (base64), "token_str"}.
    The first ``num_special_tokens`` ids are special (``<unk> <s> </s> <mask> <pad> <cls> <sep>``,
    then ``<SPECIAL_i>`` fillers, recognised in text); the BPE ranks follow them, cut so that the
    whole vocabulary is ``vocab_size`` (default 2**17, as Megatron)."""

    def __init__(self, vocab_file: str, pattern: str = "v2", vocab_size: Optional[int] = None,
                 num_special_tokens: int = 1000):
        try:
            import tiktoken
        except ImportError:
            raise ConfigError("--tokenizer-type TikTokenizer needs the tiktoken package "
                              "(pip install tiktoken)") from None
        _require_file("--tokenizer-model", vocab_file, "tiktoken vocabulary")
        if pattern not in TIKTOKEN_PATTERNS:
            raise ConfigError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}")
        vocab_size = TIKTOKEN_DEFAULT_VOCAB if vocab_size is None else int(vocab_size)
        if not len(TIKTOKEN_SPECIAL_TOKENS) <= num_special_tokens < vocab_size:
            raise ConfigError(f"--vocab-size {vocab_size} must exceed the {num_special_tokens} "
                              "tiktoken special tokens")
        ranks = _load(vocab_file, "tiktoken vocabulary (JSON list of ranks)",
                      lambda: _read_tiktoken(vocab_file, vocab_size - num_special_tokens,
                                             num_special_tokens))
        specials = TIKTOKEN_SPECIAL_TOKENS + [f"<SPECIAL_{i}>" for i in
                                              range(len(TIKTOKEN_SPECIAL_TOKENS), num_special_tokens)]
        self._num_special = num_special_tokens
        self._vocab_size = vocab_size
        self._enc = tiktoken.Encoding(name=os.path.basename(vocab_file),
                                      pat_str=TIKTOKEN_PATTERNS[pattern], mergeable_ranks=ranks,
                                      special_tokens={t: i for i, t in enumerate(specials)})

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._enc.decode([i for i in _ids(ids) if i >= self._num_special])

    @property
    def eos(self) -> Optional[int]:
        return TIKTOKEN_SPECIAL_TOKENS.index("</s>")

    @property
    def bos(self) -> Optional[int]:
        return TIKTOKEN_SPECIAL_TOKENS.index("<s>")

    @property
    def pad(self) -> Optional[int]:
        return TIKTOKEN_SPECIAL_TOKENS.index("<pad>")


def _read_tiktoken(path: str, inner_size: int, shift: int) -> dict:
    """Token bytes -> id (rank + shift) of the first ``inner_size`` ranks; the file must hold
    exactly that many or more (Megatron requires every id below the vocabulary size to exist)."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError("expected a JSON list")
    if len(entries) < inner_size:
        raise ValueError(f"{len(entries)} ranks, fewer than the {inner_size} the vocabulary "
                         "size needs")
    ranks = {}
    for i, entry in enumerate(entries[:inner_size]):
        if entry["rank"] != i:
            raise ValueError(f"entry {i} has rank {entry['rank']}")
        ranks[base64.b64decode(entry["token_bytes"])] = i + shift
    if len(ranks) != inner_size:
        raise ValueError("repeated token bytes")
    return ranks


# ---------------------------------------------------------------------------------------- build

TOKENIZER_TYPES = {
    "GPT2BPETokenizer": GPT2BPETokenizer,
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
    "Llama2Tokenizer": Llama2Tokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "NullTokenizer": NullTokenizer,
    "TikTokenizer": TikTokenizer,
}


def resolve_tokenizer_type(tokenizer_type: Optional[str], vocab_file: Optional[str] = None,
                           merge_file: Optional[str] = None) -> Optional[str]:
    """Megatron's rule: ``--vocab-file`` and ``--merge-file`` without a type mean GPT-2 BPE."""
    if tokenizer_type is None and vocab_file and merge_file:
        return "GPT2BPETokenizer"
    return tokenizer_type


def build_tokenizer(tokenizer_type: Optional[str], tokenizer_model: Optional[str] = None, *,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                    vocab_size: Optional[int] = None, tiktoken_pattern: Optional[str] = None,
                    tiktoken_num_special_tokens: int = 1000) -> Tokenizer:
    """Tokenizer by Megatron's ``--tokenizer-type`` name and the files its flags name."""
    tokenizer_type = resolve_tokenizer_type(tokenizer_type, vocab_file, merge_file)
    cls = TOKENIZER_TYPES.get(tokenizer_type)
    if cls is None:
        raise ConfigError(f"--tokenizer-type {tokenizer_type!r} is not one of "
                          f"{', '.join(TOKENIZER_TYPES)}")
    if cls is GPT2BPETokenizer:
        return cls(vocab_file, merge_file)
    if cls is NullTokenizer:
        return cls(vocab_size)
    if cls is TikTokenizer:
        return cls(tokenizer_model, tiktoken_pattern or "v2", vocab_size,
                   tiktoken_num_special_tokens)
    return cls(tokenizer_model)


def tokenizer_from_data_config(data, vocab_size: Optional[int] = None) -> Optional[Tokenizer]:
    """The tokenizer a ``DataConfig`` names (None when it names none); ``vocab_size`` is
    ``--vocab-size``, read by NullTokenizer and TikTokenizer."""
    kind = resolve_tokenizer_type(data.tokenizer_type, data.vocab_file, data.merge_file)
    if kind is None:
        return None
    return build_tokenizer(kind, data.tokenizer_model, vocab_file=data.vocab_file,
                           merge_file=data.merge_file, vocab_size=vocab_size,
                           tiktoken_pattern=data.tiktoken_pattern)


def build_model_tokenizer(tokenizer_type: Optional[str], tokenizer_model: Optional[str],
                          vocab_size: int, checkpoint: str, **files) -> Tokenizer:
    """The tokenizer a checkpoint's model of ``vocab_size`` ids reads (the checkpoint's own or the
    caller's override); ConfigError when none is named or it has more ids than the model.
    ``files``: ``vocab_file`` / ``merge_file`` for GPT-2 BPE."""
    tokenizer_type = resolve_tokenizer_type(tokenizer_type, files.get("vocab_file"),
                                            files.get("merge_file"))
    named = tokenizer_model or files.get("vocab_file") or tokenizer_type == "NullTokenizer"
    if not tokenizer_type or not named:
        raise ConfigError(f"checkpoint {checkpoint} names no tokenizer: pass --tokenizer-type and "
                          "--tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size=vocab_size, **files)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_model} has {tokenizer.vocab_size} tokens, more "
                          f"than the model's vocabulary {vocab_size}")
    return tokenizer
