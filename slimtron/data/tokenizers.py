"""Tokenizers behind one small interface, built by name as in Megatron-LM's ``--tokenizer-type``.

Every tokenizer has ``vocab_size``, ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str`` and
the special ids ``eod`` (the id appended after each document), ``bos``, ``eos`` and ``pad`` (None
where the tokenizer has no such token). Special tokens never appear in detokenized text.

- ``SentencePieceTokenizer``: a sentencepiece model; ``tokenize`` starts every text with bos (as
  Llama's tokenizer does), ``eod`` is eos. Unlike Megatron's class of that name it appends no extra
  special tokens to the vocabulary, so ``vocab_size`` is the model's own.
- ``GPTSentencePieceTokenizer``: the same model used GPT-style: no bos added, ``eod`` is eos.
- ``HuggingFaceTokenizer``: ``transformers.AutoTokenizer`` loaded from a local directory (never a
  download); ``tokenize`` adds the special tokens the tokenizer itself defines, ``eod`` is eos.
"""
from __future__ import annotations

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


class SentencePieceTokenizer(Tokenizer):
    add_bos = True

    def __init__(self, model_file: str):
        import sentencepiece

        if not model_file or not os.path.isfile(model_file):
            raise ConfigError(f"--tokenizer-model {model_file!r}: no such sentencepiece model file")
        self.model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def tokenize(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        if self.add_bos and self.bos is not None:
            ids.insert(0, self.bos)
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

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
    add_bos = False


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, pretrained_dir: str, add_special_tokens: bool = True, **kwargs):
        if not pretrained_dir or not os.path.isdir(pretrained_dir):
            raise ConfigError(f"--tokenizer-model {pretrained_dir!r}: no such tokenizer directory "
                              "(HuggingFaceTokenizer loads local directories only)")
        from transformers import AutoTokenizer

        self.model_file = pretrained_dir
        self.add_special_tokens = add_special_tokens
        self._tok = AutoTokenizer.from_pretrained(pretrained_dir, local_files_only=True, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def eos(self) -> Optional[int]:
        return _optional_id(self._tok.eos_token_id)

    @property
    def bos(self) -> Optional[int]:
        return _optional_id(self._tok.bos_token_id)

    @property
    def pad(self) -> Optional[int]:
        return _optional_id(self._tok.pad_token_id)


TOKENIZER_TYPES = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str, **kwargs) -> Tokenizer:
    """Tokenizer by Megatron's ``--tokenizer-type`` name, loaded from ``--tokenizer-model``."""
    cls = TOKENIZER_TYPES.get(tokenizer_type)
    if cls is None:
        raise ConfigError(f"--tokenizer-type {tokenizer_type!r} is not one of "
                          f"{', '.join(TOKENIZER_TYPES)}")
    return cls(tokenizer_model, **kwargs)


def build_model_tokenizer(tokenizer_type: Optional[str], tokenizer_model: Optional[str],
                          vocab_size: int, checkpoint: str) -> Tokenizer:
    """The tokenizer a checkpoint's model of ``vocab_size`` ids reads (the checkpoint's own or the
    caller's override); ConfigError when none is named or it has more ids than the model."""
    if not tokenizer_type or not tokenizer_model:
        raise ConfigError(f"checkpoint {checkpoint} names no tokenizer: pass --tokenizer-type and "
                          "--tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_model} has {tokenizer.vocab_size} tokens, more "
                          f"than the model's vocabulary {vocab_size}")
    return tokenizer
