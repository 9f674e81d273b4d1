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


# ----------------------------------------------------------------------------------- model flags
# --apply-layernorm-1p, --rotary-percent, --rotary-base, --init-method-std as in Megatron-LM.

def _parse(*flags):
    from slimtron.arguments import parse_args

    return parse_args(["--position-embedding-type", "rope", *flags]).model


def test_model_flags_parse():
    m = _parse("--apply-layernorm-1p", "--rotary-percent", "0.5", "--rotary-base", "1000000",
               "--init-method-std", "0.0134")
    assert (m.apply_layernorm_1p, m.rotary_percent, m.rotary_base, m.init_method_std) == \
        (True, 0.5, 1000000.0, 0.0134)
    from slimtron.config import ConfigError
    with pytest.raises(ConfigError, match="--rotary-percent 0.3"):
        _parse("--rotary-percent", "0.3", "--hidden-size", "64", "--num-attention-heads", "4")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layernorm_1p_is_the_same_model_and_exports_to_transformers(tmp_path, arch):
    """Zero-centered norm weights w compute what plain norms with weights w + 1 compute; the HF
    export folds the +1 into the saved weight, and transformers gives the same logits."""
    import dataclasses

    import torch

    from slimtron.model import GPTModel
    from slimtron.parallel.state import ParallelState
    from tests.test_hf_conversion import (assert_same_logits, gpt2_config, hf_load, llama_config,
                                          reference_model, save_reference_checkpoint, to_hf)

    base = llama_config() if arch == "llama" else gpt2_config()
    one_p = dataclasses.replace(base, apply_layernorm_1p=True)
    fresh = GPTModel(one_p, ParallelState.single(), seed=5)
    norms = [p for n, p in fresh.named_parameters() if "layernorm.weight" in n]
    assert norms and all(torch.count_nonzero(p) == 0 for p in norms)  # gamma - 1 starts at 0

    ours = reference_model(one_p)  # perturbed: the norm weights are far from zero
    plain = reference_model(base)
    with torch.no_grad():
        for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
            q.copy_(p + 1 if "layernorm.weight" in name else p)
    tokens = torch.randint(0, base.vocab_size, (2, 16))
    torch.testing.assert_close(ours(tokens), plain(tokens), rtol=1e-5, atol=1e-5)

    save_reference_checkpoint(str(tmp_path / "ckpt"), one_p)
    to_hf.convert(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    cls = "LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel"
    assert_same_logits(ours, hf_load(str(tmp_path / "hf"), cls), one_p)


def test_rotary_percent_rotates_the_first_dims_only():
    import torch

    from slimtron.model.transformer import RotaryEmbedding, apply_rotary

    head_dim, base = 16, 500000.0
    positions = torch.arange(7).unsqueeze(0)
    x = torch.randn(7, 1, 3, head_dim)
    partial = apply_rotary(x, *RotaryEmbedding(head_dim, base, percent=0.5)(positions))
    # Megatron: rot_dim = kv_channels * percent; a rotary of rot_dim dims on x[..., :rot_dim]
    # (its frequencies base^(-2i/rot_dim)), the other dims as they were.
    inv_freq = 1.0 / base ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.cat([positions.t().float() * inv_freq] * 2, dim=-1).unsqueeze(1).unsqueeze(1)
    first, second = x[..., :8].chunk(2, dim=-1)
    expected = x[..., :8] * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()
    torch.testing.assert_close(partial[..., :8], expected)
    assert torch.equal(partial[..., 8:], x[..., 8:])
    full = apply_rotary(x, *RotaryEmbedding(head_dim, base)(positions))
    assert not torch.allclose(full[..., 8:], x[..., 8:])


def test_rotary_percent_and_base_reach_the_model_and_export_refuses_partial_rotary(tmp_path):
    import dataclasses

    import torch

    from slimtron.config import ConfigError
    from slimtron.model import GPTModel
    from slimtron.parallel.state import ParallelState
    from tests.test_hf_conversion import llama_config, save_reference_checkpoint, to_hf

    tokens = torch.randint(0, 1000, (1, 16))

    def logits(**changes):
        cfg = dataclasses.replace(llama_config(), **changes)
        return GPTModel(cfg, ParallelState.single(), seed=5)(tokens)

    reference = logits()
    assert not torch.allclose(logits(rotary_percent=0.5), reference)
    assert not torch.allclose(logits(rotary_base=1000000.0), reference)
    save_reference_checkpoint(str(tmp_path / "ckpt"),
                              dataclasses.replace(llama_config(), rotary_percent=0.5))
    with pytest.raises(ConfigError, match="rotary percent 0.5"):
        to_hf.convert(str(tmp_path / "ckpt"), str(tmp_path / "hf"))


def test_init_method_std_sets_the_weights_spread():
    """Megatron: normal(0, std) for every weight, std / sqrt(2 * layers) for the output
    projections of attention and MLP."""
    import math

    from slimtron.config import ModelConfig
    from slimtron.model import GPTModel
    from slimtron.parallel.state import ParallelState

    cfg = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=512,
                      init_method_std=0.006)
    model = GPTModel(cfg, ParallelState.single(), seed=1)
    params = dict(model.named_parameters())
    for name, expected in [("decoder.layers.0.self_attention.linear_qkv.weight", 0.006),
                           ("decoder.layers.1.mlp.linear_fc1.weight", 0.006),
                           ("embedding.word_embeddings.weight", 0.006),
                           ("decoder.layers.2.self_attention.linear_proj.weight",
                            0.006 / math.sqrt(8)),
                           ("decoder.layers.3.mlp.linear_fc2.weight", 0.006 / math.sqrt(8))]:
        std = params[name].detach()[:512].std().item()
        assert std == pytest.approx(expected, rel=0.03), name


def test_corpus_from_a_larger_tokenizer_stops_training_with_one_line(tmp_path, corpus):
    """A corpus preprocessed with the 8000-piece model, trained with a 1000-id vocabulary: one
    line naming the corpus, not an index error inside the embedding."""
    run_ours(corpus, tmp_path / "big", "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", BUNDLED_MODEL, "--append-eod")
    prefix = tmp_path / "big_text_document"
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_gpt.py"), "--data-path", str(prefix),
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--seq-length", "32",
         "--train-iters", "2", "--split", "100,0,0", "--data-cache-path", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{prefix}: sample" in errors[0], proc.stderr[-2000:]
    assert "outside the model's vocabulary of 1000" in errors[0]
    assert "Traceback" not in proc.stderr
