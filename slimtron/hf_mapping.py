"""Hugging Face interop: one mapping table per architecture, read in both directions.

A table row names one slimtron parameter (global, Megatron-Core style; ``{i}`` is the layer index),
the Hugging Face tensors it corresponds to, and a ``Transform`` whose ``to_hf`` and ``from_hf`` are
exact inverses (pure reshapes, slices and transposes, so a round trip is bitwise). Tensors here are
full (unsharded) and carry the real vocabulary only: padding rows are the converters' business.

- Llama (RMSNorm, rope, SwiGLU) -> ``LlamaForCausalLM``. Our fused QKV is grouped (per query group:
  its q heads, its k head, its v head); HF keeps q_proj / k_proj / v_proj with kv head ``j`` serving
  q heads ``j*n .. j*n+n-1``, which is our group order, so de-interleaving is a view. Both use the
  rotate-half rope convention (``slimtron.model.transformer.apply_rotary``), so q/k rows need no
  permutation. fc1 is [gate; up].
- GPT-2 (LayerNorm, learned positions, gelu, biases) -> ``GPT2LMHeadModel``. Its Conv1D weights are
  ``[in, out]`` (ours are ``[out, in]``) and c_attn is [all q; all k; all v], not grouped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slimtron.config import ConfigError, ModelConfig
from slimtron.model.init import VOCAB_PARAMETERS as VOCAB_PARAMS


# ------------------------------------------------------------------------------- transforms
class Same:
    """One tensor, unchanged."""

    def to_hf(self, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return [t]

    def from_hf(self, ts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return ts[0]


class NormWeight:
    """A norm's scale; under --apply-layernorm-1p ours holds gamma - 1 and HF's holds gamma."""

    def to_hf(self, t, cfg):
        return [t + 1 if cfg.apply_layernorm_1p else t]

    def from_hf(self, ts, cfg):
        return ts[0] - 1 if cfg.apply_layernorm_1p else ts[0]


class Transposed:
    """GPT-2's Conv1D keeps ``[in, out]``."""

    def to_hf(self, t, cfg):
        return [t.t().contiguous()]

    def from_hf(self, ts, cfg):
        return ts[0].t().contiguous()


class GatedHalves:
    """SwiGLU fc1 = [gate; up] -> gate_proj, up_proj."""

    def to_hf(self, t, cfg):
        return [c.contiguous() for c in t.chunk(2, dim=0)]

    def from_hf(self, ts, cfg):
        return torch.cat(ts, dim=0)


def _grouped_view(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Fused QKV rows as ``[groups, heads_per_group + 2, head_dim, ...]``."""
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    return t.view(cfg.num_query_groups, per_group + 2, cfg.kv_channels, *t.shape[1:])


def split_grouped_qkv(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Grouped fused QKV (weight or bias) -> [q, k, v], each head-major."""
    g = _grouped_view(t, cfg)
    rest = t.shape[1:]
    q = g[:, :-2].reshape(-1, *rest)
    k = g[:, -2].reshape(-1, *rest)
    v = g[:, -1].reshape(-1, *rest)
    return [x.contiguous() for x in (q, k, v)]


def fuse_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cfg: ModelConfig) -> torch.Tensor:
    """Inverse of ``split_grouped_qkv``."""
    groups, d = cfg.num_query_groups, cfg.kv_channels
    rest = q.shape[1:]
    blocks = [q.reshape(groups, -1, d, *rest), k.reshape(groups, 1, d, *rest),
              v.reshape(groups, 1, d, *rest)]
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


class GroupedQKV:
    """Llama: fused grouped QKV <-> q_proj, k_proj, v_proj."""

    def to_hf(self, t, cfg):
        return split_grouped_qkv(t, cfg)

    def from_hf(self, ts, cfg):
        return fuse_grouped_qkv(*ts, cfg)


class GPT2Attention:
    """GPT-2: fused grouped QKV <-> c_attn = [q; k; v] (transposed to Conv1D for weights)."""

    def to_hf(self, t, cfg):
        fused = torch.cat(split_grouped_qkv(t, cfg), dim=0)
        return [fused.t().contiguous() if fused.dim() == 2 else fused]

    def from_hf(self, ts, cfg):
        fused = ts[0].t() if ts[0].dim() == 2 else ts[0]
        return fuse_grouped_qkv(*fused.chunk(3, dim=0), cfg).contiguous()


SAME, TRANSPOSED, GATED, QKV, GPT2_QKV = Same(), Transposed(), GatedHalves(), GroupedQKV(), GPT2Attention()
NORM = NormWeight()


# ------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    transform: object = SAME
    when: Optional[str] = None  # "bias" | "untied": the row exists only in such models


_L = "decoder.layers.{i}."

LLAMA_TABLE = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(_L + "input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), NORM),
    Rule(_L + "self_attention.linear_qkv.weight",
         tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"), QKV),
    Rule(_L + "self_attention.linear_qkv.bias",
         tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"), QKV, when="bias"),
    Rule(_L + "self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    Rule(_L + "self_attention.linear_proj.bias", ("model.layers.{i}.self_attn.o_proj.bias",),
         when="bias"),
    Rule(_L + "pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         NORM),
    Rule(_L + "mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), GATED),
    Rule(_L + "mlp.linear_fc1.bias",
         ("model.layers.{i}.mlp.gate_proj.bias", "model.layers.{i}.mlp.up_proj.bias"), GATED,
         when="bias"),
    Rule(_L + "mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
    Rule(_L + "mlp.linear_fc2.bias", ("model.layers.{i}.mlp.down_proj.bias",), when="bias"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), NORM),
    Rule("output_layer.weight", ("lm_head.weight",), when="untied"),
)

_H = "transformer.h.{i}."

GPT2_TABLE = (
    Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",)),
    Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
    Rule(_L + "input_layernorm.weight", (_H + "ln_1.weight",), NORM),
    Rule(_L + "input_layernorm.bias", (_H + "ln_1.bias",)),
    Rule(_L + "self_attention.linear_qkv.weight", (_H + "attn.c_attn.weight",), GPT2_QKV),
    Rule(_L + "self_attention.linear_qkv.bias", (_H + "attn.c_attn.bias",), GPT2_QKV),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "attn.c_proj.weight",), TRANSPOSED),
    Rule(_L + "self_attention.linear_proj.bias", (_H + "attn.c_proj.bias",)),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "ln_2.weight",), NORM),
    Rule(_L + "pre_mlp_layernorm.bias", (_H + "ln_2.bias",)),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.c_fc.weight",), TRANSPOSED),
    Rule(_L + "mlp.linear_fc1.bias", (_H + "mlp.c_fc.bias",)),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.c_proj.weight",), TRANSPOSED),
    Rule(_L + "mlp.linear_fc2.bias", (_H + "mlp.c_proj.bias",)),
    Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",), NORM),
    Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
    Rule("output_layer.weight", ("lm_head.weight",), when="untied"),
)

TABLES = {"llama": LLAMA_TABLE, "gpt2": GPT2_TABLE}


def _row_applies(rule: Rule, cfg: ModelConfig) -> bool:
    if rule.when == "bias":
        return cfg.add_bias_linear
    if rule.when == "untied":
        return cfg.untie_embeddings_and_output_weights
    return True


def mapping(cfg: ModelConfig) -> list[Rule]:
    """The concrete rows for this model: layers expanded, absent parameters left out."""
    rows = []
    for rule in TABLES[architecture(cfg)]:
        if not _row_applies(rule, cfg):
            continue
        layers = range(cfg.num_layers) if "{i}" in rule.ours else [None]
        for i in layers:
            rows.append(Rule(rule.ours.format(i=i), tuple(n.format(i=i) for n in rule.theirs),
                             rule.transform))
    return rows


def to_hf(rule: Rule, ours: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors of one row from our full tensor (vocabulary padding already dropped)."""
    return dict(zip(rule.theirs, rule.transform.to_hf(ours, cfg)))


def from_hf(rule: Rule, theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Our full tensor of one row (real vocabulary only) from its HF tensors."""
    return rule.transform.from_hf([theirs[n] for n in rule.theirs], cfg)


def drop_vocab_padding(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return t[:cfg.vocab_size] if name in VOCAB_PARAMS else t


def pad_to(name: str, t: torch.Tensor, full_shape) -> torch.Tensor:
    """Zero rows appended to a vocabulary tensor up to ``full_shape`` (the padded vocabulary)."""
    full_shape = tuple(full_shape)
    if tuple(t.shape) == full_shape:
        return t
    if name not in VOCAB_PARAMS or tuple(t.shape[1:]) != full_shape[1:] or t.shape[0] > full_shape[0]:
        raise ConfigError(f"parameter {name}: Hugging Face shape {tuple(t.shape)} does not fit "
                          f"slimtron's {full_shape}")
    padded = t.new_zeros(full_shape)
    padded[:t.shape[0]] = t
    return padded


# ------------------------------------------------------------------------------ architectures
def _mismatch(cfg: ModelConfig) -> dict[str, list[str]]:
    """Per architecture, the settings of ``cfg`` it cannot represent."""
    llama, gpt2 = [], []
    if cfg.normalization != "RMSNorm":
        llama.append(f"normalization {cfg.normalization}")
    if cfg.position_embedding_type != "rope":
        llama.append(f"position embedding {cfg.position_embedding_type}")
    if not cfg.swiglu:
        llama.append("no swiglu")
    if cfg.rotary_percent != 1.0:
        llama.append(f"rotary percent {cfg.rotary_percent}")
    if cfg.normalization != "LayerNorm":
        gpt2.append(f"normalization {cfg.normalization}")
    if cfg.position_embedding_type != "learned_absolute":
        gpt2.append(f"position embedding {cfg.position_embedding_type}")
    if cfg.swiglu:
        gpt2.append("swiglu")
    if not cfg.add_bias_linear:
        gpt2.append("no linear biases")
    if cfg.num_query_groups != cfg.num_attention_heads:
        gpt2.append("grouped-query attention")
    if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
        gpt2.append("kv_channels x heads != hidden size")
    if cfg.add_qkv_bias and not cfg.add_bias_linear:
        llama.append("a QKV-only bias")
        gpt2.append("a QKV-only bias")
    return {"llama": llama, "gpt2": gpt2}


def architecture(cfg: ModelConfig) -> str:
    """"llama" or "gpt2"; a ConfigError naming what neither can represent otherwise."""
    mismatch = _mismatch(cfg)
    for name in ("llama", "gpt2"):
        if not mismatch[name]:
            return name
    raise ConfigError("this model has no Hugging Face equivalent: not Llama ("
                      + ", ".join(mismatch["llama"]) + "), not GPT-2 ("
                      + ", ".join(mismatch["gpt2"]) + ")")


def hf_config(cfg: ModelConfig, torch_dtype: torch.dtype, bos: Optional[int] = None,
              eos: Optional[int] = None, pad: Optional[int] = None):
    """The transformers config object of ``cfg``."""
    from transformers import GPT2Config, LlamaConfig

    tokens = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if architecture(cfg) == "llama":
        config = LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
            head_dim=cfg.kv_channels, hidden_act="silu",
            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
            rope_theta=cfg.rotary_base, attention_bias=cfg.add_bias_linear,
            mlp_bias=cfg.add_bias_linear, attention_dropout=cfg.attention_dropout,
            tie_word_embeddings=cfg.tied_embeddings, **tokens)
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
            n_inner=cfg.ffn_hidden_size, activation_function="gelu",  # exact erf gelu, as ours
            layer_norm_epsilon=cfg.norm_epsilon, resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
            tie_word_embeddings=cfg.tied_embeddings, **tokens)
        config.architectures = ["GPT2LMHeadModel"]
    config.dtype = torch_dtype
    return config


def _rope_theta(hf: dict, where: str) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    # transformers 5 writes rope_parameters, earlier releases rope_scaling: refuse either kind.
    for kind in (rope.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if kind not in (None, "default"):
            raise ConfigError(f"{where}: rope type {kind!r} (rope scaling) is not supported by "
                              "slimtron")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict, where: str) -> tuple[ModelConfig, list[str]]:
    """Our ModelConfig from a config.json dict, and warnings about inexact parts."""
    kind = hf.get("model_type")
    warnings = []
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported "
                              "(slimtron's SwiGLU uses silu)")
        if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
            raise ConfigError(f"{where}: attention_bias and mlp_bias differ; slimtron has one "
                              "switch for all linear biases")
        heads = hf["num_attention_heads"]
        cfg = ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
            seq_length=hf["max_position_embeddings"],
            max_position_embeddings=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
            normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            position_embedding_type="rope", rotary_base=_rope_theta(hf, where), swiglu=True,
            add_bias_linear=bool(hf.get("attention_bias")),
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            hidden_dropout=0.0, attention_dropout=float(hf.get("attention_dropout", 0.0)))
    elif kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{where}: activation_function {act!r} is not supported")
        if act != "gelu":
            warnings.append(f"{where}: activation_function {act} is the tanh approximation of "
                            "gelu; slimtron uses the exact gelu, so logits differ slightly")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ConfigError(f"{where}: GPT-2 attention scaling other than 1/sqrt(head_dim) is "
                              "not supported")
        hidden = hf["n_embd"]
        cfg = ModelConfig(
            num_layers=hf["n_layer"], hidden_size=hidden,
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden, num_attention_heads=hf["n_head"],
            seq_length=hf["n_positions"], max_position_embeddings=hf["n_positions"],
            vocab_size=hf["vocab_size"], normalization="LayerNorm",
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="learned_absolute", swiglu=False, add_bias_linear=True,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
            hidden_dropout=float(hf.get("resid_pdrop", 0.1)),
            attention_dropout=float(hf.get("attn_pdrop", 0.1)))
    else:
        raise ConfigError(f"{where}: model_type {kind!r} is not supported (llama or gpt2)")
    return cfg, warnings
