"""Context parallelism: load-balanced sharding and ring attention against full causal attention."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from slimtron import memory
from slimtron.config import ModelConfig
from slimtron.model import GPTModel, kernels
from slimtron.parallel import context_parallel as cpar
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed


# ---- sharding --------------------------------------------------------------------------------

def test_each_rank_holds_chunk_i_and_its_mirror():
    x = torch.arange(16)
    assert cpar.shard_sequence(x, 0, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cpar.shard_sequence(x, 0, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert cpar.shard_sequence(x, 0, 4, 1).tolist() == [2, 3, 12, 13]
    assert cpar.local_positions(16, 4, 3).tolist() == [6, 7, 8, 9]
    assert cpar.shard_sequence(x, 0, 1, 0) is x


@pytest.mark.parametrize("cp", [2, 4])
def test_shard_unshard_round_trip(cp):
    batch = {"tokens": torch.randint(0, 100, (3, 24)), "loss_mask": torch.rand(3, 24)}
    shards = [cpar.shard_batch(batch, cp, r) for r in range(cp)]
    for key, value in batch.items():
        assert all(s[key].shape == (3, 24 // cp) for s in shards)
        assert torch.equal(cpar.unshard_sequence([s[key] for s in shards], 1), value)
    hidden = torch.randn(24, 2, 5)  # [s, b, h]
    parts = [cpar.shard_sequence(hidden, 0, cp, r) for r in range(cp)]
    assert torch.equal(cpar.unshard_sequence(parts, 0), hidden)


def test_stages_without_positions_rotate_by_their_chunks_positions():
    """A pipeline stage that reads no data (position_ids None) rotates its local tokens by their
    global positions: those of chunks i and 2cp-1-i, not 0..s/cp-1."""
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=32,
                         vocab_size=64, position_embedding_type="rope")
    pstate = ParallelState.for_planning(tp=1, pp=1, dp=1, cp=4, rank=1)
    model = GPTModel(config, pstate, pre_process=False, post_process=False, device="cpu")
    cos, sin = model._rotary(torch.zeros(8, 3, 16), None)
    expected = cpar.local_positions(32, 4, 1).expand(3, 8)
    torch.testing.assert_close((cos, sin), model.rotary(expected))
    assert expected[0].tolist() == [4, 5, 6, 7, 24, 25, 26, 27]


def test_indivisible_sequence_is_refused():
    with pytest.raises(ValueError, match="2 x context-parallel size 4 = 8"):
        cpar.shard_sequence(torch.zeros(2, 20), 1, 4, 0)


# ---- ring attention ----------------------------------------------------------------------------

SEQ, BATCH, HEAD_DIM = 48, 2, 8
CASES = [  # (heads, groups, with segment ids)
    (6, 2, False), (6, 3, True), (6, 6, False), (4, 1, True), (6, 2, True),
]


def _segments(seed: int) -> torch.Tensor:
    """Packed documents of random lengths: ``[b, s]`` ids; one sample starts a document at a
    chunk boundary and holds one-token documents."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(BATCH, SEQ, generator=g) < 0.15
    starts[0, SEQ // 4] = True  # a document starting exactly at a chunk boundary (cp=2)
    starts[1, 5:8] = True  # one-token documents
    return starts.long().cumsum(dim=1)


def _reference(heads, groups, with_segments, seed):
    """Inputs, weights of the scalar loss, and output and grads of SDPA on the whole sequence."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=g, requires_grad=True)
    weight = torch.randn(SEQ, BATCH, heads * HEAD_DIM, generator=g)
    segments = _segments(seed) if with_segments else None
    if segments is None:
        out = kernels.torch_attention(q, k, v, is_causal=True)
    else:
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        same = segments[:, :, None] == segments[:, None, :]
        out = kernels.torch_attention(q, k, v, attn_mask=(causal & same)[:, None])
    (out * weight).sum().backward()
    return (q, k, v, weight, segments), (out.detach(), q.grad, k.grad, v.grad)


def _check_ring(cp, label):
    """Ring attention on this rank's shards equals the shard of the reference, for every case."""
    for case, (heads, groups, with_segments) in enumerate(CASES):
        (q, k, v, weight, segments), expected = _reference(heads, groups, with_segments, seed=case)
        def shard(t, dim=0):
            return cpar.shard_sequence(t.detach(), dim, cp.size, cp.rank)
        ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
        out = cpar.ring_attention(ql, kl, vl, cp, None if segments is None else shard(segments, 1))
        (out * shard(weight)).sum().backward()
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad),
                                   expected):
            torch.testing.assert_close(got, shard(want), rtol=1e-5, atol=1e-5,
                                       msg=f"{label} heads={heads} groups={groups} "
                                           f"segments={with_segments}: {name}")


def _ring_worker(rank, world):
    whole = SimpleNamespace(size=world, rank=rank, ranks=list(range(world)), group=dist.group.WORLD)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = SimpleNamespace(size=2, rank=rank % 2, ranks=[rank - rank % 2, rank - rank % 2 + 1],
                           group=pairs[rank // 2])
    _check_ring(whole, "cp=4")
    _check_ring(pair, "cp=2")
    pstate = ParallelState.build(cp=world)
    _check_model(pstate)
    return _layer_activation_bytes(pstate)


MODEL_CONFIGS = {  # a GQA Llama (RoPE) and a GPT-2 (learned positions, tied embeddings, biases)
    "llama": ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
                         num_query_groups=2, seq_length=SEQ, vocab_size=100,
                         normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                         add_bias_linear=False, untie_embeddings_and_output_weights=True,
                         hidden_dropout=0.0, attention_dropout=0.0),
    "gpt2": ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, seq_length=SEQ,
                        vocab_size=100, hidden_dropout=0.0, attention_dropout=0.0),
}


def _model_loss_and_grads(pstate, tokens, labels, weight, recompute=None, arch="llama"):
    """Per-token loss of a tiny model (positions: the model's default) on this cp rank's
    tokens, and its parameter grads summed over cp (the dp x cp reduction's sum)."""
    model = GPTModel(MODEL_CONFIGS[arch], pstate, recompute=recompute)
    shard = lambda t: cpar.shard_sequence(t, 1, pstate.cp.size, pstate.cp.rank)  # noqa: E731
    loss = model(tokens=shard(tokens), labels=shard(labels))
    (loss * shard(weight)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for grad in grads.values():
        if pstate.cp.group is not None:
            dist.all_reduce(grad, group=pstate.cp.group)
    return loss.detach(), grads


def _check_model(pstate):
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 100, (2, 2, SEQ), generator=g)
    weight = torch.rand(2, SEQ, generator=g)
    # Recomputation re-runs the ring in backward.
    for arch, recompute in (("llama", None), ("llama", "selective"), ("llama", "full"),
                            ("gpt2", None)):
        ref_loss, ref_grads = _model_loss_and_grads(ParallelState.single(), tokens, labels,
                                                    weight, arch=arch)
        shard = cpar.shard_sequence(ref_loss, 1, pstate.cp.size, pstate.cp.rank)
        loss, grads = _model_loss_and_grads(pstate, tokens, labels, weight, recompute, arch)
        case = f"{arch}, recompute {recompute}"
        torch.testing.assert_close(loss, shard, rtol=1e-5, atol=1e-6, msg=f"loss, {case}")
        for name, ref in ref_grads.items():
            # 1e-5 relative to the tensor's scale: a summed grad (a bias over all tokens) is
            # added up in another order over cp ranks, an ulp of its largest entry apart
            torch.testing.assert_close(grads[name], ref, rtol=1e-5,
                                       atol=1e-5 * ref.abs().max().item(), msg=f"{name}, {case}")


def test_ring_attention_matches_full_attention_cp1():
    single = SimpleNamespace(size=1, rank=0, ranks=[0], group=None)
    _check_ring(single, "cp=1")


def _layer_activation_bytes(pstate) -> float:
    """Bytes autograd saves per layer of a bf16 decoder chunk on this cp rank's tokens."""
    from tests.test_memory import LLAMA, MICRO_BATCH
    model = GPTModel(LLAMA, pstate, pre_process=False, post_process=False,
                     params_dtype=torch.bfloat16)
    x = torch.randn(LLAMA.seq_length // pstate.cp.size, MICRO_BATCH, LLAMA.hidden_size,
                    dtype=torch.bfloat16, requires_grad=True)
    rotary = model.rotary(model._default_positions(MICRO_BATCH, x.shape[0], x.device))
    with memory.SavedActivations(exclude=[*model.parameters(), *rotary]) as saved:
        out = model.decoder(x, rotary)
    after_forward = saved.live
    out.float().sum().backward()
    assert saved.live == 0
    return after_forward / LLAMA.num_layers


def test_ring_attention_matches_full_attention_cp2_cp4():
    """One launch of 4 ranks: ring attention at cp=4 and (two pairs) cp=2, then a whole model at
    cp=4 against one process (Llama without, selective and full recomputation; GPT-2), then the
    memory model's activation bytes at cp=4."""
    from tests.test_memory import LLAMA, MICRO_BATCH
    per_layer = run_distributed(_ring_worker, 4)
    assert len(set(per_layer)) == 1  # load balancing: every cp rank keeps the same
    spec = memory.ActivationSpec(LLAMA.seq_length, MICRO_BATCH, cp=4, element_size=2)
    assert per_layer[0] == pytest.approx(memory.layer_activation_bytes(LLAMA, spec), rel=0.05)
    single = memory.ActivationSpec(LLAMA.seq_length, MICRO_BATCH, element_size=2)
    assert per_layer[0] * 4 == pytest.approx(memory.layer_activation_bytes(LLAMA, single), rel=0.05)


def test_ring_attention_keeps_dtype_and_refuses_odd_lengths():
    single = SimpleNamespace(size=1, rank=0, ranks=[0], group=None)
    q = torch.randn(8, 1, 4, 8, dtype=torch.bfloat16)
    k = torch.randn(8, 1, 2, 8, dtype=torch.bfloat16)
    out = cpar.ring_attention(q, k, k, single)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 1, 32)
    reference = kernels.torch_attention(q.float(), k.float(), k.float(), is_causal=True)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="local sequence length 7"):
        cpar.ring_attention(q[:7], k[:7], k[:7], single)


# ---- parity through the real training step ---------------------------------------------------

STEPS = 3


class UnevenLossMask:
    """The mock data with loss masks that differ between samples and between sequence chunks,
    so that cp ranks count different numbers of tokens (mock data alone masks nothing), and
    packed documents: ``segment_ids`` with boundaries inside and across chunks, positions
    restarting at each document."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = dict(self.dataset[i])
        mask = sample["loss_mask"].copy()
        s = len(mask)
        mask[:(i % 4) * s // 5] = 0.0  # a prefix of 0-60% of the sequence
        sample["loss_mask"] = mask
        starts = [0, 37 + 13 * (i % 5), s // 2 + 20 * (i % 3)]
        segments = np.zeros(s, dtype=np.int64)
        positions = np.arange(s, dtype=np.int64)
        for doc, start in enumerate(starts):
            segments[start:] = doc
            positions[start:] = np.arange(s - start)
        sample["segment_ids"], sample["position_ids"] = segments, positions
        return sample


def cp_config(**kwargs):
    """The parity model at seq 256 with 4 layers (GQA: 4 heads in 2 groups), STEPS steps."""
    from tests.test_training_parity import tiny_config
    config = tiny_config(num_layers=4, seq_length=256, **kwargs)
    config.training.train_iters = STEPS
    return config


def _train_cp_layout(rank, world, config):
    from slimtron.training import setup, train
    from tests.test_training_parity import local_shards
    engine = setup(config, world)
    train_set, *rest = engine.datasets
    engine.datasets = (None if train_set is None else UnevenLossMask(train_set), *rest)
    losses = []
    train(engine, on_iteration=lambda it, loss, norm: losses.append((loss, norm)))
    return engine.pstate.tp.rank, losses, local_shards(engine)


CP_LAYOUTS = {  # name: (world, config kwargs)
    "cp2": (2, dict(cp=2)),
    "tp2-cp2-sp": (4, dict(tp=2, cp=2, sp=True)),
    "cp2-pp2-dp2-distopt-overlap": (8, dict(cp=2, pp=2, dist_opt=True, overlap=True)),
}


@pytest.fixture(scope="module")
def cp_reference():
    from tests.test_training_parity import full_params
    results = run_distributed(_train_cp_layout, 1, cp_config(), timeout=600)
    return results[0][1], full_params(results)


@pytest.mark.parametrize("name", list(CP_LAYOUTS))
def test_cp_training_matches_single_process(name, cp_reference):
    from tests.test_training_parity import assert_close_params, full_params
    world, kwargs = CP_LAYOUTS[name]
    results = run_distributed(_train_cp_layout, world, cp_config(**kwargs), timeout=600)
    ref_losses, ref_params = cp_reference
    losses = results[-1][1]
    assert len(losses) == STEPS
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(losses, ref_losses), 1):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {step}"
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"grad norm at step {step}"
    assert ref_losses[-1][0] < ref_losses[0][0]  # it trains
    assert_close_params(full_params(results), ref_params)


def test_cp_per_token_loss_matches_single_process():
    """--calculate-per-token-loss: every token of the global batch weighs the same, counted over
    dp x cp (uneven masks make the cp ranks' counts differ)."""
    from tests.test_training_parity import assert_close_params, full_params
    reference = run_distributed(_train_cp_layout, 1, cp_config(per_token=True), timeout=600)
    results = run_distributed(_train_cp_layout, 4, cp_config(cp=2, per_token=True), timeout=600)
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
            zip(results[-1][1], reference[0][1]), 1):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {step}"
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"grad norm at step {step}"
    assert_close_params(full_params(results), full_params(reference))


@pytest.mark.parametrize("kwargs, change, message", [
    (dict(cp=4), dict(seq_length=260), "--seq-length 260 is not divisible by 2 x "
                                       "--context-parallel-size 4 = 8"),
    (dict(cp=2, tp=4, sp=True), dict(seq_length=260, num_query_groups=4),
     "--seq-length 260 / --context-parallel-size 2 = 130 is not divisible by "
     "--tensor-model-parallel-size 4"),
    (dict(cp=2), dict(attention_dropout=0.1), "--attention-dropout 0.1 with "
                                              "--context-parallel-size 2"),
])
def test_context_parallel_settings_are_checked(kwargs, change, message):
    import dataclasses

    from slimtron.arguments import validate
    from slimtron.config import ConfigError
    config = cp_config(**kwargs)
    config.model = dataclasses.replace(config.model, **change)
    with pytest.raises(ConfigError, match=message):
        validate(config, 8, check_files=False)


def test_context_parallel_splits_the_world():
    from slimtron.arguments import validate
    assert validate(cp_config(cp=2, tp=2), 8, check_files=False).parallel.data_parallel_size == 2


# ---- checkpoints reshard across cp -----------------------------------------------------------

def _train_and_save(rank, world, config):
    """Train from --load (if any) to --exit-interval or the end, then save to --save."""
    from slimtron.training import setup, train
    from slimtron.training.setup import save
    engine = setup(config, world)
    train_set, *rest = engine.datasets
    engine.datasets = (None if train_set is None else UnevenLossMask(train_set), *rest)
    losses = []
    train(engine, on_iteration=lambda it, loss, norm: losses.append((it, loss, norm)))
    save(engine)
    return losses


def _resumed(config, load, save, exit_interval=None):
    config.training.load, config.training.save = load, save
    config.training.exit_interval = exit_interval
    return config


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_checkpoint_reshards_across_cp(tmp_path, ckpt_format, cp_reference):
    """Save at cp=2 (distributed optimizer sharded over dp x cp = 2), resume at cp=1, save,
    resume at cp=2: every step's loss and grad norm equal the uninterrupted single-process run."""
    def config(cp, load, save, exit_interval=None):
        c = _resumed(cp_config(cp=cp, dist_opt=True), load, save, exit_interval)
        c.training.ckpt_format = ckpt_format
        return c
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    steps = run_distributed(_train_and_save, 2, config(2, None, a, exit_interval=1))[-1]
    steps += run_distributed(_train_and_save, 1, config(1, a, b, exit_interval=2))[0]
    steps += run_distributed(_train_and_save, 2, config(2, b, str(tmp_path / "c")))[-1]
    assert [it for it, _, _ in steps] == list(range(1, STEPS + 1))
    for (it, loss, norm), (ref_loss, ref_norm) in zip(steps, cp_reference[0]):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {it}"
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"grad norm at step {it}"


def test_dry_run_and_memory_model_divide_activations_by_cp():
    """The dry run (meta device, fake process group: the ring passes meta tensors without
    sending) and the closed form agree, and both halve the activations at cp=2 and the
    distributed optimizer's state per rank over dp x cp."""
    from slimtron.dry_run import dry_run
    activations, optimizer = {}, {}
    for cp in (1, 2):
        config = cp_config(cp=cp, dist_opt=True)
        measured = dry_run(config, 4)[0]
        planned = memory.plan_stage(config, 0, memory.num_microbatches(config))
        assert measured.activations == pytest.approx(planned.activations, rel=0.05)
        activations[cp], optimizer[cp] = measured.activations, measured.optimizer
    assert activations[2] == pytest.approx(activations[1] / 2, rel=0.01)
    assert optimizer[2] == pytest.approx(optimizer[1], rel=0.01)  # dp x cp = 4 shards either way
