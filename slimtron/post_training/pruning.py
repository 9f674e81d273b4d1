"""Minitron-style structured pruning: rank units by their activations on calibration batches, keep
the most important ones, slice the weights.

Importance (Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron Approach"):
- MLP neuron ``j`` of a layer: the L2 norm, over every calibration token, of its activation (the
  input of ``linear_fc2``, after the gate);
- attention: the L2 norm, over every calibration token, of a query group's attention output (its
  heads' slices of the input of ``linear_proj``). Whole query groups are pruned (heads per group
  stay fixed), which in multi-head attention is pruning single heads;
- layers: the mean over tokens of ``1 - cos(x_in, x_out)`` (how much the layer changes the hidden
  state); the layers that change it least go;
- embedding channels (the hidden size): the L2 norm of each channel of every norm's output (both
  norms of every layer and the final norm), summed over the norms.

Width is pruned to the same size in every kept layer (each layer keeps its own best units), since a
``ModelConfig`` has one ffn size and one head count. Removing a neuron, head or layer is exactly
zeroing its output weights (``linear_fc2`` columns of a neuron, ``linear_proj`` columns of a head,
both output projections and their biases for a layer, which then adds nothing to the residual
stream), which is what tests/test_pruning.py checks. Removing embedding channels is zeroing them
everywhere up to the norms, which then average over fewer channels: with RMSNorm and no epsilon it
is exactly the zeroed model with every norm weight scaled by sqrt(kept / hidden) (also tested).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from slimtron.config import ConfigError, ModelConfig

_LAYER = "decoder.layers."


@dataclass
class Importance:
    neurons: dict  # layer index -> [ffn] L2 norm of each MLP neuron's activation
    groups: dict  # layer index -> [num_query_groups] L2 norm of each group's attention output
    layers: dict  # layer index -> mean(1 - cos(in, out))
    channels: torch.Tensor  # [hidden] summed L2 norms of each channel of the norms' outputs


@dataclass
class PrunePlan:
    """What survives, by the original model's indices (each list sorted)."""
    kept_layers: list
    kept_neurons: dict  # original layer index -> neuron indices
    kept_groups: dict  # original layer index -> query-group indices
    kept_channels: list  # embedding (hidden) channels


# ---- importance ----------------------------------------------------------------------------

@torch.no_grad()
def collect_importance(model, batches: Iterable[torch.Tensor]) -> Importance:
    """Importance of every unit of a whole (TP=1, PP=1) ``GPTModel`` over token batches ``[b, s]``."""
    cfg: ModelConfig = model.config
    heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
    neuron_sq, head_sq, change, tokens = {}, {}, {}, [0]
    channel_norms = {}
    hooks = []

    def neurons_of(i):
        def hook(module, args):
            h = args[0].float()
            neuron_sq[i] = neuron_sq.get(i, 0) + h.pow(2).sum(dim=(0, 1))
        return hook

    def heads_of(i):
        def hook(module, args):
            o = args[0].float()
            per_head = o.view(*o.shape[:2], cfg.num_attention_heads, -1).pow(2).sum(dim=(0, 1, 3))
            head_sq[i] = head_sq.get(i, 0) + per_head
        return hook

    def change_of(i):
        def hook(module, args, output):
            cos = F.cosine_similarity(args[0].float(), output.float(), dim=-1)
            change[i] = change.get(i, 0.0) + (1.0 - cos).sum().item()
        return hook

    def channels_of(name):
        def hook(module, args, output):
            channel_norms[name] = channel_norms.get(name, 0) + output.float().pow(2).sum(dim=(0, 1))
        return hook

    norms = [(n, m) for n, m in model.named_modules() if n.endswith("layernorm")]
    hooks += [m.register_forward_hook(channels_of(n)) for n, m in norms]
    for key, layer in model.decoder.layers.items():
        i = int(key)
        hooks += [layer.mlp.linear_fc2.register_forward_pre_hook(neurons_of(i)),
                  layer.self_attention.linear_proj.register_forward_pre_hook(heads_of(i)),
                  layer.register_forward_hook(change_of(i))]
    was_training = model.training
    model.eval()
    try:
        for tokens_batch in batches:
            model(tokens=tokens_batch)
            tokens[0] += tokens_batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not tokens[0]:
        raise ConfigError("pruning: no calibration tokens")
    groups = {i: sq.view(cfg.num_query_groups, heads_per_group).sum(dim=1).sqrt()
              for i, sq in head_sq.items()}
    return Importance(neurons={i: sq.sqrt() for i, sq in neuron_sq.items()}, groups=groups,
                      layers={i: c / tokens[0] for i, c in change.items()},
                      channels=sum(sq.sqrt() for sq in channel_norms.values()))


# ---- plan ----------------------------------------------------------------------------------

def _top(scores: torch.Tensor, k: int) -> list:
    """Indices of the ``k`` largest scores, in index order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def check_targets(cfg: ModelConfig, ffn: Optional[int], layers: Optional[int],
                  heads: Optional[int], hidden: Optional[int] = None) -> tuple[int, int, int, int]:
    """The targets (None = keep), checked against the model; one-line ConfigError otherwise."""
    ffn = cfg.ffn_hidden_size if ffn is None else ffn
    layers = cfg.num_layers if layers is None else layers
    heads = cfg.num_attention_heads if heads is None else heads
    hidden = cfg.hidden_size if hidden is None else hidden
    for flag, value, current in (("--target-ffn-hidden-size", ffn, cfg.ffn_hidden_size),
                                 ("--target-num-layers", layers, cfg.num_layers),
                                 ("--target-num-attention-heads", heads, cfg.num_attention_heads),
                                 ("--target-hidden-size", hidden, cfg.hidden_size)):
        if not 1 <= value <= current:
            raise ConfigError(f"{flag} {value} must be between 1 and the model's {current}")
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    if heads % per_group:
        raise ConfigError(f"--target-num-attention-heads {heads} is not a multiple of the "
                          f"{per_group} heads per query group (whole query groups are pruned)")
    return ffn, layers, heads, hidden


def make_plan(importance: Importance, cfg: ModelConfig, target_ffn: Optional[int] = None,
              target_layers: Optional[int] = None, target_heads: Optional[int] = None,
              target_hidden: Optional[int] = None) -> PrunePlan:
    ffn, num_layers, heads, hidden = check_targets(cfg, target_ffn, target_layers, target_heads,
                                                   target_hidden)
    groups = heads // (cfg.num_attention_heads // cfg.num_query_groups)
    layer_scores = torch.tensor([importance.layers[i] for i in range(cfg.num_layers)])
    kept = _top(layer_scores, num_layers)
    return PrunePlan(kept_layers=kept,
                     kept_neurons={i: _top(importance.neurons[i], ffn) for i in kept},
                     kept_groups={i: _top(importance.groups[i], groups) for i in kept},
                     kept_channels=_top(importance.channels, hidden))


def pruned_model_config(cfg: ModelConfig, plan: PrunePlan) -> ModelConfig:
    first = plan.kept_layers[0]
    groups = len(plan.kept_groups[first])
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    return dataclasses.replace(cfg, num_layers=len(plan.kept_layers),
                               hidden_size=len(plan.kept_channels),
                               ffn_hidden_size=len(plan.kept_neurons[first]),
                               num_attention_heads=groups * per_group, num_query_groups=groups,
                               kv_channels=cfg.kv_channels)


# ---- slicing -------------------------------------------------------------------------------

def _index(t: torch.Tensor, dim: int, keep: list) -> torch.Tensor:
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


def _slice_layer_param(suffix: str, t: torch.Tensor, cfg: ModelConfig, neurons: list,
                       groups: list) -> torch.Tensor:
    """One full parameter of a kept layer, restricted to its kept neurons / query groups."""
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    if suffix.startswith("self_attention.linear_qkv."):
        grouped = t.view(cfg.num_query_groups, -1, *t.shape[1:])  # [groups, (per_group+2)*d, ...]
        return _index(grouped, 0, groups).reshape(-1, *t.shape[1:])
    if suffix == "self_attention.linear_proj.weight":
        grouped = t.view(t.shape[0], cfg.num_query_groups, per_group * cfg.kv_channels)
        return _index(grouped, 1, groups).reshape(t.shape[0], -1)
    if suffix.startswith("mlp.linear_fc1."):
        if cfg.swiglu:  # [gate; up]: the same neurons of both halves
            return torch.cat([_index(half, 0, neurons) for half in t.chunk(2, dim=0)], dim=0)
        return _index(t, 0, neurons)
    if suffix == "mlp.linear_fc2.weight":
        return _index(t, 1, neurons)
    return t  # norms, output-projection biases


def hidden_dim(name: str) -> Optional[int]:
    """The dimension of a parameter that runs over the embedding channels (None: no such one)."""
    if name.endswith(("word_embeddings.weight", "position_embeddings.weight",
                      "output_layer.weight", "linear_qkv.weight", "linear_fc1.weight")):
        return 1
    if name.endswith(("layernorm.weight", "layernorm.bias", "linear_proj.weight",
                      "linear_proj.bias", "linear_fc2.weight", "linear_fc2.bias")):
        return 0
    return None  # the qkv and fc1 biases


def prune_state(full: dict, cfg: ModelConfig, plan: PrunePlan) -> dict:
    """Full (TP=1) tensors by global name -> the pruned model's, layers renumbered 0..L'-1."""
    new_index = {old: new for new, old in enumerate(plan.kept_layers)}
    out = {}
    for name, t in full.items():
        if name.startswith(_LAYER):
            index, suffix = name[len(_LAYER):].split(".", 1)
            old = int(index)
            if old not in new_index:
                continue
            t = _slice_layer_param(suffix, t, cfg, plan.kept_neurons[old], plan.kept_groups[old])
            name = f"{_LAYER}{new_index[old]}.{suffix}"
        dim = hidden_dim(name)
        if dim is not None and len(plan.kept_channels) < cfg.hidden_size:
            t = _index(t, dim, plan.kept_channels)
        out[name] = t.contiguous()
    return out


def prune_model(model, plan: PrunePlan, *, seed: int = 1234):
    """A new whole ``GPTModel`` holding ``model``'s pruned weights (same dtype and device)."""
    from slimtron.model import GPTModel
    from slimtron.parallel.state import ParallelState

    cfg = pruned_model_config(model.config, plan)
    param = next(model.parameters())
    pruned = GPTModel(cfg, ParallelState.single(param.device), params_dtype=param.dtype,
                      device=param.device, seed=seed, initialize=False)
    state = prune_state({p.global_name: p.detach() for p in model.parameters()}, model.config, plan)
    with torch.no_grad():
        for p in pruned.parameters():
            p.copy_(state[p.global_name])
    return pruned


def parameter_count(model) -> int:
    """Parameters of a whole model, counting the real vocabulary only (padding rows excluded)."""
    cfg = model.config
    padded = cfg.padded_vocab_size(1)
    total = 0
    for p in model.parameters():
        n = p.numel()
        if p.dim() == 2 and p.shape[0] == padded and p.global_name.endswith(
                ("word_embeddings.weight", "output_layer.weight")):
            n = cfg.vocab_size * p.shape[1]
        total += n
    return total


EMBEDDING_PARAMETERS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                        "output_layer.weight")


def non_embedding_count(model) -> int:
    """Parameters of the transformer layers and final norm (what width and depth pruning cut)."""
    return sum(p.numel() for p in model.parameters() if p.global_name not in EMBEDDING_PARAMETERS)


def describe(plan: PrunePlan, importance: Importance) -> str:
    removed = sorted(set(importance.layers) - set(plan.kept_layers))
    scores = ", ".join(f"{i}: {importance.layers[i]:.4f}" for i in sorted(importance.layers))
    return (f"layer importance (1 - cos) {{{scores}}}; removed layers {removed or 'none'}")
