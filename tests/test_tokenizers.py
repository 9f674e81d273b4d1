"""Tokenizers: round trips and special ids for the three types, built by name."""
from pathlib import Path

import numpy as np
import pytest

from slimtron.config import ConfigError
from slimtron.data.tokenizers import (GPTSentencePieceTokenizer, HuggingFaceTokenizer,
                                      SentencePieceTokenizer, build_tokenizer)

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = str(REPO / "data" / "tokenizer" / "kjv_bpe8k.model")
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "Genesis 1\n\nverse one\nverse two",
    "  leading and  double spaces, a tab\tand trailing ",
    "unseen characters: héllo, 日本語, emoji 🙂, digits 1234567890",
    "",
]


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer"])
def test_sentencepiece_round_trip_and_special_ids(tokenizer_type):
    tok = build_tokenizer(tokenizer_type, BUNDLED_MODEL)
    assert tok.vocab_size == 8000
    assert (tok.bos, tok.eos, tok.pad, tok.eod) == (1, 2, 3, 2)
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
        assert tok.detokenize(np.asarray(ids + [tok.eod], dtype=np.uint16)) == text
    with_bos = tokenizer_type == "SentencePieceTokenizer"
    first = tok.tokenize("And God said")
    assert (first[0] == tok.bos) == with_bos
    assert tok.tokenize("") == ([tok.bos] if with_bos else [])


def test_bundled_tokenizer_is_trained_on_the_corpus():
    tok = GPTSentencePieceTokenizer(BUNDLED_MODEL)
    text = ("And God said, Let there be light: and there was light. And God saw the light, "
            "that it was good: and God divided the light from the darkness.")
    ids = tok.tokenize(text)
    assert len(text) / len(ids) > 3.5  # common words are single pieces, not bytes
    assert tok.tokenize("\n") != [tok.pad]  # newline falls back to its byte token
    assert tok.detokenize(tok.tokenize("\n")) == "\n"


def _save_local_hf_tokenizer(path: Path) -> None:
    """A byte-level BPE trained on a few lines, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TEXTS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(path))


def test_huggingface_tokenizer_from_local_dir(tmp_path):
    _save_local_hf_tokenizer(tmp_path / "hf")
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.pad, tok.bos, tok.eos, tok.eod) == (0, 1, 2, 2)
    assert 256 < tok.vocab_size <= 400
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids + [tok.eod]) == text
    assert len(tok.tokenize(TEXTS[0])) < len(TEXTS[0]) / 2  # merges were learned


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer-type 'GPT2BPE'"):
        build_tokenizer("GPT2BPE", BUNDLED_MODEL)
    with pytest.raises(ConfigError, match="no such sentencepiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match="no such tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing"))
    assert isinstance(build_tokenizer("SentencePieceTokenizer", BUNDLED_MODEL),
                      SentencePieceTokenizer)
