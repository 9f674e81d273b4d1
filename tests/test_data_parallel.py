"""Data parallelism: grad buffers, buckets, and parity of every DP/TP/optimizer layout with a plain
single-process PyTorch run of the same toy model."""
import pytest
import torch
import torch.distributed as dist

from slimtron.config import OptimizerConfig, ParallelConfig
from slimtron.optim import OptimizerParamScheduler, build_optimizer
from slimtron.parallel.data_parallel import DataParallelGrads, plan_buffer
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed

IN, HIDDEN, OUT = 6, 8, 3
GLOBAL_BATCH, STEPS = 8, 5


# ---- a toy model with Megatron's TP MLP structure ------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient over TP backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce over TP forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        if group is not None:
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def full_toy_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"norm.weight": 1 + 0.1 * torch.randn(IN, generator=g),
            "fc1.weight": 0.5 * torch.randn(HIDDEN, IN, generator=g),
            "fc2.weight": 0.5 * torch.randn(OUT, HIDDEN, generator=g),
            "out.bias": 0.1 * torch.randn(OUT, generator=g)}


def _param(full: torch.Tensor, name: str, dtype, pstate, partition_dim=None):
    tensor = full
    if partition_dim is not None:
        tensor = full.chunk(pstate.tp.size, partition_dim)[pstate.tp.rank]
    param = torch.nn.Parameter(tensor.to(dtype).clone())
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = partition_dim if partition_dim is not None else -1
    param.sequence_parallel = False
    param.shared_embedding = False
    param.global_name = name
    param.full_shape = tuple(full.shape)
    return param


class ToyTPModel(torch.nn.Module):
    """x * norm -> column-parallel fc1 -> tanh -> row-parallel fc2 (all-reduce) -> + bias."""

    def __init__(self, pstate, full: dict, dtype=torch.float32):
        super().__init__()
        self.group = pstate.tp.group
        self.dtype = dtype
        self.norm_weight = _param(full["norm.weight"], "norm.weight", dtype, pstate)
        self.fc1_weight = _param(full["fc1.weight"], "fc1.weight", dtype, pstate, partition_dim=0)
        self.fc2_weight = _param(full["fc2.weight"], "fc2.weight", dtype, pstate, partition_dim=1)
        self.out_bias = _param(full["out.bias"], "out.bias", dtype, pstate)

    def forward(self, x):
        h = _CopyToTP.apply(x.to(self.dtype) * self.norm_weight, self.group)
        h = torch.tanh(h @ self.fc1_weight.t())
        y = _ReduceFromTP.apply(h @ self.fc2_weight.t(), self.group)
        return (y + self.out_bias).float()


def toy_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


def unsharded_params(model, pstate) -> dict:
    out = {}
    for param in model.parameters():
        tensor = param.detach().float()
        if param.tensor_model_parallel and pstate.tp.size > 1:
            parts = [torch.empty_like(tensor) for _ in range(pstate.tp.size)]
            dist.all_gather(parts, tensor.contiguous(), group=pstate.tp.group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        out[param.global_name] = tensor
    return out


OPTIM = dict(lr=0.05, min_lr=0.005, lr_warmup_iters=1, lr_decay_style="cosine", weight_decay=0.1,
             clip_grad=0.5)


def train_toy(pstate, dist_opt: bool, overlap: bool, micro_batch: int, count_microbatches=False,
              bucket_size: int = 7, dtype=torch.float32, steps: int = STEPS, **optim):
    """Train the toy model; returns (global losses, grad norms, full params, overlap_started).

    The last micro-batch is told apart with no_sync(), or (``count_microbatches``) by declaring
    the number of micro-batches per step."""
    model = ToyTPModel(pstate, full_toy_params(), dtype)
    grads = DataParallelGrads([model], pstate, bucket_size, overlap, dist_opt)
    per_rank = GLOBAL_BATCH // pstate.dp.size
    if count_microbatches:
        grads.set_microbatches_per_step(per_rank // micro_batch)
    opt = build_optimizer([model], OptimizerConfig(**{**OPTIM, **optim}),
                          ParallelConfig(use_distributed_optimizer=dist_opt,
                                         overlap_grad_reduce=overlap), pstate, grads,
                          train_iters=steps)
    losses, norms, overlap_started = [], [], []
    for step in range(steps):
        x, y = toy_batch(step)
        x = x[pstate.dp.rank * per_rank:(pstate.dp.rank + 1) * per_rank]
        y = y[pstate.dp.rank * per_rank:(pstate.dp.rank + 1) * per_rank]
        opt.zero_grad()
        pieces = list(zip(x.split(micro_batch), y.split(micro_batch)))
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(pieces):
            loss = ((model(xm) - ym) ** 2).mean() / len(pieces)
            total += loss.detach()
            if i < len(pieces) - 1 and not count_microbatches:
                with grads.no_sync():
                    opt.scale_loss(loss).backward()
            else:
                opt.scale_loss(loss).backward()
        overlap_started.append(all(b.launched for b in grads.buckets))
        grads.finish_grad_sync()
        ok, norm, _ = opt.step()
        assert ok
        if pstate.dp.group is not None:
            dist.all_reduce(total, group=pstate.dp.group)
        losses.append(total.item() / pstate.dp.size)
        norms.append(norm)
    return losses, norms, unsharded_params(model, pstate), all(overlap_started)


def reference_run():
    """The same training in plain PyTorch: full model, AdamW, clip_grad_norm_."""
    model = ToyTPModel(ParallelState.single(), full_toy_params())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    adam = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}])
    schedule = OptimizerParamScheduler(OPTIM["lr"], OPTIM["min_lr"], OPTIM["lr_warmup_iters"],
                                       STEPS, OPTIM["lr_decay_style"])
    losses, norms = [], []
    for step in range(STEPS):
        x, y = toy_batch(step)
        adam.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_grad"]).item())
        for group in adam.param_groups:
            group["lr"] = schedule.lr_at(step)
        adam.step()
        losses.append(loss.item())
    return losses, norms, {p.global_name: p.detach().clone() for p in model.parameters()}


# ---- layout --------------------------------------------------------------------------------------
def test_plan_buffer_closes_buckets_at_size_and_chunk_boundaries_and_pads():
    offsets, buckets, total = plan_buffer([5, 4, 10, 3, 2], [1, 1, 1, 0, 0], bucket_size=8,
                                          pad_to=4)
    assert [(b.start, b.end, b.param_indices) for b in buckets] == \
        [(0, 12, [0, 1]), (12, 24, [2]), (24, 32, [3, 4])]
    assert offsets == [0, 5, 12, 24, 27] and total == 32
    _, unpadded, total = plan_buffer([5, 4, 10], [0, 0, 0], bucket_size=100)
    assert [(b.start, b.end) for b in unpadded] == [(0, 19)] and total == 19
    _, isolated, _ = plan_buffer([5, 4, 10, 3], [0] * 4, bucket_size=100, pad_to=2,
                                 isolated=[False, True, False, False])
    assert [(b.start, b.end, b.param_indices) for b in isolated] == \
        [(0, 6, [0]), (6, 10, [1]), (10, 24, [2, 3])]


def test_tied_embedding_gets_a_bucket_of_its_own():
    pstate = ParallelState.single()
    model = ToyTPModel(pstate, full_toy_params())
    model.fc1_weight.shared_embedding = True
    grads = DataParallelGrads([model], pstate, bucket_size=10 ** 6)
    assert [[p.global_name for p in b.params] for b in grads.buckets] == \
        [["out.bias", "fc2.weight"], ["fc1.weight"], ["norm.weight"]]


def test_buffers_accumulate_in_fp32_and_reverse_creation_order():
    model = ToyTPModel(ParallelState.single(), full_toy_params(), dtype=torch.bfloat16)
    grads = DataParallelGrads([model], ParallelState.single(), bucket_size=20)
    assert [p.global_name for p in grads.params] == \
        ["out.bias", "fc2.weight", "fc1.weight", "norm.weight"]
    assert [[p.global_name for p in b.params] for b in grads.buckets] == \
        [["out.bias", "fc2.weight"], ["fc1.weight"], ["norm.weight"]]
    (buffer,) = grads.buffers
    assert buffer.grad_data.dtype == torch.float32 and buffer.numel == 6 + 48 + 24 + 3
    x, y = toy_batch(0)
    for _ in range(2):
        ((model(x) - y) ** 2).mean().backward()
    # The same two backward passes without hooks, each bf16 grad added up in fp32.
    reference = ToyTPModel(ParallelState.single(), full_toy_params(), dtype=torch.bfloat16)
    expected = {p.global_name: torch.zeros(p.shape) for p in reference.parameters()}
    for _ in range(2):
        ((reference(x) - y) ** 2).mean().backward()
        for p in reference.parameters():
            expected[p.global_name] += p.grad.float()
            p.grad = None
    for p in model.parameters():
        assert p.grad is None and p.main_grad.dtype == torch.float32
        assert p.main_grad.data_ptr() >= buffer.grad_data.data_ptr()
        torch.testing.assert_close(p.main_grad, expected[p.global_name])
    grads.zero_grad()
    assert buffer.grad_data.abs().sum() == 0
    # Rebuilding the buffers moves the model to the new ones; the old hook no longer adds.
    rebuilt = DataParallelGrads([model], ParallelState.single(), bucket_size=20)
    ((model(x) - y) ** 2).mean().backward()
    assert buffer.grad_data.abs().sum() == 0
    torch.testing.assert_close(rebuilt.params[0].main_grad, expected["out.bias"] / 2)


def test_overlap_refuses_a_second_backward_outside_no_sync_and_syncs_unused_params():
    pstate = ParallelState.single()
    model = ToyTPModel(pstate, full_toy_params())
    model.unused = torch.nn.Parameter(torch.zeros(2))
    grads = DataParallelGrads([model], pstate, bucket_size=4, overlap_grad_reduce=True)
    x, y = toy_batch(0)
    ((model(x) - y) ** 2).mean().backward()
    unused_bucket = next(b for b in grads.buckets if model.unused in b.params)
    assert not unused_bucket.launched
    assert all(b.launched for b in grads.buckets if b is not unused_bucket)
    with pytest.raises(RuntimeError, match="no_sync"):
        ((model(x) - y) ** 2).mean().backward()
    grads.finish_grad_sync()
    assert not any(b.launched for b in grads.buckets)


def test_declared_microbatch_count_starts_buckets_after_the_last_one():
    pstate = ParallelState.single()
    model = ToyTPModel(pstate, full_toy_params())
    grads = DataParallelGrads([model], pstate, bucket_size=4, overlap_grad_reduce=True)
    grads.set_microbatches_per_step(2)
    x, y = toy_batch(0)
    ((model(x) - y) ** 2).mean().backward()
    assert not any(b.launched for b in grads.buckets)
    ((model(x) - y) ** 2).mean().backward()
    assert all(b.launched for b in grads.buckets)
    with pytest.raises(RuntimeError, match="set_microbatches_per_step"):
        ((model(x) - y) ** 2).mean().backward()


# ---- parity --------------------------------------------------------------------------------------
LAYOUTS = [(dist_opt, overlap, count) for dist_opt in (False, True)
           for overlap, count in ((False, False), (True, False), (True, True))]


def _parity_worker(rank, world):
    results = {}
    for tp in (2, 1):
        pstate = ParallelState.build(tp=tp)
        micro_batch = GLOBAL_BATCH // pstate.dp.size // 2  # two micro-batches per rank
        for dist_opt, overlap, count in LAYOUTS:
            results[(tp, pstate.dp.size, dist_opt, overlap, count)] = train_toy(
                pstate, dist_opt, overlap, micro_batch, count)
    return results


def _assert_close_run(run, reference, label):
    losses, norms, params, _ = run
    ref_losses, ref_norms, ref_params = reference
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5,
                               atol=1e-7, msg=f"losses differ: {label}")
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-7,
                               msg=f"grad norms differ: {label}")
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6,
                                   msg=f"{name} differs: {label}")


def test_dp_tp_and_distributed_optimizer_match_single_process_training():
    reference = reference_run()
    assert max(reference[1]) > OPTIM["clip_grad"], "clipping should be exercised"
    assert reference[0][-1] < reference[0][0]
    single = ParallelState.single()
    for dist_opt, overlap, count in LAYOUTS:  # dp=1: all 8 samples in 4 micro-batches
        _assert_close_run(train_toy(single, dist_opt, overlap, 2, count), reference,
                          f"dp=1 dist_opt={dist_opt} overlap={overlap} count={count}")
    per_rank = run_distributed(_parity_worker, 4)
    for rank, results in enumerate(per_rank):
        assert len(results) == 2 * len(LAYOUTS)
        for (tp, dp, dist_opt, overlap, count), run in results.items():
            label = (f"rank {rank} tp={tp} dp={dp} dist_opt={dist_opt} overlap={overlap} "
                     f"count={count}")
            _assert_close_run(run, reference, label)
            assert run[3] == overlap, f"buckets launched during backward: {label}"
