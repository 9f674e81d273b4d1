"""The single-process model: architecture against a plain-torch reference, padding, initialisation,
pipeline chunk building, recomputation, validation, meta builds; plus one 2-rank pipeline run."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from slimtron.config import ConfigError, ModelConfig, model_preset
from slimtron.model import GPTModel, Recompute, build_model_chunks, chunk_layer_numbers
from slimtron.parallel.finalize_grads import allreduce_embedding_grads
from slimtron.parallel.random import seed_default_generators
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed

SINGLE = ParallelState.single()


def tiny(kind: str, **overrides) -> ModelConfig:
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                  vocab_size=200, make_vocab_size_divisible_by=32, hidden_dropout=0.0,
                  attention_dropout=0.0)
    if kind == "llama":
        common.update(ffn_hidden_size=88, num_query_groups=2, normalization="RMSNorm",
                      position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                      untie_embeddings_and_output_weights=True)
    common.update(overrides)
    return ModelConfig(**common)


def batch(cfg: ModelConfig, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    return tokens, labels


# ---- an independent plain-torch forward, from the full state dict ----------------------------

def _ref_norm(cfg, sd, prefix, x):
    if cfg.normalization == "LayerNorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.norm_epsilon) * sd[prefix + ".weight"] + sd[prefix + ".bias"]
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_epsilon) * sd[prefix + ".weight"]


def _ref_linear(sd, prefix, x):
    y = x @ sd[prefix + ".weight"].t()
    return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y


def _ref_rope(x, base):  # x [b, heads, s, d]; pairs (i, i + d/2) rotated by pos * base^(-2i/d)
    d, s = x.shape[-1], x.shape[-2]
    theta = torch.tensor([base ** (-2.0 * i / d) for i in range(d // 2)])
    angle = torch.arange(s).float()[:, None] * theta[None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def _ref_attention(cfg, sd, p, x):
    b, s, _ = x.shape
    g, d = cfg.num_query_groups, cfg.kv_channels
    per = cfg.num_attention_heads // g
    qkv = _ref_linear(sd, p + "linear_qkv", x).view(b, s, g, per + 2, d)
    q = qkv[:, :, :, :per].reshape(b, s, g * per, d).transpose(1, 2)
    k = qkv[:, :, :, per].transpose(1, 2)
    v = qkv[:, :, :, per + 1].transpose(1, 2)
    if cfg.position_embedding_type == "rope":
        q, k = _ref_rope(q, cfg.rotary_base), _ref_rope(k, cfg.rotary_base)
    heads = []
    for h in range(g * per):
        scores = q[:, h] @ k[:, h // per].transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, h // per])
    return _ref_linear(sd, p + "linear_proj", torch.cat(heads, -1))


def _ref_mlp(cfg, sd, p, x):
    h = _ref_linear(sd, p + "linear_fc1", x)
    if cfg.swiglu:
        gate, up = h.chunk(2, -1)
        h = gate * torch.sigmoid(gate) * up
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return _ref_linear(sd, p + "linear_fc2", h)


def reference_logits(cfg, sd, tokens):
    x = sd["embedding.word_embeddings.weight"][tokens]
    if cfg.position_embedding_type == "learned_absolute":
        x = x + sd["embedding.position_embeddings.weight"][: tokens.shape[1]]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        x = x + _ref_attention(cfg, sd, p + "self_attention.", _ref_norm(cfg, sd, p + "input_layernorm", x))
        x = x + _ref_mlp(cfg, sd, p + "mlp.", _ref_norm(cfg, sd, p + "pre_mlp_layernorm", x))
    x = _ref_norm(cfg, sd, "decoder.final_layernorm", x)
    out = sd.get("output_layer.weight", sd["embedding.word_embeddings.weight"])
    return x @ out.t()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_model_matches_plain_torch_reference(kind):
    cfg = tiny(kind)
    model = GPTModel(cfg, SINGLE)
    tokens, labels = batch(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    expected = reference_logits(cfg, sd, tokens)
    logits = model(tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    loss = model(tokens, labels=labels)
    assert loss.shape == labels.shape and loss.dtype == torch.float32
    ref_loss = F.cross_entropy(expected[..., :cfg.vocab_size].reshape(-1, cfg.vocab_size),
                               labels.reshape(-1), reduction="none").view_as(labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_names_attributes_and_tying():
    gpt = GPTModel(tiny("gpt2"), SINGLE)
    names = dict(gpt.named_parameters())
    assert "output_layer.weight" not in names  # tied: the output reuses the word embeddings
    emb = names["embedding.word_embeddings.weight"]
    assert emb.shared_embedding and emb.tensor_model_parallel and emb.partition_dim == 0
    assert emb.full_shape == (224, 32)
    qkv = names["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert qkv.global_name == "decoder.layers.1.self_attention.linear_qkv.weight"
    assert names["decoder.layers.0.self_attention.linear_proj.weight"].partition_dim == 1
    assert not names["decoder.final_layernorm.weight"].tensor_model_parallel

    llama = GPTModel(tiny("llama"), SINGLE, sequence_parallel=True)
    names = dict(llama.named_parameters())
    fc1 = names["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.partition_chunks == 2 and fc1.full_shape == (176, 32)
    assert names["decoder.layers.0.input_layernorm.weight"].sequence_parallel
    assert not names["output_layer.weight"].shared_embedding
    assert not any(n.endswith(".bias") for n in names)
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 8, 32)


def test_initialisation_rules():
    cfg = tiny("gpt2", num_layers=8, hidden_size=64, vocab_size=1000, make_vocab_size_divisible_by=128)
    p = dict(GPTModel(cfg, SINGLE).named_parameters())
    emb = p["embedding.word_embeddings.weight"].detach()
    assert emb.shape[0] == 1024 and emb[1000:].abs().sum() == 0
    assert abs(emb[:1000].std().item() - 0.02) < 0.001
    proj = p["decoder.layers.3.self_attention.linear_proj.weight"].detach()
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert torch.all(p["decoder.layers.0.input_layernorm.weight"] == 1)
    assert torch.all(p["decoder.layers.0.mlp.linear_fc1.bias"] == 0)
    a, b = (p[f"decoder.layers.{i}.mlp.linear_fc1.weight"] for i in (0, 1))
    assert not torch.equal(a, b)  # every name draws its own values
    again = dict(GPTModel(cfg, SINGLE).named_parameters())
    assert all(torch.equal(p[n], again[n]) for n in p)
    other_seed = dict(GPTModel(cfg, SINGLE, seed=99).named_parameters())
    assert not torch.equal(p["decoder.layers.0.mlp.linear_fc1.weight"],
                           other_seed["decoder.layers.0.mlp.linear_fc1.weight"])


def test_params_dtype():
    model = GPTModel(tiny("llama"), SINGLE, params_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens, labels = batch(tiny("llama"))
    assert model(tokens, labels=labels).dtype == torch.float32


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_vocab_padding_does_not_change_loss(kind):
    tokens, labels = batch(tiny(kind))
    losses = []
    for multiple in (1, 128):
        cfg = tiny(kind, make_vocab_size_divisible_by=multiple)
        losses.append(GPTModel(cfg, SINGLE)(tokens, labels=labels))
    assert tiny(kind, make_vocab_size_divisible_by=128).padded_vocab_size() == 256
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


# ---- pipeline chunks -------------------------------------------------------------------------

def test_interleaved_layer_assignment():
    # 8 layers, 2 stages, 2 chunks: stage 0 holds [0,1] and [4,5], stage 1 holds [2,3] and [6,7].
    assert [chunk_layer_numbers(8, 2, 0, 2, c) for c in range(2)] == [[0, 1], [4, 5]]
    assert [chunk_layer_numbers(8, 2, 1, 2, c) for c in range(2)] == [[2, 3], [6, 7]]
    assert chunk_layer_numbers(8, 4, 3) == [6, 7]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pipeline_chunks_equal_the_single_model(kind):
    cfg = tiny(kind, num_layers=4)
    single = GPTModel(cfg, SINGLE)
    reference = dict(single.named_parameters())
    tokens, labels = batch(cfg)
    stages = [build_model_chunks(cfg, ParallelState.for_planning(tp=1, pp=2, dp=1, rank=r),
                                 virtual_pp_size=2, device="cpu") for r in range(2)]
    # Execution order of an interleaved pipeline: chunk 0 of every stage, then chunk 1.
    order = [stages[0][0], stages[1][0], stages[0][1], stages[1][1]]
    assert [m.layer_numbers for m in order] == [[0], [1], [2], [3]]
    assert order[0].pre_process and order[-1].post_process
    assert not any(m.post_process for m in order[:-1]) and not any(m.pre_process for m in order[1:])
    for chunk in order:
        for name, param in chunk.named_parameters():
            assert torch.equal(param, reference[name]), name
    if cfg.tied_embeddings:
        assert order[-1].embedding.word_embeddings.weight.shared_embedding
        assert not hasattr(order[-1].embedding, "position_embeddings")

    x = order[0](tokens)
    for chunk in order[1:-1]:
        x = chunk(hidden_states=x)
    loss = order[-1](hidden_states=x, labels=labels)
    torch.testing.assert_close(loss, single(tokens, labels=labels), rtol=1e-6, atol=1e-6)


def _pipeline_worker(rank, world):
    """PP=2 over real groups: stage 0 embeds and runs layer 0, stage 1 the rest and the loss."""
    pstate = ParallelState.build(tp=1, pp=2)
    cfg = tiny("gpt2")
    model = build_model_chunks(cfg, pstate)[0]
    tokens, labels = batch(cfg)
    shape = (cfg.seq_length, 2, cfg.hidden_size)
    if pstate.is_first_stage:
        out = model(tokens)
        dist.send(out.detach(), pstate.next_stage_rank)
        grad = torch.empty(shape)
        dist.recv(grad, pstate.next_stage_rank)
        out.backward(grad)
    else:
        x = torch.empty(shape)
        dist.recv(x, pstate.prev_stage_rank)
        x.requires_grad_(True)
        model(hidden_states=x, labels=labels).mean().backward()
        dist.send(x.grad, pstate.prev_stage_rank)
    before = model.embedding.word_embeddings.weight.grad.clone()
    allreduce_embedding_grads([model], pstate.embedding.group)
    return {"embedding_before": before,
            "grads": {p.global_name: p.grad for p in model.parameters()}}


def test_pipeline_stages_over_real_groups_match_single_model():
    results = run_distributed(_pipeline_worker, 2)
    cfg = tiny("gpt2")
    single = GPTModel(cfg, SINGLE)
    tokens, labels = batch(cfg)
    single(tokens, labels=labels).mean().backward()
    expected = {n: p.grad for n, p in single.named_parameters()}
    name = "embedding.word_embeddings.weight"
    # Each stage alone holds only its part of the tied gradient; the all-reduce completes it.
    assert not torch.allclose(results[0]["embedding_before"], expected[name], atol=1e-6)
    for stage in results:
        for n, grad in stage["grads"].items():
            torch.testing.assert_close(grad, expected[n], rtol=1e-5, atol=1e-7, msg=n)
    assert set(results[0]["grads"]) | set(results[1]["grads"]) == set(expected)


# ---- recomputation --------------------------------------------------------------------------

def _grads_with(cfg, recompute):
    model = GPTModel(cfg, SINGLE, recompute=recompute)
    tokens, labels = batch(cfg)
    seed_default_generators(5, SINGLE)
    model(tokens, labels=labels).mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [Recompute("full", "uniform", 2), Recompute("full", "block", 1),
                                       Recompute("selective"), "full"])
def test_recompute_gives_identical_grads_with_dropout(recompute):
    cfg = tiny("llama", num_layers=3, hidden_dropout=0.2, attention_dropout=0.2)
    plain = _grads_with(cfg, None)
    redone = _grads_with(cfg, recompute)
    for name in plain:
        torch.testing.assert_close(redone[name], plain[name], rtol=0, atol=0, msg=name)


def test_dropout_is_active_in_training_only():
    cfg = tiny("gpt2", hidden_dropout=0.3, attention_dropout=0.3)
    model = GPTModel(cfg, SINGLE)
    tokens, _ = batch(cfg)
    seed_default_generators(1, SINGLE)
    a, b = model(tokens), model(tokens)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)


def test_recompute_from_training_config():
    from slimtron.config import TrainingConfig
    assert Recompute.from_training_config(TrainingConfig()) is None
    r = Recompute.from_training_config(TrainingConfig(recompute_granularity="full",
                                                      recompute_method="block",
                                                      recompute_num_layers=2))
    assert r == Recompute("full", "block", 2)
    with pytest.raises(ConfigError, match="recompute-method"):
        Recompute("full", None)
    with pytest.raises(ConfigError, match="recompute-granularity"):
        Recompute("partial")


# ---- validation and planning ---------------------------------------------------------------

def _build(cfg, tp=1, pp=1, v=1, **kw):
    return build_model_chunks(cfg, ParallelState.for_planning(tp=tp, pp=pp, dp=1), v, **kw)


def test_layers_not_divisible_by_pp():
    with pytest.raises(ConfigError, match=r"--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"):
        _build(tiny("gpt2", num_layers=3), pp=2)


def test_layers_not_divisible_by_pp_times_virtual():
    with pytest.raises(ConfigError, match=r"--pipeline-model-parallel-size 2 x 2 virtual stages"):
        _build(tiny("gpt2", num_layers=6), pp=2, v=2)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"--num-attention-heads 6 is not divisible"):
        _build(tiny("gpt2", num_attention_heads=6, hidden_size=48), tp=4)


def test_query_groups_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"--num-query-groups 2 is not divisible"):
        _build(tiny("llama", num_attention_heads=8), tp=4)


def test_ffn_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"--ffn-hidden-size 90 is not divisible"):
        _build(tiny("gpt2", ffn_hidden_size=90), tp=4)


def test_hidden_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"--hidden-size 36 is not divisible"):
        _build(tiny("gpt2", hidden_size=36, num_attention_heads=8, kv_channels=4), tp=8)


def test_sequence_not_divisible_under_sequence_parallelism():
    with pytest.raises(ConfigError, match=r"--seq-length 18 is not divisible"):
        _build(tiny("gpt2", seq_length=18), tp=4, sequence_parallel=True)


def test_llama2_7b_builds_on_meta_with_its_parameter_count():
    chunks = build_model_chunks(model_preset("llama2-7b"), SINGLE, device="meta")
    assert sum(p.numel() for c in chunks for p in c.parameters()) == 6_738_415_616
    assert {p.device.type for p in chunks[0].parameters()} == {"meta"}


def test_planning_a_sharded_70b_stage_on_meta():
    pstate = ParallelState.for_planning(tp=8, pp=4, dp=1, rank=31)  # last stage, last tp rank
    chunks = build_model_chunks(model_preset("llama2-70b"), pstate, virtual_pp_size=2)
    assert [c.layer_numbers[0] for c in chunks] == [30, 70] and chunks[-1].post_process
    qkv = chunks[0].decoder.layers["30"].self_attention.linear_qkv.weight
    assert qkv.device.type == "meta" and qkv.shape == ((64 + 16) * 128 // 8, 8192)
    assert qkv.full_shape == ((64 + 16) * 128, 8192)
