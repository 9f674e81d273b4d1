"""Hugging Face conversion both ways, against the real transformers models (offline, fp32).

A tiny Llama is saved from a (tp, pp) = (2, 2) run on forked gloo ranks and a tiny GPT-2 from one
process; every weight is first moved off its initial value (norms are ones and biases zeros at
init, which would hide a mix-up) by a noise tensor that is a function of the parameter's name. The
reference is the single-process model given the same noise.
"""
import importlib.util
import json
import os
import sys

import pytest
import torch

from slimtron import hf_mapping
from slimtron.checkpointing import (CKPT_FORMATS, load_checkpoint, load_common, open_checkpoint,
                                  save_checkpoint)
from slimtron.config import Config, ConfigError, DataConfig, ModelConfig
from slimtron.data.tokenizers import SentencePieceTokenizer
from slimtron.model import build_model_chunks, parameter_seed
from slimtron.parallel.sharding import shard_like
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP_MODEL = os.path.join(ROOT, "data", "tokenizer", "kjv_bpe8k.model")
VOCAB = 8000  # the bundled tokenizer's


def tool(name: str, folder: str = "tools/checkpoint"):
    """Import a script under tools/ as a module (they are programs, not a package)."""
    path = os.path.join(ROOT, folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


to_hf, from_hf = tool("convert_to_hf"), tool("convert_from_hf")
inspect_tool = tool("inspect_checkpoint")


def llama_config() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                       num_query_groups=2, seq_length=32, vocab_size=VOCAB,
                       normalization="RMSNorm", norm_epsilon=1e-6, position_embedding_type="rope",
                       rotary_base=5000.0, swiglu=True, add_bias_linear=False,
                       untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                       attention_dropout=0.0)


def gpt2_config() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=80, num_attention_heads=4,
                       seq_length=32, vocab_size=VOCAB, normalization="LayerNorm",
                       position_embedding_type="learned_absolute", swiglu=False,
                       add_bias_linear=True, hidden_dropout=0.0, attention_dropout=0.0)


def full_config(model: ModelConfig, tp: int = 1, pp: int = 1) -> Config:
    config = Config(model=model, data=DataConfig(tokenizer_type="SentencePieceTokenizer",
                                                 tokenizer_model=SP_MODEL))
    config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size = tp, pp
    return config


@torch.no_grad()
def perturb(chunks, cfg: ModelConfig, pstate):
    """Add to every parameter its shard of a full noise tensor drawn from its name
    (vocabulary padding rows stay zero)."""
    for chunk in chunks:
        for p in chunk.parameters():
            g = torch.Generator().manual_seed(parameter_seed(99, p.global_name))
            noise = torch.randn(p.full_shape, generator=g) * 0.3
            if p.global_name in hf_mapping.VOCAB_PARAMS:
                noise[cfg.vocab_size:] = 0
            p.add_(shard_like(noise, p, pstate.tp.size, pstate.tp.rank))


def reference_model(cfg: ModelConfig):
    pstate = ParallelState.single()
    model = build_model_chunks(cfg, pstate)[0]
    perturb([model], cfg, pstate)
    return model.eval()


def save_reference_checkpoint(root: str, cfg: ModelConfig, iteration: int = 1):
    """A one-process checkpoint of ``reference_model(cfg)`` with the bundled tokenizer."""
    save_checkpoint(root, iteration, [reference_model(cfg)], None, pstate=ParallelState.single(),
                    config=full_config(cfg), consumed_samples=0)


def _save_parallel(rank, world, root, cfg_dict, tp, pp):
    cfg = ModelConfig(**cfg_dict)
    pstate = ParallelState.build(tp=tp, pp=pp)
    chunks = build_model_chunks(cfg, pstate)
    perturb(chunks, cfg, pstate)
    save_checkpoint(root, 3, chunks, None, pstate=pstate, config=full_config(cfg, tp, pp),
                    consumed_samples=0)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("llama_ckpt"))
    cfg = llama_config()
    run_distributed(_save_parallel, 4, root, cfg.__dict__, 2, 2)
    return root


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gpt2_ckpt"))
    save_reference_checkpoint(root, gpt2_config())
    return root


@pytest.fixture(scope="module")
def llama_hf(llama_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "llama")
    assert to_hf.main(["--load", llama_ckpt, "--output", out, "--max-shard-size", "150KB"]) == 0
    return out


@pytest.fixture(scope="module")
def gpt2_hf(gpt2_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "gpt2")
    assert to_hf.main(["--load", gpt2_ckpt, "--output", out]) == 0
    return out


def hf_load(path: str, cls_name: str):
    import transformers

    model, info = getattr(transformers, cls_name).from_pretrained(
        path, local_files_only=True, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def tokens_for(cfg: ModelConfig, b: int = 2, s: int = 24):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def assert_same_logits(ours_model, hf_model, cfg):
    tokens = tokens_for(cfg)
    ours = ours_model(tokens)
    assert ours.shape[-1] > cfg.vocab_size  # padded: the check below drops the padding
    theirs = hf_model(tokens).logits
    torch.testing.assert_close(theirs, ours[..., :cfg.vocab_size], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- to HF
def test_llama_from_tp2_pp2_loads_in_transformers_with_same_logits(llama_hf):
    index = json.load(open(os.path.join(llama_hf, "model.safetensors.index.json")))
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all(os.path.exists(os.path.join(llama_hf, f)) for f in files)
    assert sorted(f for f in os.listdir(llama_hf) if f.endswith(".safetensors")) == sorted(files)
    config = json.load(open(os.path.join(llama_hf, "config.json")))
    assert config["num_key_value_heads"] == 2 and config["architectures"] == ["LlamaForCausalLM"]
    assert_same_logits(reference_model(llama_config()), hf_load(llama_hf, "LlamaForCausalLM"),
                       llama_config())


def test_gpt2_loads_in_transformers_with_same_logits(gpt2_hf):
    assert os.path.exists(os.path.join(gpt2_hf, "model.safetensors"))  # under the shard size
    assert_same_logits(reference_model(gpt2_config()), hf_load(gpt2_hf, "GPT2LMHeadModel"),
                       gpt2_config())


def test_exported_tokenizer_and_generation_config_match_sentencepiece(llama_hf):
    from transformers import AutoTokenizer, GenerationConfig

    ours = SentencePieceTokenizer(SP_MODEL)
    theirs = AutoTokenizer.from_pretrained(llama_hf, local_files_only=True)
    texts = ["In the beginning God created the heaven and the earth.",
             "  leading spaces,\ttabs and\n\nnewlines  ", "unseen: ÿ€ 漢字 🙂 12345"]
    for text in texts:
        ids = ours.tokenize(text)
        assert theirs.encode(text) == ids
        assert theirs.decode(ids, skip_special_tokens=True) == ours.detokenize(ids) == text
    gen = GenerationConfig.from_pretrained(llama_hf, local_files_only=True)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (ours.bos, ours.eos, ours.pad)


def test_bf16_export_and_refusals(llama_ckpt, tmp_path, capsys):
    out = str(tmp_path / "bf16")
    assert to_hf.main(["--load", llama_ckpt, "--output", out, "--dtype", "bf16"]) == 0
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    capsys.readouterr()
    # Not empty any more: refused, one line.
    assert to_hf.main(["--load", llama_ckpt, "--output", out]) == 1
    assert "not empty" in capsys.readouterr().err

    odd = llama_config()
    odd.normalization = "LayerNorm"  # LayerNorm with rope and SwiGLU: neither Llama nor GPT-2
    with pytest.raises(ConfigError, match=r"no Hugging Face equivalent: not Llama \(normalization "
                                          r"LayerNorm\), not GPT-2 \(position embedding rope"):
        hf_mapping.architecture(odd)
    root = str(tmp_path / "odd")
    model = build_model_chunks(odd, ParallelState.single(), device="cpu")[0]
    save_checkpoint(root, 1, [model], None, pstate=ParallelState.single(), config=full_config(odd),
                    consumed_samples=0)
    assert to_hf.main(["--load", root, "--output", str(tmp_path / "odd_hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no Hugging Face equivalent" in err
    assert not os.path.exists(tmp_path / "odd_hf")
    assert to_hf.parse_size("2GB") == 2_000_000_000 and to_hf.parse_size("150KB") == 150_000
    with pytest.raises(ConfigError, match="--max-shard-size"):
        to_hf.parse_size("two gigs")


# ----------------------------------------------------------------------------- and back
def assert_same_checkpoint(a_root: str, b_root: str, cfg: ModelConfig):
    """Every parameter bitwise equal (real vocabulary rows; padding rows zero in both)."""
    (a_dir, a_common), (b_dir, b_common) = load_common(a_root), load_common(b_root)
    a, b = open_checkpoint(a_dir, a_common), open_checkpoint(b_dir, b_common)
    assert set(a.names()) == set(b.names())
    for name in a.names():
        x, y = a.full(name), b.full(name)
        if name in hf_mapping.VOCAB_PARAMS:
            assert not x[cfg.vocab_size:].any() and not y[cfg.vocab_size:].any()
            x, y = x[:cfg.vocab_size], y[:cfg.vocab_size]
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("ckpt_format,tp,pp", [("torch_dist", 1, 1), ("torch", 1, 1),
                                                ("torch", 2, 2)])
def test_round_trip_is_bitwise(llama_ckpt, llama_hf, gpt2_ckpt, gpt2_hf, tmp_path, ckpt_format,
                               tp, pp):
    layout = ["--ckpt-format", ckpt_format, "--tensor-model-parallel-size", str(tp),
              "--pipeline-model-parallel-size", str(pp)]
    files = ["common.pt"] + (
        ["metadata.json", "shard_00000.bin"] if ckpt_format == "torch_dist" else
        [f"model_tp{t:02d}_pp{p:03d}.pt" for t in range(tp) for p in range(pp)])
    for name, ckpt, hf_dir, cfg in (("llama", llama_ckpt, llama_hf, llama_config()),
                                    ("gpt2", gpt2_ckpt, gpt2_hf, gpt2_config())):
        back = str(tmp_path / name)
        assert from_hf.main(["--hf", hf_dir, "--save", back] + layout) == 0
        assert_same_checkpoint(ckpt, back, cfg)
        _, common = load_common(back)
        assert common["format_version"] == CKPT_FORMATS[ckpt_format]
        assert common["layout"]["tp"] == tp and common["layout"]["pp"] == pp
        assert sorted(os.listdir(os.path.join(back, "iter_0000000"))) == sorted(files)
        assert inspect_tool.main([back, "--verify"]) == 0  # whole, with no RNG files expected
        restored = Config.from_dict(common["config"])
        assert restored.data.tokenizer_type == "HuggingFaceTokenizer"
        assert restored.data.tokenizer_model == os.path.abspath(hf_dir)
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups",
                      "kv_channels", "vocab_size", "normalization", "norm_epsilon",
                      "rotary_base", "position_embedding_type", "swiglu", "add_bias_linear",
                      "untie_embeddings_and_output_weights"):
            assert getattr(restored.model, field) == getattr(cfg, field), field


def _load_converted_in_parallel(rank, world, converted, reference, cfg_dict, tp, pp):
    """Each rank of a (tp, pp) layout loads the one-rank format-2 import and holds exactly its
    shard of the reference checkpoint's tensors."""
    cfg = ModelConfig(**cfg_dict)
    pstate = ParallelState.build(tp=tp, pp=pp)
    chunks = build_model_chunks(cfg, pstate, initialize=False)
    load_checkpoint(converted, chunks, None, pstate=pstate, config=full_config(cfg, tp, pp),
                    finetune=True)
    ref_dir, ref_common = load_common(reference)
    saved = open_checkpoint(ref_dir, ref_common)
    for chunk in chunks:
        for p in chunk.parameters():
            full = hf_mapping.pad_to(p.global_name, saved.full(p.global_name), p.full_shape)
            want = shard_like(full, p, tp, pstate.tp.rank)
            assert torch.equal(p.detach(), want.to(p.dtype)), (rank, p.global_name)


def test_one_rank_import_loads_into_tp2_pp2(llama_ckpt, llama_hf, tmp_path):
    converted = str(tmp_path / "converted")
    assert from_hf.main(["--hf", llama_hf, "--save", converted]) == 0
    run_distributed(_load_converted_in_parallel, 4, converted, llama_ckpt,
                    llama_config().__dict__, 2, 2)


# ------------------------------------------------------------------------------- from HF
def test_transformers_llama_with_gqa_imports_with_same_logits(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=72,
                            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                            max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=20000.0,
                            tie_word_embeddings=False)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms start at one: move them so a swapped norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    hf.save_pretrained(hf_dir)
    # Format 2 (the default) holds no layout: TP/PP sizes are format 1's, refused here.
    assert from_hf.main(["--hf", hf_dir, "--save", ckpt, "--tensor-model-parallel-size", "2"]) == 1
    assert "choose the files of --ckpt-format torch only" in capsys.readouterr().err
    assert not os.path.exists(ckpt)
    assert from_hf.main(["--hf", hf_dir, "--save", ckpt]) == 0
    _, common = load_common(ckpt)
    config = Config.from_dict(common["config"])
    assert config.model.num_query_groups == 2 and config.model.num_attention_heads == 6
    assert config.data.tokenizer_model is None  # no tokenizer in that directory
    pstate = ParallelState.single()
    model = build_model_chunks(config.model, pstate)[0].eval()
    load_checkpoint(ckpt, [model], None, pstate=pstate, config=config, finetune=True)
    assert_same_logits(model, hf, config.model)
    # Refused: a second import over it, and configurations slimtron cannot run.
    capsys.readouterr()
    assert from_hf.main(["--hf", hf_dir, "--save", ckpt]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    for change, message in (({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                             "rope type 'llama3'"),
                            ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                            ({"model_type": "mistral"}, "model_type 'mistral' is not supported")):
        with pytest.raises(ConfigError, match=message):
            hf_mapping.model_config_from_hf({**hf_config.to_dict(), **change}, "config.json")


def test_gpt2_weights_saved_without_the_lm_head_prefix_import(tmp_path):
    """The original GPT-2 files hold the bare base model's names (``h.0.attn...``, ``wte.weight``)."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf_config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                           activation_function="gelu")
    hf = GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # biases start at zero and norms at one: move them
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    hf.save_pretrained(hf_dir)
    weights = os.path.join(hf_dir, "model.safetensors")
    stored = load_file(weights)
    assert all(k.startswith("transformer.") for k in stored)
    save_file({k.removeprefix("transformer."): v for k, v in stored.items()}, weights,
              metadata={"format": "pt"})
    assert from_hf.main(["--hf", hf_dir, "--save", ckpt]) == 0
    _, common = load_common(ckpt)
    config = Config.from_dict(common["config"])
    pstate = ParallelState.single()
    model = build_model_chunks(config.model, pstate)[0].eval()
    load_checkpoint(ckpt, [model], None, pstate=pstate, config=config, finetune=True)
    assert_same_logits(model, hf, config.model)
    # The usual GPT-2 activation is gelu's tanh approximation: imported, with a warning.
    cfg, warnings = hf_mapping.model_config_from_hf(
        {**hf_config.to_dict(), "activation_function": "gelu_new"}, "config.json")
    assert cfg.num_layers == 2 and len(warnings) == 1 and "tanh approximation" in warnings[0]
