"""The pipeline executor on real gloo ranks against the single-process run of the whole model."""
import pytest
import torch

from slimtron.parallel.p2p import Direction, StageLink
from slimtron.parallel.pipeline import forward_backward
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed

LAYERS, HIDDEN, SEQ, BATCH = 8, 6, 3, 2
SHAPE = (SEQ, BATCH, HIDDEN)
STEPS, LR = 2, 0.1


def toy_layers():
    """The whole model: 8 (Linear -> tanh) layers, seeded, so every rank builds the same ones.
    (tanh keeps its output for backward: freeing a sent output must not break that.)"""
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh())
            for _ in range(LAYERS)]


def toy_microbatches(m, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(SHAPE, generator=g), "target": torch.randn(SHAPE, generator=g)}
            for _ in range(m)]


def loss_of(output, microbatch, m):
    return ((output - microbatch["target"]) ** 2).mean() / m


def chunk_layer_ids(pp, stage, v):
    """Megatron's interleaved assignment: chunk c of stage s starts at c*L/v + s*L/(pp*v)."""
    per_chunk = LAYERS // (pp * v)
    starts = [c * LAYERS // v + stage * per_chunk for c in range(v)]
    return [list(range(start, start + per_chunk)) for start in starts]


def sgd_step(modules):
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p -= LR * p.grad
                p.grad = None


def layer_grads(layers, ids):
    return {i: [p.grad.clone() for p in layers[i].parameters()] for i in ids}


def reference(m, seed):
    """Losses and per-layer grads of STEPS training steps of the whole stack in one process."""
    layers, data = toy_layers(), toy_microbatches(m, seed)
    model = torch.nn.Sequential(*layers)
    history = []
    for _ in range(STEPS):
        losses = []
        for mb in data:
            loss = loss_of(model(mb["x"]), mb, m)
            loss.backward()
            losses.append(loss.item())
        history.append((losses, layer_grads(layers, range(LAYERS))))
        sgd_step(layers)
    return history


def pipelined(pstate, m, v, seed):
    """The same training on this stage's chunks through forward_backward, with a forward-only
    pass before each step; also reports whether every sent output was freed."""
    layers = toy_layers()
    ids = chunk_layer_ids(pstate.pp.size, pstate.pp.rank, v)
    chunks = [torch.nn.Sequential(*(layers[i] for i in chunk)) for chunk in ids]
    data = toy_microbatches(m, seed)
    last_chunk = pstate.is_last_stage
    outputs = []

    def forward_step(c, mb, input_tensor):
        x = mb["x"] if pstate.is_first_stage and c == 0 else input_tensor
        out = chunks[c](x)
        if last_chunk and c == v - 1:
            return loss_of(out, mb, m)
        outputs.append(out)
        return out

    history = []
    for _ in range(STEPS):
        eval_losses = forward_backward(chunks, forward_step, data, pstate, SHAPE, torch.float32,
                                       forward_only=True)
        no_grads = all(p.grad is None for c in chunks for p in c.parameters())
        outputs.clear()
        losses = forward_backward(chunks, forward_step, data, pstate, SHAPE, torch.float32)
        all_freed = all(out.numel() == 0 for out in outputs)
        history.append((losses, eval_losses, no_grads, all_freed,
                        layer_grads(layers, [i for chunk in ids for i in chunk])))
        sgd_step(chunks)
    return history


# (pp, v, m) layouts run inside one group of ranks; with dp > 1 each data-parallel replica is its
# own pipeline on its own data (pipeline ranks [0, 2] and [1, 3] when pp = 2 on 4 ranks).
LAYOUTS = {
    2: {2: [(1, 4), (1, 8), (2, 4), (2, 8)]},
    4: {4: [(1, 4), (1, 8), (2, 4), (2, 8)], 2: [(1, 4), (2, 6)]},
}


def run_layouts(rank, world, layouts):
    results = {}
    for pp, cases in layouts.items():
        pstate = ParallelState.build(pp=pp)
        for v, m in cases:
            results[(pp, v, m)] = (pstate.pp.rank, pstate.dp.rank,
                                   pipelined(pstate, m, v, seed=100 + pstate.dp.rank))
    return results


def assert_rel_close(actual, expected, what):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    err = (actual - expected).norm() / expected.norm()
    assert err <= 1e-6, f"{what}: relative error {err:.3g}"


def check_against_reference(per_rank, pp, v, m):
    for pp_rank, dp_rank, history in per_rank:
        ref = reference(m, seed=100 + dp_rank)
        for step, (losses, eval_losses, no_grads, all_freed, grads) in enumerate(history):
            where = f"pp={pp} v={v} m={m} stage {pp_rank} step {step}"
            ref_losses, ref_grads = ref[step]
            if pp_rank == pp - 1:
                assert len(losses) == m and len(eval_losses) == m, where
                losses, eval_losses = [float(x) for x in losses], [float(x) for x in eval_losses]
                assert_rel_close(losses, ref_losses, f"{where} losses")
                assert_rel_close(eval_losses, ref_losses, f"{where} forward-only losses")
            else:
                assert len(losses) == 0 and len(eval_losses) == 0, where
            assert no_grads, f"{where}: forward-only pass produced grads"
            if pp_rank < pp - 1 or v > 1:
                assert all_freed, f"{where}: a sent output kept its storage"
            assert len(grads) == LAYERS // pp, where
            for layer, layer_grad in grads.items():
                for got, want in zip(layer_grad, ref_grads[layer]):
                    assert_rel_close(got, want, f"{where} layer {layer} grad")


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_pipeline_matches_single_process(world):
    per_rank = run_distributed(run_layouts, world, LAYOUTS[world])
    for pp, cases in LAYOUTS[world].items():
        for v, m in cases:
            check_against_reference([r[(pp, v, m)] for r in per_rank], pp, v, m)


def test_single_stage_is_gradient_accumulation():
    history = pipelined(ParallelState.single(), m=4, v=1, seed=100)
    check_against_reference([(0, 0, history)], pp=1, v=1, m=4)


def test_last_chunk_must_return_scalar_loss():
    layer = torch.nn.Linear(HIDDEN, HIDDEN)
    with pytest.raises(ValueError, match="must return the scalar loss"):
        forward_backward([layer], lambda c, mb, x: layer(mb["x"]), toy_microbatches(2, 0),
                         ParallelState.single(), SHAPE, torch.float32)


def test_send_of_wrong_shape_or_dtype_is_refused():
    link = StageLink(ParallelState.single(), SHAPE, torch.float32)
    with pytest.raises(ValueError, match=r"forward send of a \(3, 2, 5\) torch.float32 tensor"):
        link.exchange([(Direction.FORWARD, torch.zeros(SEQ, BATCH, HIDDEN - 1))])
    with pytest.raises(ValueError, match="backward send of a .* torch.float64"):
        link.exchange([(Direction.BACKWARD, torch.zeros(SHAPE, dtype=torch.float64))])
