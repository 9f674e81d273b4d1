"""--attention-backend: the unfused kernel (query blocks, bmm, masked softmax) against PyTorch's
SDPA, alone and inside the model, and what each backend name runs where."""
import pytest
import torch

from slimtron.config import ConfigError, ModelConfig, ParallelConfig, check_context_parallel
from slimtron.model import GPTModel, kernels
from slimtron.model.unfused_attention import unfused_causal_attention
from slimtron.parallel.random import seed_default_generators
from slimtron.parallel.state import ParallelState

SINGLE = ParallelState.single()


def qkv(s, b, heads, groups, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, d, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(s, b, groups, d, generator=g, dtype=dtype).requires_grad_()
            for _ in range(2))
    return q, k, v


def sdpa_reference(q, k, v, segment_ids=None):
    if segment_ids is None:
        return kernels.torch_attention(q, k, v, is_causal=True)
    return kernels.torch_attention(q, k, v, attn_mask=kernels.document_causal_mask(segment_ids))


def forward_and_grads(fn, q, k, v, seed=1):
    grad = torch.randn(q.shape[0], q.shape[1], q.shape[2] * q.shape[3],
                       generator=torch.Generator().manual_seed(seed), dtype=q.dtype)
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), grad)]


# (s, b, heads, groups, block): one block, several, a last block shorter than the rest, GQA
# with 2 and 4 heads per group, multi-query, one token
SHAPES = [(32, 2, 4, 4, 128), (40, 2, 4, 4, 16), (37, 3, 6, 3, 8), (24, 1, 8, 2, 5),
          (16, 2, 4, 1, 4), (1, 2, 4, 2, 128)]


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_unfused_equals_sdpa_in_fp64(shape, documents):
    s, b, heads, groups, block = shape
    q, k, v = qkv(s, b, heads, groups)
    segment_ids = None
    if documents:  # packed documents of random lengths (equal ids = one document)
        segment_ids = torch.randint(0, 3, (b, s), generator=torch.Generator().manual_seed(2))
        segment_ids = segment_ids.sort(dim=-1).values
    ours = forward_and_grads(lambda q, k, v: unfused_causal_attention(
        q, k, v, segment_ids=segment_ids, block=block), q, k, v)
    reference = forward_and_grads(lambda q, k, v: sdpa_reference(q, k, v, segment_ids), q, k, v)
    for name, a, r in zip(["out", "dq", "dk", "dv"], ours, reference):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)


def test_unfused_dropout_gradients_and_rate():
    q, k, v = qkv(24, 2, 4, 2, d=8)

    def seeded(q, k, v):  # the same mask on every call
        torch.manual_seed(3)
        return unfused_causal_attention(q, k, v, dropout_p=0.25, block=8)

    assert torch.autograd.gradcheck(seeded, (q, k, v))
    torch.testing.assert_close(seeded(q, k, v), seeded(q, k, v), rtol=0, atol=0)
    # Dropout of the probabilities: with v = 1 each output is the kept share of a row's mass,
    # rescaled, so its mean over many rows is ~1 and some rows differ from 1.
    q, k, _ = qkv(256, 4, 4, 4, d=8)
    ones = torch.ones(256, 4, 4, 8, dtype=torch.float64)
    torch.manual_seed(4)
    out = unfused_causal_attention(q, k, ones, dropout_p=0.25)
    assert out[1:].mean().item() == pytest.approx(1.0, abs=0.02)
    assert (out - 1).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unfused_half_precision_keeps_dtypes_and_tracks_fp32(dtype):
    q, k, v = qkv(48, 2, 4, 2, dtype=torch.float32)
    ref = forward_and_grads(lambda q, k, v: unfused_causal_attention(q, k, v, block=16), q, k, v)
    for p in (0.0, 0.1):
        low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = forward_and_grads(lambda q, k, v: unfused_causal_attention(
            q, k, v, dropout_p=p, block=16), *low)
        assert all(t.dtype == dtype for t in out)
        if p == 0.0:
            for a, r in zip(out, ref):
                torch.testing.assert_close(a.float(), r, rtol=0.05, atol=0.05)


def test_which_kernel_each_backend_runs():
    cpu, meta, bf16, fp16, fp32 = (torch.device("cpu"), torch.device("meta"), torch.bfloat16,
                                   torch.float16, torch.float32)
    assert kernels.attention_kernel("auto", cpu, bf16) == "unfused"
    assert kernels.attention_kernel("auto", cpu, fp16) == "unfused"
    assert kernels.attention_kernel("auto", cpu, fp32) == "flash"
    assert kernels.attention_kernel("auto", meta, bf16) == "flash"  # the dry run plans a GPU job
    for backend in ("unfused", "local"):
        for device, dtype in ((cpu, bf16), (cpu, fp32), (meta, bf16)):
            assert kernels.attention_kernel(backend, device, dtype) == "unfused"
    for backend in ("flash", "fused"):
        assert kernels.attention_kernel(backend, cpu, bf16) == "flash"
    with pytest.raises(ConfigError, match="--attention-backend must be"):
        ModelConfig(attention_backend="sdpa")
    with pytest.raises(ConfigError, match="--attention-backend unfused with "
                                          "--context-parallel-size 2: .* ring attention"):
        check_context_parallel(ModelConfig(attention_backend="unfused", attention_dropout=0.0,
                                           seq_length=16),
                               ParallelConfig(context_parallel_size=2))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_with_each_backend(dropout):
    """A Llama (GQA, RoPE) trains to the same fp32 loss and grads with either kernel; with
    attention dropout both draw masks from the same tracker (different masks, both train)."""
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
               seq_length=40, vocab_size=200, make_vocab_size_divisible_by=32, hidden_dropout=0.0,
               attention_dropout=dropout, normalization="RMSNorm", position_embedding_type="rope",
               swiglu=True, add_bias_linear=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (2, 40), generator=g)
    labels = torch.randint(0, 200, (2, 40), generator=g)
    results = {}
    for backend in ("flash", "unfused"):
        torch.manual_seed(0)
        model = GPTModel(ModelConfig(**cfg, attention_backend=backend), SINGLE)
        seed_default_generators(5, SINGLE)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        results[backend] = loss, {n: p.grad for n, p in model.named_parameters()}
    (loss_f, grads_f), (loss_u, grads_u) = results["flash"], results["unfused"]
    if dropout:
        assert abs(loss_f.item() - loss_u.item()) < 0.1 and loss_f.item() != loss_u.item()
        return
    torch.testing.assert_close(loss_u, loss_f, rtol=1e-5, atol=0)
    for name in grads_f:
        torch.testing.assert_close(grads_u[name], grads_f[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_unfused_recompute_replays_its_dropout(recompute):
    """Recomputation re-runs the unfused kernel in backward with the same dropout masks: grads
    equal to keeping everything, bit for bit."""
    from tests.test_model import _grads_with, tiny

    cfg = tiny("llama", num_layers=2, attention_dropout=0.2, hidden_dropout=0.1,
               attention_backend="unfused")
    plain = _grads_with(cfg, None)
    redone = _grads_with(cfg, recompute)
    for name in plain:
        torch.testing.assert_close(redone[name], plain[name], rtol=0, atol=0, msg=name)


def test_dry_run_counts_the_unfused_kernel_when_asked(capsys):
    from slimtron.dry_run import main

    argv = ["--preset", "tiny-llama", "--mock-data", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--bf16", "--attention-dropout", "0.1", "--dry-run",
            "--dry-run-world-size", "2"]
    assert "attention counted as: flash" in main(argv)
    assert "attention counted as: unfused" in main([*argv, "--attention-backend", "unfused"])
