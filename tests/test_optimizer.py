"""Loss scalers, LR schedule, weight decay, grad-norm accounting under TP/PP, mixed precision,
overflow skipping agreed by all ranks, and the optimizer's parameter-state round trip."""
import math

import pytest
import torch

from slimtron.config import ConfigError, OptimizerConfig, ParallelConfig
from slimtron.optim import (ConstantLossScaler, DynamicLossScaler, OptimizerParamScheduler,
                            build_optimizer, clip_grad_norm)
from slimtron.parallel.data_parallel import DataParallelGrads
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed
from tests.test_data_parallel import ToyTPModel, full_toy_params, toy_batch


# ---- loss scaler ---------------------------------------------------------------------------------
def _feed(scaler, overflows):
    seen = []
    for found_inf in overflows:
        scaler.update(found_inf)
        seen.append(scaler.scale)
    return seen


def test_dynamic_scaler_grows_after_a_clean_window_and_overflow_restarts_the_window():
    scaler = DynamicLossScaler(initial_scale=8, growth_interval=3, hysteresis=2)
    assert _feed(scaler, [False, False, False]) == [8, 8, 16]
    # An overflow (absorbed by hysteresis) restarts the window of clean steps.
    assert _feed(scaler, [False, True, False, False, False]) == [16, 16, 16, 16, 32]


def test_dynamic_scaler_backs_off_after_hysteresis_overflows_and_refills_it_on_growth():
    scaler = DynamicLossScaler(initial_scale=1024, growth_interval=2, hysteresis=2)
    assert _feed(scaler, [True, True, True]) == [1024, 512, 256]
    assert _feed(scaler, [False, False, True, True]) == [256, 512, 512, 256]


def test_dynamic_scaler_stops_at_min_scale_and_round_trips_its_state():
    scaler = DynamicLossScaler(initial_scale=4, min_scale=2, hysteresis=1, growth_interval=5)
    assert _feed(scaler, [True, True, True, False]) == [2, 2, 2, 2]
    clone = DynamicLossScaler(initial_scale=2 ** 10, min_scale=2, hysteresis=1, growth_interval=5)
    clone.load_state_dict(scaler.state_dict())
    assert _feed(clone, [False] * 4) == _feed(scaler, [False] * 4) == [2, 2, 2, 4]


def test_constant_scaler_never_changes_and_bad_scalers_are_refused():
    scaler = ConstantLossScaler(128.0)
    assert _feed(scaler, [True, False, True]) == [128.0] * 3
    scaler.load_state_dict(ConstantLossScaler(4.0).state_dict())
    assert scaler.scale == 128.0
    dynamic = DynamicLossScaler(initial_scale=2.0 ** 16, hysteresis=3)
    dynamic.load_state_dict(ConstantLossScaler(4.0).state_dict())
    assert _feed(dynamic, [True, True, True]) == [4.0, 4.0, 2.0]
    with pytest.raises(ConfigError, match="min-loss-scale"):
        DynamicLossScaler(initial_scale=1, min_scale=2)
    with pytest.raises(ConfigError, match="loss-scale"):
        ConstantLossScaler(0)


# ---- learning rate -------------------------------------------------------------------------------
def test_lr_schedule_values_at_known_iterations():
    cosine = OptimizerParamScheduler(1.0, 0.1, warmup_iters=2, decay_iters=10, decay_style="cosine")
    values = [cosine.lr_at(n) for n in (0, 1, 2, 3, 6, 10, 11)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.9657457896, 0.55, 0.1, 0.1])
    linear = OptimizerParamScheduler(1.0, 0.1, warmup_iters=2, decay_iters=10, decay_style="linear")
    assert [linear.lr_at(n) for n in (1, 4, 6, 12)] == pytest.approx([0.5, 0.775, 0.55, 0.1])
    constant = OptimizerParamScheduler(1.0, 0.1, warmup_iters=2, decay_style="constant")
    assert [constant.lr_at(n) for n in (1, 5, 10 ** 6)] == pytest.approx([0.5, 1.0, 1.0])
    cosine.step(3)
    resumed = OptimizerParamScheduler(1.0, 0.1, warmup_iters=2, decay_iters=10)
    resumed.load_state_dict(cosine.state_dict())
    assert resumed.get_lr() == pytest.approx(0.9657457896)


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay_style="step"), "lr-decay-style"),
    (dict(warmup_iters=10, decay_iters=10), "lr-decay-iters"),
    (dict(decay_iters=None), "lr-decay-iters"),
    (dict(min_lr=2.0), "min-lr"),
])
def test_lr_schedule_refuses_bad_settings(kwargs, match):
    args = dict(max_lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=10, decay_style="cosine")
    with pytest.raises(ConfigError, match=match):
        OptimizerParamScheduler(**{**args, **kwargs})


# ---- single-process optimizer behaviour ----------------------------------------------------------
def _setup(pstate, dtype=torch.float32, dist_opt=False, seed=0, **optim):
    model = ToyTPModel(pstate, full_toy_params(seed), dtype)
    grads = DataParallelGrads([model], pstate, bucket_size=7, use_distributed_optimizer=dist_opt)
    opt = build_optimizer([model], OptimizerConfig(**optim),
                          ParallelConfig(use_distributed_optimizer=dist_opt), pstate, grads,
                          train_iters=100)
    return model, grads, opt


def _train_step(model, grads, opt, pstate, step=0, corrupt=None):
    x, y = toy_batch(step)
    per_rank = x.shape[0] // pstate.dp.size
    x = x[pstate.dp.rank * per_rank:(pstate.dp.rank + 1) * per_rank]
    y = y[pstate.dp.rank * per_rank:(pstate.dp.rank + 1) * per_rank]
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    opt.scale_loss(loss).backward()
    grads.finish_grad_sync()
    if corrupt is not None:
        corrupt(opt)
    ok, norm, _ = opt.step()
    return loss.item(), ok


def _snapshot(model):
    return {p.global_name: p.detach().clone() for p in model.parameters()}


@pytest.mark.parametrize("dist_opt", [False, True])
def test_weight_decay_only_on_matrices(dist_opt):
    model, grads, opt = _setup(ParallelState.single(), dist_opt=dist_opt, lr=0.1,
                               weight_decay=0.5, lr_decay_style="constant", clip_grad=0.0)
    before = _snapshot(model)
    grads.zero_grad()  # zero gradients: AdamW moves parameters by weight decay alone
    ok, norm, _ = opt.step()
    assert ok and norm is None
    for p in model.parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        torch.testing.assert_close(p.detach(), before[p.global_name] * factor)


@pytest.mark.parametrize("dist_opt", [False, True])
def test_reload_model_params_refreshes_the_fp32_main_copy(dist_opt):
    model, grads, opt = _setup(ParallelState.single(), torch.bfloat16, dist_opt=dist_opt, bf16=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2)
    assert not all(torch.equal(s.main_param, s.model_part().float()) for s in opt.shards)
    opt.reload_model_params()
    assert all(torch.equal(s.main_param.view(-1), s.model_part().float()) for s in opt.shards)


def test_param_state_refuses_a_mismatched_range_and_build_checks_settings():
    model, grads, opt = _setup(ParallelState.single())
    state = opt.param_state()
    assert state["fc1.weight"]["range"] == (0, 48)
    assert state["fc1.weight"]["exp_avg"].abs().sum() == 0  # no update yet
    state["fc1.weight"]["range"] = (0, 24)
    with pytest.raises(ValueError, match="fc1.weight covers range"):
        opt.load_param_state(state)
    with pytest.raises(ConfigError, match="use-distributed-optimizer"):
        build_optimizer([model], OptimizerConfig(), ParallelConfig(use_distributed_optimizer=True),
                        ParallelState.single(), grads)
    with pytest.raises(ConfigError, match="fp16 and --bf16"):
        build_optimizer([model], OptimizerConfig(fp16=True, bf16=True), ParallelConfig(),
                        ParallelState.single(), grads)


# ---- grad norm under TP x PP ---------------------------------------------------------------------
def _full_grads():
    g = torch.Generator().manual_seed(7)
    return {"emb": torch.randn(8, 4, generator=g), "norm0": torch.randn(4, generator=g),
            "w1": torch.randn(4, 6, generator=g), "norm1": torch.randn(4, generator=g)}


def _norm_worker(rank, world):
    pstate = ParallelState.build(tp=2, pp=2)
    full = _full_grads()
    # (name, partition_dim or None, shared_embedding) held by each pipeline stage.
    layout = {0: [("emb", 0, True), ("norm0", None, False)],
              1: [("w1", 1, False), ("norm1", None, False), ("emb", 0, True)]}[pstate.pp.rank]
    params, grads = [], []
    for name, dim, shared in layout:
        grad = full[name] if dim is None else full[name].chunk(2, dim)[pstate.tp.rank]
        param = torch.nn.Parameter(torch.zeros_like(grad))
        param.tensor_model_parallel = dim is not None
        param.shared_embedding = shared
        params.append(param)
        grads.append(grad.clone())
    norm = clip_grad_norm(params, grads, 1.0, pstate.model.group, tp_rank=pstate.tp.rank,
                          first_stage=pstate.is_first_stage).item()
    coefficient = 1.0 / (norm + 1e-6)
    local = [full[n] if d is None else full[n].chunk(2, d)[pstate.tp.rank] for n, d, _ in layout]
    expected = [g * coefficient for g in local]
    clipped = all(torch.allclose(a, b) for a, b in zip(grads, expected))
    return norm, clipped


def test_grad_norm_counts_every_element_once_under_tp_and_pp():
    expected = math.sqrt(sum(g.pow(2).sum().item() for g in _full_grads().values()))
    results = run_distributed(_norm_worker, 4)
    for norm, clipped in results:
        assert norm == pytest.approx(expected, rel=1e-6)
        assert clipped


# ---- mixed precision, overflow agreement, parameter-state round trip (dp=2) ----------------------
def _mixed_precision_worker(rank, world):
    pstate = ParallelState.build()
    out = {}

    # bf16 model, fp32 main params, distributed optimizer.
    model, grads, opt = _setup(pstate, torch.bfloat16, dist_opt=True, lr=0.02,
                               lr_decay_style="constant", bf16=True)
    out["bf16_losses"] = [_train_step(model, grads, opt, pstate)[0] for _ in range(6)]
    out["bf16_main_fp32"] = all(s.main_param.dtype == torch.float32 for s in opt.shards)
    out["bf16_model_dtype"] = {p.dtype for p in model.parameters()}
    out["bf16_model_is_rounded_main"] = all(
        torch.equal(s.model_part(), s.main_param.to(torch.bfloat16)) for s in opt.shards)
    out["bf16_params"] = _snapshot(model)

    # Parameter-state round trip into a differently initialised replica.
    param_state, state = opt.param_state(), opt.state_dict()
    out["ranges"] = {name: entry["range"] for name, entry in param_state.items()}
    model2, grads2, opt2 = _setup(pstate, torch.bfloat16, dist_opt=True, seed=1, lr=0.02,
                                  lr_decay_style="constant", bf16=True)
    with torch.no_grad():
        for p, q in zip(model.parameters(), model2.parameters()):
            q.copy_(p)
    opt2.load_state_dict(state)
    opt2.load_param_state(param_state)
    continued = [_train_step(model, grads, opt, pstate, step=s) for s in (1, 2)]
    resumed = [_train_step(model2, grads2, opt2, pstate, step=s) for s in (1, 2)]
    out["resume_same_losses"] = continued == resumed
    out["resume_same_params"] = all(torch.equal(p, q) for p, q in
                                    zip(model.parameters(), model2.parameters()))
    out["resume_same_lr"] = opt.get_lr() == opt2.get_lr()

    # fp16 model with dynamic loss scaling (starts far too high: early steps overflow).
    model, grads, opt = _setup(pstate, torch.float16, lr=0.02, lr_decay_style="constant",
                               fp16=True, initial_loss_scale=2.0 ** 24)
    results = [_train_step(model, grads, opt, pstate) for _ in range(14)]
    out["fp16_ok"] = [ok for _, ok in results]
    out["fp16_losses"] = [loss for loss, _ in results]
    out["fp16_skipped"] = opt.num_skipped
    out["fp16_scale"] = opt.loss_scale
    out["fp16_main_fp32"] = all(s.main_param.dtype == torch.float32 for s in opt.shards)
    out["fp16_model_dtype"] = {p.dtype for p in model.parameters()}
    out["fp16_ranges_whole"] = all(e["range"] == (0, e["main_param"].numel())
                                   for e in opt.param_state().values())

    # An inf injected into one rank's own gradient shard after the reduction: all ranks skip.
    model, grads, opt = _setup(pstate, torch.float16, dist_opt=True, lr=0.02,
                               lr_decay_style="constant", fp16=True, initial_loss_scale=256.0,
                               hysteresis=1)

    def poison(optimizer):
        if pstate.dp.rank == 1:
            optimizer.shards[0].grad[0] = float("inf")

    first = _train_step(model, grads, opt, pstate)[1]
    before = _snapshot(model)
    skipped = _train_step(model, grads, opt, pstate, corrupt=poison)[1]
    out["inject_unchanged"] = all(torch.equal(p, before[p.global_name])
                                  for p in model.parameters())
    out["inject_counts"] = (opt.num_skipped, opt.num_updates, opt.loss_scale)
    later = [_train_step(model, grads, opt, pstate)[1] for _ in range(2)]
    out["inject_ok"] = [first, skipped] + later
    return out


def test_mixed_precision_overflow_skipping_and_param_state_round_trip():
    results = run_distributed(_mixed_precision_worker, 2)
    for out in results:
        assert out["bf16_main_fp32"] and out["bf16_model_dtype"] == {torch.bfloat16}
        assert out["bf16_model_is_rounded_main"]
        assert out["bf16_losses"][-1] < 0.8 * out["bf16_losses"][0]
        assert out["resume_same_losses"] and out["resume_same_params"] and out["resume_same_lr"]

        assert out["fp16_main_fp32"] and out["fp16_model_dtype"] == {torch.float16}
        ok = out["fp16_ok"]
        assert not ok[0] and ok[-1] and out["fp16_skipped"] == ok.count(False)
        assert out["fp16_scale"] < 2.0 ** 24
        first_update = ok.index(True)
        assert out["fp16_losses"][-1] < out["fp16_losses"][first_update]
        assert out["fp16_ranges_whole"]

        assert out["inject_ok"] == [True, False, True, True]
        assert out["inject_unchanged"]
        assert out["inject_counts"] == (1, 1, 128.0)
    assert results[0]["fp16_ok"] == results[1]["fp16_ok"]
    for name, value in results[0]["bf16_params"].items():
        assert torch.equal(value, results[1]["bf16_params"][name])  # all-gather kept DP in step
    # The two DP ranks' ranges tile each parameter exactly.
    numels = {name: p.numel() for name, p in results[0]["bf16_params"].items()}
    for name, numel in numels.items():
        spans = sorted(r["ranges"][name] for r in results if name in r["ranges"])
        covered = [i for start, end in spans for i in range(start, end)]
        assert covered == list(range(numel)), name
