"""Tensor and sequence parallelism equal one process: sharding, collectives, cross entropy, RNG
tracker, and full-model parity (logits, loss, every gradient) at TP=2 and TP=4 in one 4-rank run."""
import pytest
import torch
import torch.nn.functional as F

from slimtron.model import GPTModel
from slimtron.parallel.finalize_grads import allreduce_sequence_parallel_grads
from slimtron.model.transformer import hidden_dropout
from slimtron.parallel import comm
from slimtron.parallel.cross_entropy import vocab_parallel_cross_entropy
from slimtron.parallel.random import RNGStatesTracker, seed_default_generators
from slimtron.parallel.sharding import shard, unshard, unshard_like
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed
from tests.test_model import batch, tiny

SINGLE = ParallelState.single()


# ---- sharding ---------------------------------------------------------------------------------

def test_shard_takes_piece_r_of_every_block():
    full = torch.arange(16.0).view(8, 2)  # two blocks of 4 rows: [gate; up]
    assert shard(full, 0, 2, 1, chunks=2)[:, 0].tolist() == [4.0, 6.0, 12.0, 14.0]
    assert shard(full, 1, 2, 0).tolist() == full[:, :1].tolist()
    for chunks in (1, 2):
        shards = [shard(full, 0, 4, r, chunks) for r in range(4)] if chunks == 1 else \
                 [shard(full, 0, 2, r, chunks) for r in range(2)]
        assert torch.equal(unshard(shards, 0, chunks), full)


def test_shard_refuses_uneven_split():
    with pytest.raises(ValueError, match="dim 0 of size 6 is not divisible by tp_size 2 x chunks 2"):
        shard(torch.zeros(6, 2), 0, 2, 0, chunks=2)


# ---- cross entropy ------------------------------------------------------------------------------

def test_cross_entropy_matches_torch_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 12, generator=g, requires_grad=True)
    target = torch.randint(0, 10, (5, 3), generator=g)
    loss = vocab_parallel_cross_entropy(logits, target, vocab_size=10)
    loss.sum().backward()
    real = logits.detach()[..., :10].clone().requires_grad_(True)
    expected = F.cross_entropy(real.reshape(-1, 10), target.reshape(-1), reduction="none").view(5, 3)
    expected.sum().backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad[..., :10], real.grad)
    assert logits.grad[..., 10:].abs().sum() == 0


def test_fused_cross_entropy_in_blocks_and_in_bf16(monkeypatch):
    """Several blocks of rows (the last shorter) give fp64's exact loss and grads; in bf16 a
    confident target's gradient p - 1 keeps its precision (it comes from the fp32 exponential,
    not from a rounded probability)."""
    from slimtron import blockwise
    monkeypatch.setattr(blockwise, "CPU_BLOCK_BYTES", 4 * 12 * 4)  # 4 rows per block
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 10, (5, 3), generator=g)
    weights = torch.rand(5, 3, generator=g, dtype=torch.float64)
    (vocab_parallel_cross_entropy(logits, target, vocab_size=10) * weights).sum().backward()
    real = logits.detach()[..., :10].clone().requires_grad_(True)
    expected = F.cross_entropy(real.reshape(-1, 10), target.reshape(-1), reduction="none")
    (expected.view(5, 3) * weights).sum().backward()
    torch.testing.assert_close(logits.grad[..., :10], real.grad, rtol=1e-12, atol=1e-12)

    confident = torch.randn(6, 1000, generator=g)
    labels = torch.randint(0, 1000, (6,), generator=g)
    confident[torch.arange(6), labels] = 12.0  # p(target) ~ 1 - 1e-2
    low = confident.bfloat16().requires_grad_()
    vocab_parallel_cross_entropy(low, labels, vocab_size=1000).sum().backward()
    ref = confident.bfloat16().double().requires_grad_()
    F.cross_entropy(ref, labels, reduction="sum").backward()
    at_target = low.grad.double()[torch.arange(6), labels]
    torch.testing.assert_close(at_target, ref.grad[torch.arange(6), labels], rtol=2 ** -7, atol=0)


def _cross_entropy_over_tp(pstate):
    """tp=4 over a vocabulary of 5 padded to 16: rank 1 holds one real column, ranks 2 and 3
    padding only; blocks of 3 rows."""
    from slimtron import blockwise
    blockwise.CPU_BLOCK_BYTES = 4 * 4 * 3
    g = torch.Generator().manual_seed(0)
    full = torch.randn(7, 2, 16, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (7, 2), generator=g)
    weights = torch.rand(7, 2, generator=g, dtype=torch.float64)
    rank = pstate.tp.rank
    local = full[..., 4 * rank:4 * (rank + 1)].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, vocab_size=5, tp=pstate.tp)
    (loss * weights).sum().backward()
    real = full[..., :5].clone().requires_grad_()
    expected = F.cross_entropy(real.reshape(-1, 5), target.reshape(-1), reduction="none").view(7, 2)
    (expected * weights).sum().backward()
    reference_grad = torch.cat([real.grad, torch.zeros(7, 2, 11, dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local.grad, reference_grad[..., 4 * rank:4 * (rank + 1)],
                               rtol=1e-12, atol=1e-12)
    return True


# ---- RNG tracker --------------------------------------------------------------------------------

def test_tracker_fork_leaves_default_stream_and_states_restore():
    tracker = RNGStatesTracker.for_rank(3, SINGLE)
    torch.manual_seed(0)
    expected_default = torch.rand(4)
    torch.manual_seed(0)
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    assert torch.equal(torch.rand(4), expected_default)  # the forks did not touch the default stream
    assert not torch.equal(first, second)  # the tracker stream advances
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)
    with pytest.raises(KeyError, match="no stream named 'other'"):
        with tracker.fork("other"):
            pass


# ---- the 4-rank run -----------------------------------------------------------------------------

def _collectives(pstate):
    """Each collective forward and backward on rank-dependent data (checked in the parent)."""
    r = pstate.tp.rank
    ops = {
        "copy_to_tp": comm.copy_to_tp, "reduce_from_tp": comm.reduce_from_tp,
        "scatter_to_tp": comm.scatter_to_tp, "gather_from_tp": comm.gather_from_tp,
        "scatter_to_sp": comm.scatter_to_sequence_parallel,
        "gather_from_sp": comm.gather_from_sequence_parallel,
        "reduce_scatter_to_sp": comm.reduce_scatter_to_sequence_parallel,
    }
    out = {}
    for name, op in ops.items():
        x = (torch.arange(32.0).view(8, 4) * (r + 1)).requires_grad_(True)
        y = op(x, pstate.tp)
        y.backward(torch.ones_like(y) * (r + 1) + torch.arange(y.numel()).view_as(y))
        out[name] = (y.detach(), x.grad)
    return out


def _expected_collectives(world):
    """What every rank should see, computed from all ranks' inputs."""
    xs = [torch.arange(32.0).view(8, 4) * (r + 1) for r in range(world)]

    def grads(shape):
        return [torch.ones(shape) * (r + 1) + torch.arange(torch.Size(shape).numel()).view(shape)
                for r in range(world)]
    total = sum(xs)
    exp = {}
    g = grads((8, 4))
    exp["copy_to_tp"] = [(xs[r], sum(g)) for r in range(world)]
    exp["reduce_from_tp"] = [(total, g[r]) for r in range(world)]
    g = grads((8, 4 // world))
    exp["scatter_to_tp"] = [(xs[r].chunk(world, 1)[r], torch.cat(g, 1)) for r in range(world)]
    g = grads((8, 4 * world))
    exp["gather_from_tp"] = [(torch.cat(xs, 1), g[r].chunk(world, 1)[r]) for r in range(world)]
    g = grads((8 // world, 4))
    exp["scatter_to_sp"] = [(xs[r].chunk(world)[r], torch.cat(g)) for r in range(world)]
    g = grads((8 * world, 4))
    exp["gather_from_sp"] = [(torch.cat(xs), sum(g).chunk(world)[r]) for r in range(world)]
    g = grads((8 // world, 4))
    exp["reduce_scatter_to_sp"] = [(total.chunk(world)[r], torch.cat(g)) for r in range(world)]
    return exp


def _train_step(cfg, pstate, sequence_parallel):
    model = GPTModel(cfg, pstate, sequence_parallel=sequence_parallel)
    tokens, labels = batch(cfg)
    weights = torch.linspace(0.5, 1.5, labels.numel()).view_as(labels)
    logits = model(tokens).detach()
    loss = model(tokens, labels=labels)
    (loss * weights).sum().backward()
    allreduce_sequence_parallel_grads(model, pstate.tp.group)
    return {"logits": logits, "loss": loss.detach(),
            "grads": {p.global_name: p.grad for p in model.parameters()}}


def _dropout_checks(pstate):
    seed_default_generators(11, pstate)
    tracker = RNGStatesTracker.for_rank(11, pstate)
    outside = hidden_dropout(torch.ones(256), 0.5, True, False, tracker)
    with tracker.fork():
        inside = F.dropout(torch.ones(256), 0.5)
    # A whole step with both dropouts on: replicated grads must stay equal over TP ranks, which
    # needs identical residual-stream masks and per-rank attention masks.
    cfg = tiny("gpt2", hidden_dropout=0.2, attention_dropout=0.2, num_attention_heads=8)
    step = _train_step(cfg, pstate, sequence_parallel=False)
    replicated = {n: g for n, g in step["grads"].items() if "layernorm" in n or "position" in n}
    return {"outside": outside, "inside": inside, "replicated": replicated}


PARITY_CASES = [  # (kind, overrides, tp, sequence_parallel)
    ("gpt2", {}, 2, False),
    ("gpt2", {}, 2, True),
    ("llama", {}, 2, True),
    ("gpt2", {"num_attention_heads": 8}, 4, False),
    ("gpt2", {"num_attention_heads": 8}, 4, True),
    ("llama", {"num_attention_heads": 8, "num_query_groups": 4}, 4, False),
    ("llama", {"num_attention_heads": 8, "num_query_groups": 4}, 4, True),
    ("llama", {"num_attention_heads": 8, "num_query_groups": 4, "attention_backend": "unfused"},
     4, True),
]


def _four_rank_worker(rank, world):
    states = {2: ParallelState.build(tp=2), 4: ParallelState.build(tp=4)}
    results = {"collectives": _collectives(states[4]), "dropout": _dropout_checks(states[4]),
               "cross_entropy": _cross_entropy_over_tp(states[4]), "parity": []}
    for kind, overrides, tp, sp in PARITY_CASES:
        results["parity"].append(_train_step(tiny(kind, **overrides), states[tp], sp))
    return results


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_four_rank_worker, 4)


def test_fused_cross_entropy_over_tp_with_padding_only_ranks(four_ranks):
    assert all(result["cross_entropy"] for result in four_ranks)


def test_collectives_forward_and_backward(four_ranks):
    expected = _expected_collectives(4)
    for name, per_rank in expected.items():
        for r, (y, grad) in enumerate(per_rank):
            got_y, got_grad = four_ranks[r]["collectives"][name]
            torch.testing.assert_close(got_y, y, msg=f"{name} forward, rank {r}")
            torch.testing.assert_close(got_grad, grad, msg=f"{name} backward, rank {r}")


def test_dropout_masks_outside_and_inside_tp_regions(four_ranks):
    drops = [r["dropout"] for r in four_ranks]
    for d in drops[1:]:
        assert torch.equal(d["outside"], drops[0]["outside"])
        for name, grad in d["replicated"].items():
            torch.testing.assert_close(grad, drops[0]["replicated"][name], rtol=1e-5, atol=1e-7)
    insides = [d["inside"] for d in drops]
    assert all(not torch.equal(a, b) for i, a in enumerate(insides) for b in insides[i + 1:])
    assert (drops[0]["outside"] == 0).any() and drops[0]["replicated"]


def _assert_rel_close(got, expected, what):
    err = (got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
    assert err <= 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("case", range(len(PARITY_CASES)),
                         ids=[f"{k}-tp{tp}{'-sp' if sp else ''}{'-gqa' if o.get('num_query_groups') else ''}"
                              f"{'-unfused' if o.get('attention_backend') else ''}"
                              for k, o, tp, sp in PARITY_CASES])
def test_parity_with_single_process(four_ranks, case):
    kind, overrides, tp, sp = PARITY_CASES[case]
    cfg = tiny(kind, **overrides)
    ranks = [four_ranks[r]["parity"][case] for r in range(tp)]  # the TP group of rank 0
    ref = _train_step(cfg, SINGLE, sequence_parallel=False)
    reference = dict(GPTModel(cfg, SINGLE).named_parameters())
    vocab = cfg.vocab_size

    logits = unshard([r["logits"] for r in ranks], dim=2)
    _assert_rel_close(logits[..., :vocab], ref["logits"][..., :vocab], "logits")
    for r in ranks:
        _assert_rel_close(r["loss"], ref["loss"], "loss")

    assert set(ranks[0]["grads"]) == set(ref["grads"])
    for name, expected in ref["grads"].items():
        shards = [r["grads"][name] for r in ranks]
        if not reference[name].tensor_model_parallel:
            for other in shards[1:]:  # replicated grads agree over TP (SP ones after the all-reduce)
                _assert_rel_close(other, shards[0], f"{name} across TP ranks")
        full = unshard_like(shards, reference[name])
        if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
            assert full[vocab:].abs().sum() == 0, f"{name}: padded rows got a gradient"
            full, expected = full[:vocab], expected[:vocab]
        _assert_rel_close(full, expected, name)
