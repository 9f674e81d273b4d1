"""Tokenizers: the same ids, eod, bos, pad and vocabulary size as Megatron-LM's own tokenizer code
(``megatron.core.tokenizers`` from the installed ``megatron-core`` package, which Megatron-LM's
preprocess_data.py and pretrain_gpt.py build), round trips, and one-line load failures."""
from pathlib import Path

import numpy as np
import pytest

from slimtron.config import ConfigError
from slimtron.data.tokenizers import (GPT2BPETokenizer, HuggingFaceTokenizer, NullTokenizer,
                                      SentencePieceTokenizer, build_tokenizer)
from tests.tokenizer_files import (BUNDLED_MODEL, corpus_texts, megatron_gpt2_tokenizer,
                                   megatron_tokenizer, write_gpt2_files)

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "Genesis 1\n\nverse one\nverse two",
    "  leading and  double spaces, a tab\tand trailing ",
    "unseen characters: héllo, 日本語, emoji 🙂, digits 1234567890",
    "",
]


def megatron_none(value):
    """Megatron reports a missing special id as -1 (sentencepiece) or None (transformers)."""
    return None if value is None or value < 0 else value


def assert_same_as_megatron(ours, theirs, texts):
    """``theirs``: Megatron's tokenizer, or one of its library wrappers (``*_id``, text_to_ids)."""
    def special(name):
        return megatron_none(getattr(theirs, name) if hasattr(theirs, name)
                             else getattr(theirs, f"{name}_id"))

    encode = theirs.tokenize if hasattr(theirs, "tokenize") else theirs.text_to_ids
    assert ours.vocab_size == theirs.vocab_size
    assert ours.eod == theirs.eod
    assert ours.bos == special("bos")
    assert ours.pad == special("pad")
    for text in texts:
        assert ours.tokenize(text) == list(encode(text)), text[:60]


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                            "Llama2Tokenizer"])
def test_sentencepiece_types_match_megatron(tokenizer_type):
    ours = build_tokenizer(tokenizer_type, BUNDLED_MODEL)
    theirs = megatron_tokenizer(tokenizer_type, tokenizer_model=BUNDLED_MODEL)
    assert_same_as_megatron(ours, theirs, TEXTS + corpus_texts(30))
    # Megatron-LM main's wrapper (legacy=False) adds no bos to the text and no special tokens.
    assert (ours.vocab_size, ours.bos, ours.eos, ours.pad, ours.eod) == (8000, 1, 2, 3, 2)
    assert ours.tokenize("And God said")[0] != ours.bos
    for text in TEXTS:
        ids = ours.tokenize(text)
        assert ours.detokenize(ids) == text
        assert ours.detokenize(np.asarray(ids + [ours.eod], dtype=np.uint16)) == text


def test_gpt2_bpe_matches_megatron(tmp_path):
    vocab, merges = write_gpt2_files(tmp_path / "gpt2")
    ours = build_tokenizer(None, vocab_file=vocab, merge_file=merges)  # implied by the two files
    assert isinstance(ours, GPT2BPETokenizer)
    theirs = megatron_gpt2_tokenizer(vocab, merges, tmp_path / "hf")
    texts = TEXTS + corpus_texts(30) + ["a literal <|endoftext|> is the special token"]
    assert_same_as_megatron(ours, theirs, texts)
    assert ours.eod == ours.vocab_size - 1 == 1000  # GPT-2's layout: <|endoftext|> is last
    assert ours.pad is None
    for text in TEXTS:
        assert ours.detokenize(ours.tokenize(text) + [ours.eod]) == text


def test_null_tokenizer_is_megatron_mains():
    """Megatron-LM main's NullTokenizer (megatron/core/tokenizers/text/libraries/
    null_tokenizer.py since its commit c9dfe34, April 2026): vocab_size is --vocab-size and eod is
    its last id. The megatron-core 0.16.1 release still counts one extra id for eod (N + 1)."""
    tok = build_tokenizer("NullTokenizer", vocab_size=128256)
    assert isinstance(tok, NullTokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos) == (128256, 128255, None, None)
    assert tok.tokenize("3 1 4 1 5") == [3, 1, 4, 1, 5]
    assert tok.detokenize([3, 1, 4]) == "3 1 4"
    theirs = megatron_tokenizer("NullTokenizer", vocab_size=128256)
    assert theirs.tokenize("3 1 4 1 5") == tok.tokenize("3 1 4 1 5")
    with pytest.raises(ConfigError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer")


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


def test_huggingface_tokenizer_matches_megatron(tmp_path):
    _save_local_hf_tokenizer(tmp_path / "hf")
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    assert isinstance(tok, HuggingFaceTokenizer)
    theirs = megatron_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf"))
    assert_same_as_megatron(tok, theirs, TEXTS)
    assert (tok.pad, tok.bos, tok.eos, tok.eod) == (0, 1, 2, 2)
    for text in TEXTS:
        assert tok.detokenize(tok.tokenize(text) + [tok.eod]) == text
    assert len(tok.tokenize(TEXTS[0])) < len(TEXTS[0]) / 2  # merges were learned


def test_tiktokenizer_matches_megatron(tmp_path):
    pytest.importorskip("tiktoken")
    import base64
    import json

    vocab_file = tmp_path / "tiktoken.json"
    byte_level = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the", b"in", b"be"]
    vocab_file.write_text(json.dumps([
        {"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
        for i, t in enumerate(byte_level)]))
    size = 1000 + len(byte_level)
    ours = build_tokenizer("TikTokenizer", str(vocab_file), vocab_size=size)
    theirs = megatron_tokenizer("TikTokenizer", tokenizer_model=str(vocab_file), vocab_size=size,
                                tiktoken_pattern="v2")
    assert_same_as_megatron(ours, theirs, TEXTS + ["<s> the beginning </s>"])


def test_load_failures_are_one_line_naming_the_file(tmp_path):
    not_a_model = tmp_path / "notes.model"
    not_a_model.write_text("this is not a sentencepiece model\n")
    with pytest.raises(ConfigError, match=f"{not_a_model}: not a sentencepiece model") as err:
        build_tokenizer("SentencePieceTokenizer", str(not_a_model))
    assert "\n" not in str(err.value)
    bad_vocab = tmp_path / "vocab.json"
    bad_vocab.write_text("[1, 2")
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(ConfigError, match=f"{bad_vocab}: not a GPT-2 vocabulary"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad_vocab), merge_file=str(merges))
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match="hfdir: not a HuggingFace tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hfdir"))
    with pytest.raises(ConfigError, match="--tokenizer-type 'GPT2BPE'"):
        build_tokenizer("GPT2BPE", BUNDLED_MODEL)
    with pytest.raises(ConfigError, match="no such sentencepiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match="--vocab-file .*no such GPT-2 vocabulary"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "none.json"),
                        merge_file=str(merges))
    with pytest.raises(ConfigError, match="no such tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing"))
    assert isinstance(build_tokenizer("SentencePieceTokenizer", BUNDLED_MODEL),
                      SentencePieceTokenizer)


def test_bundled_tokenizer_is_trained_on_the_corpus():
    tok = SentencePieceTokenizer(BUNDLED_MODEL)
    text = ("And God said, Let there be light: and there was light. And God saw the light, "
            "that it was good: and God divided the light from the darkness.")
    ids = tok.tokenize(text)
    assert len(text) / len(ids) > 3.5  # common words are single pieces, not bytes
    assert tok.tokenize("\n") != [tok.pad]  # newline falls back to its byte token
    assert tok.detokenize(tok.tokenize("\n")) == "\n"


@pytest.mark.parametrize("vocab,tp,divisible,padded", [(8000, 1, 128, 8064), (1001, 2, 128, 1024),
                                                      (50257, 8, 128, 51200),
                                                      (128256, 1, 128, 128256),
                                                      (32000, 4, 64, 32000)])
def test_padded_vocabulary_is_megatrons(vocab, tp, divisible, padded):
    """Megatron-LM's vocab_size_with_padding (megatron/core/tokenizers/utils/build_tokenizer.py):
    the tokenizer's size rounded up to a multiple of make_vocab_size_divisible_by x tp."""
    from slimtron.config import ModelConfig

    cfg = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible)
    assert cfg.padded_vocab_size(tp) == padded
