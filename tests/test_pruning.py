"""Pruning removes exactly what it claims: the pruned model's logits equal the original's with the
pruned units zeroed (their output weights: fc2 columns of neurons, linear_proj columns of heads,
both output projections of removed layers; embedding channels zeroed, norms rescaled). The removed units are the least important ones; the
pruned checkpoint loads at TP=2 with the same logits and exports to a transformers Llama with
matching logits; bad targets are one-line errors that write nothing."""
import os

import numpy as np
import pytest
import torch

from slimtron.checkpointing import latest_iteration, load_checkpoint, load_common, save_checkpoint
from slimtron.config import Config, ModelConfig
from slimtron.data import IndexedDatasetBuilder
from slimtron.model import build_model_chunks
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed
from tests.test_hf_conversion import full_config, hf_load, perturb, tool

prune_tool = tool("prune", "tools")
to_hf = tool("convert_to_hf")
VOCAB = 8000  # the bundled tokenizer's, so that the HF export carries a tokenizer

# No norm epsilon: then dropping embedding channels is exactly zeroing them and rescaling the norms.
LLAMA = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=8,
                    num_query_groups=4, seq_length=32, vocab_size=VOCAB, normalization="RMSNorm",
                    norm_epsilon=0.0,
                    position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                    untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                    attention_dropout=0.0)
GPT2 = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                   seq_length=32, vocab_size=VOCAB, normalization="LayerNorm",
                   position_embedding_type="learned_absolute", swiglu=False, add_bias_linear=True,
                   hidden_dropout=0.0, attention_dropout=0.0)


def whole_model(cfg):
    pstate = ParallelState.single()
    model = build_model_chunks(cfg, pstate)[0]
    with torch.no_grad():
        perturb([model], cfg, pstate)
    return model.eval()


def tokens(b=3, s=32, seed=1):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("calib") / "calib")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(20):
            builder.add_document(rng.integers(0, VOCAB, size=int(rng.integers(20, 60))))
    return prefix


def save_whole(root, cfg):
    model = whole_model(cfg)
    save_checkpoint(root, 2, [model], None, ParallelState.single(), full_config(cfg), 0)
    return model


def run_prune(load, save, corpus, **targets):
    argv = ["--load", load, "--save", save, "--calib-data", corpus, "--calib-samples", "12",
            "--calib-batch-size", "4"]
    for flag, value in targets.items():
        argv += [f"--target-{flag.replace('_', '-')}", str(value)]
    return prune_tool.prune(prune_tool.parse_args(argv))


def load_pruned(root):
    _, common = load_common(root)
    config = Config.from_dict(common["config"])
    model = build_model_chunks(config.model, ParallelState.single())[0]
    load_checkpoint(root, [model], None, ParallelState.single(), config, load_optim=False,
                    load_rng=False, finetune=True)
    return model.eval(), config


@torch.no_grad()
def zero_pruned_units(model, plan):
    """The original model with every unit the plan drops contributing nothing (dropped embedding
    channels zero from the embedding on; RMSNorms rescaled to average over the kept ones)."""
    cfg = model.config
    head_cols = (cfg.num_attention_heads // cfg.num_query_groups) * cfg.kv_channels
    channels = sorted(set(range(cfg.hidden_size)) - set(plan.kept_channels))
    if channels:
        assert cfg.normalization == "RMSNorm" and cfg.norm_epsilon == 0
        model.embedding.word_embeddings.weight[:, channels] = 0
        for name, norm in model.named_modules():
            if name.endswith("layernorm"):
                norm.weight.mul_((len(plan.kept_channels) / cfg.hidden_size) ** 0.5)
        for layer in model.decoder.layers.values():
            layer.self_attention.linear_proj.weight[channels] = 0
            layer.mlp.linear_fc2.weight[channels] = 0
    for key, layer in model.decoder.layers.items():
        i = int(key)
        proj, fc2 = layer.self_attention.linear_proj, layer.mlp.linear_fc2
        if i not in plan.kept_layers:
            for lin in (proj, fc2):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            continue
        dropped_neurons = sorted(set(range(cfg.ffn_hidden_size)) - set(plan.kept_neurons[i]))
        fc2.weight[:, dropped_neurons] = 0
        for g in set(range(cfg.num_query_groups)) - set(plan.kept_groups[i]):
            proj.weight[:, g * head_cols:(g + 1) * head_cols] = 0
    return model


def check_least_important_removed(importance, plan):
    for i in plan.kept_layers:
        for scores, kept in ((importance.neurons[i], plan.kept_neurons[i]),
                             (importance.groups[i], plan.kept_groups[i]),
                             (importance.channels, plan.kept_channels)):
            dropped = sorted(set(range(len(scores))) - set(kept))
            if dropped:
                assert scores[kept].min() >= scores[dropped].max()
    dropped_layers = set(importance.layers) - set(plan.kept_layers)
    if dropped_layers:
        assert (max(importance.layers[i] for i in dropped_layers)
                <= min(importance.layers[i] for i in plan.kept_layers))


def _logits_at_tp2(rank, world, root):
    _, common = load_common(root)
    config = Config.from_dict(common["config"])
    pstate = ParallelState.build(tp=2, pp=1)
    model = build_model_chunks(config.model, pstate)[0].eval()
    load_checkpoint(root, [model], None, pstate, config, load_optim=False, load_rng=False,
                    finetune=True)
    with torch.no_grad():
        local = model(tokens=tokens())
    parts = [torch.empty_like(local) for _ in range(2)]
    torch.distributed.all_gather(parts, local, group=pstate.tp.group)
    return torch.cat(parts, dim=-1)[..., :VOCAB]


def test_llama_pruning_is_zeroing_loads_anywhere_and_exports(tmp_path, corpus):
    original = save_whole(str(tmp_path / "orig"), LLAMA)
    out = str(tmp_path / "pruned")
    # The tool's own importance, recomputed here to check the plan against it.
    from slimtron.post_training import pruning
    batches = prune_tool.calibration_batches(corpus, 12, 4, 32, VOCAB)
    importance = pruning.collect_importance(original, batches)
    result = run_prune(str(tmp_path / "orig"), out, corpus, ffn_hidden_size=32, num_layers=2,
                       num_attention_heads=4, hidden_size=24)
    plan = result["plan"]
    assert len(plan.kept_channels) == 24
    assert len(plan.kept_layers) == 2 and all(len(n) == 32 for n in plan.kept_neurons.values())
    assert all(len(g) == 2 for g in plan.kept_groups.values())
    check_least_important_removed(importance, plan)

    pruned, config = load_pruned(out)
    m = config.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups, m.kv_channels) == (2, 24, 32, 4, 2, 4)
    assert result["after"] == pruning.parameter_count(pruned) < result["before"]
    with torch.no_grad():
        got = pruned(tokens=tokens())[..., :VOCAB]
        want = zero_pruned_units(original, plan)(tokens=tokens())[..., :VOCAB]
    # Absolute tolerance 1e-5 of the logits' scale: without a norm epsilon a token of small
    # activations amplifies rounding, which only logits near zero show relatively.
    tol = dict(rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(got, want, **tol)

    tp2 = run_distributed(_logits_at_tp2, 2, out)[0]
    torch.testing.assert_close(tp2, got, **tol)

    hf_dir = str(tmp_path / "hf")
    assert to_hf.main(["--load", out, "--output", hf_dir]) == 0
    hf = hf_load(hf_dir, "LlamaForCausalLM")
    with torch.no_grad():
        theirs = hf(tokens()).logits
    torch.testing.assert_close(theirs, got, rtol=1e-4, atol=1e-4)


def test_gpt2_head_and_neuron_pruning_is_zeroing(tmp_path, corpus):
    original = save_whole(str(tmp_path / "orig"), GPT2)
    result = run_prune(str(tmp_path / "orig"), str(tmp_path / "pruned"), corpus,
                       ffn_hidden_size=40, num_attention_heads=2)
    pruned, config = load_pruned(str(tmp_path / "pruned"))
    assert (config.model.num_layers, config.model.num_attention_heads) == (3, 2)
    with torch.no_grad():
        got = pruned(tokens())[..., :VOCAB]
        want = zero_pruned_units(original, result["plan"])(tokens())[..., :VOCAB]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_targets_are_one_line_errors_and_write_nothing(tmp_path, corpus, capsys):
    save_whole(str(tmp_path / "orig"), LLAMA)
    base = ["--load", str(tmp_path / "orig"), "--save", str(tmp_path / "out"), "--calib-data",
            corpus, "--calib-samples", "4"]
    cases = [(["--target-num-attention-heads", "3"], "not a multiple of the 2 heads per query group"),
             (["--target-ffn-hidden-size", "65"], "between 1 and the model's 64"),
             (["--target-num-layers", "0"], "between 1 and the model's 3"),
             (["--calib-samples", "1000"], "fewer than --calib-samples 1000")]
    for extra, message in cases:
        assert prune_tool.main(base + extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("prune: error: ") and message in err and "\n" not in err, err
        assert not os.path.exists(tmp_path / "out") or latest_iteration(str(tmp_path / "out")) is None
