"""The loop: one step, evaluation, training to the end, and ``pretrain`` (what pretrain_gpt.py runs).

The order of things in a step (each a module's job):
  micro-batches (training.data) -> pipeline schedule (parallel.pipeline) running the model chunks ->
  data-parallel average, sequence-parallel and tied-embedding all-reduces (parallel.finalize_grads)
  -> unscale / clip / AdamW (optim) -> logging (training.metrics).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from slimtron.config import Config, ConfigError
from slimtron.flops import device_peak, flops_per_token, mfu
from slimtron.parallel import comm
from slimtron.parallel.finalize_grads import finalize_model_grads
from slimtron.parallel.pipeline import forward_backward
from slimtron.parallel.state import ParallelState
from slimtron.post_training.distillation import micro_batch_loss
from slimtron.training.data import MicroBatchPrefetcher, microbatches_for
from slimtron.training.metrics import (IterationLog, TensorBoard, ThroughputWindow, log,
                                       validation_block)
from slimtron.training.setup import (Engine, TrainState, finish_saving, save, setup,
                                     shutdown_distributed)


# --------------------------------------------------------------------------------------- step
def make_forward_step(engine: Engine, loss_scale: float, forward_only: bool = False):
    """The closure the pipeline executor calls for one (chunk, micro-batch). With a teacher
    (--kd-teacher-load) a training step's loss is the distillation loss; evaluation keeps the
    LM loss, so validation perplexities compare with and without distillation."""
    n = engine.num_microbatches
    cp = engine.pstate.cp
    teacher = None if forward_only else engine.teacher

    def forward_step(chunk_index: int, batch: Optional[dict], input_tensor):
        model = engine.model_chunks[chunk_index]
        tokens = batch["tokens"] if (batch is not None and model.pre_process) else None
        positions = batch["position_ids"] if batch is not None else None
        labels = batch["labels"] if (batch is not None and model.post_process) else None
        segments = batch.get("segment_ids") if batch is not None else None
        distil = teacher is not None and model.post_process
        out = model(tokens=tokens, position_ids=positions, labels=None if distil else labels,
                    hidden_states=input_tensor, segment_ids=segments)
        if not model.post_process:
            return out
        if distil:
            out = micro_batch_loss(out, teacher, batch, engine.config, engine.pstate.tp.group)
        mask = batch["loss_mask"].float()
        # A cp rank holds part of each sequence: it divides by the whole sequence's token count
        # and scales by cp, since grads and the logged loss are averaged over dp x cp.
        count = comm.all_reduce(mask.sum(), cp.group)
        loss = (out.float() * mask).sum() * cp.size / count.clamp(min=1.0)
        return loss * (loss_scale / n)

    return forward_step


def activation_shape(config: Config, pstate: ParallelState) -> tuple:
    seq = config.model.seq_length // pstate.cp.size
    if config.parallel.sequence_parallel:
        seq //= pstate.tp.size
    return seq, config.training.micro_batch_size, config.model.hidden_size


def run_batch(engine: Engine, microbatches: list, forward_only: bool) -> Optional[torch.Tensor]:
    """Forward (and backward) of one global batch; the mean loss over DP on every rank of the
    last stage (None elsewhere), as a 0-dim fp32 tensor on the device: reading it is a sync.
    Each cp rank's loss is its share times cp (make_forward_step), so the mean over dp x cp is
    the mean over DP."""
    scale = 1.0 if forward_only else engine.optimizer.loss_scale
    losses = forward_backward(engine.model_chunks, make_forward_step(engine, scale, forward_only),
                              microbatches,
                              engine.pstate, activation_shape(engine.config, engine.pstate),
                              engine.params_dtype, forward_only=forward_only)
    if not engine.pstate.is_last_stage:
        return None
    total = torch.stack([l.float() for l in losses]).sum() / scale
    replicas = engine.pstate.dp_cp
    if replicas.group is not None:
        dist.all_reduce(total, group=replicas.group)
        total /= replicas.size
    return total


def finalize_grads(engine: Engine):
    finalize_model_grads(engine.model_chunks, engine.grads, tp_group=engine.pstate.tp.group,
                         embedding_group=engine.pstate.embedding.group)


def train_step(engine: Engine, microbatches: list):
    engine.optimizer.zero_grad()
    loss = run_batch(engine, microbatches, forward_only=False)
    finalize_grads(engine)
    ok, grad_norm, _ = engine.optimizer.step()
    return loss, ok, grad_norm


def broadcast_from_last_stage(value: Optional[torch.Tensor], pstate: ParallelState) -> torch.Tensor:
    """Every rank learns the last stage's loss (for NaN checks and checkpoint decisions), as a
    0-dim fp64 tensor on the device (no sync)."""
    if value is not None:
        t = value.detach().reshape(1).to(torch.float64)
    else:
        t = torch.zeros(1, dtype=torch.float64, device=pstate.device)
    if pstate.pp.group is not None:
        dist.broadcast(t, src=pstate.pp.ranks[-1], group=pstate.pp.group)
    return t[0]


def read_step_scalars(loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> tuple:
    """(loss, grad norm or None) as floats with one device->host sync for both."""
    if grad_norm is None:
        return loss.item(), None
    values = torch.stack([loss, grad_norm.to(loss.dtype)]).tolist()
    return values[0], values[1]


# ----------------------------------------------------------------------------------- evaluate
def evaluate(engine: Engine, dataset, num_iters: int, first_sample: int = 0) -> Optional[float]:
    """Mean validation loss over ``num_iters`` global batches (forward only)."""
    for chunk in engine.model_chunks:
        chunk.eval()
    gbs = engine.config.training.global_batch_size
    total = torch.zeros((), dtype=torch.float64, device=engine.pstate.device)
    with torch.no_grad():
        for i in range(num_iters):
            mbs = microbatches_for(dataset, first_sample + i * gbs, engine.config, engine.pstate,
                                   engine.num_microbatches)
            loss = run_batch(engine, mbs, forward_only=True)
            total += broadcast_from_last_stage(loss, engine.pstate)
    for chunk in engine.model_chunks:
        chunk.train()
    return total.item() / max(num_iters, 1)


def log_validation(engine: Engine, label: str, loss: float, tb: TensorBoard):
    text, scalars = validation_block(label, loss)
    log(engine.pstate, text)
    tb.scalars(engine.state.iteration, scalars)


def run_validation(engine: Engine, tb: TensorBoard):
    t = engine.config.training
    runs_done = engine.state.iteration // t.eval_interval if t.eval_interval else 0
    first = runs_done * t.eval_iters * t.global_batch_size
    loss = evaluate(engine, engine.datasets[1], t.eval_iters, first)
    log_validation(engine, f"iteration {engine.state.iteration}", loss, tb)
    return loss


# ---------------------------------------------------------------------------------------- loop
def train(engine: Engine, on_iteration=None) -> TrainState:
    """Train to --train-iters (or --exit-interval). ``on_iteration(iteration, loss, grad_norm)``
    is called on every rank after each step (tests record losses with it)."""
    config, pstate, s = engine.config, engine.pstate, engine.state
    t = config.training
    tb = TensorBoard(t.tensorboard_dir, pstate)
    fpt = flops_per_token(config.model, config.model.seq_length)
    peak = device_peak(engine.params_dtype, pstate.device)
    window = ThroughputWindow()
    data = MicroBatchPrefetcher(engine.datasets[0], config, pstate, engine.num_microbatches)
    try:
        _train_loop(engine, data, tb, window, fpt, peak, on_iteration)
    finally:
        data.close()
    finish_saving(engine)
    return s


def _train_loop(engine: Engine, data: MicroBatchPrefetcher, tb: TensorBoard,
                window: ThroughputWindow, fpt: float, peak, on_iteration) -> None:
    config, pstate, s = engine.config, engine.pstate, engine.state
    t = config.training
    while s.iteration < t.train_iters:
        batch = data.get(s.consumed_train_samples)  # the next step's is read meanwhile
        loss, ok, grad_norm = train_step(engine, batch)
        s.iteration += 1
        s.consumed_train_samples += t.global_batch_size
        window.add(t.global_batch_size * config.model.seq_length)
        # The step's one read of device values: the loss (NaN accounting) with the grad norm.
        loss_all, grad_norm = read_step_scalars(broadcast_from_last_stage(loss, pstate), grad_norm)
        _account(engine, ok, loss_all)
        if on_iteration is not None:
            on_iteration(s.iteration, loss_all, grad_norm)
        if s.iteration % t.log_interval == 0:
            entry = _iteration_log(engine, window, loss_all, grad_norm, fpt, peak)
            log(pstate, entry.line())
            tb.scalars(s.iteration, entry.scalars())
            window.reset()
        if t.eval_interval and s.iteration % t.eval_interval == 0 and engine.available[1]:
            run_validation(engine, tb)
        if t.save and t.save_interval and s.iteration % t.save_interval == 0:
            save(engine)
        if t.exit_interval and s.iteration % t.exit_interval == 0:
            log(pstate, f" exiting at iteration {s.iteration} (--exit-interval {t.exit_interval})")
            break


def _iteration_log(engine: Engine, window: ThroughputWindow, loss: float, grad_norm, fpt: float,
                   peak) -> IterationLog:
    s, t, world = engine.state, engine.config.training, engine.pstate.world_size
    seconds, tokens_per_s = window.read()
    return IterationLog(
        iteration=s.iteration, train_iters=t.train_iters, consumed_samples=s.consumed_train_samples,
        elapsed_ms=seconds * 1e3, tflops_per_gpu=tokens_per_s * fpt / world / 1e12,
        learning_rate=engine.optimizer.get_lr(), global_batch_size=t.global_batch_size, loss=loss,
        loss_scale=engine.optimizer.loss_scale,
        grad_norm=None if grad_norm is None else float(grad_norm),
        skipped_iterations=s.skipped_iterations, nan_iterations=s.nan_iterations,
        tokens_per_second=tokens_per_s, mfu=mfu(tokens_per_s / world, fpt, peak), peak=str(peak))


def _account(engine: Engine, ok: bool, loss: float):
    """Skipped (overflow) and NaN iterations; too many NaNs in a row stop the run."""
    s = engine.state
    if not ok:
        s.skipped_iterations += 1
    if math.isnan(loss) or math.isinf(loss):
        s.nan_iterations += 1
        s.consecutive_nan_iterations += 1
        limit = engine.config.optim.max_consecutive_nan_iters
        if s.consecutive_nan_iterations >= limit:
            raise RuntimeError(f"the loss was NaN or inf in {limit} iterations in a row (last at "
                               f"iteration {s.iteration}): stopping; lower --lr or use --bf16")
    else:
        s.consecutive_nan_iterations = 0


def pretrain(config: Config) -> TrainState:
    engine = setup(config)
    t, ps = config.training, engine.pstate
    log(ps, f" slimtron: world {ps.world_size} = tp {ps.tp.size} x cp {ps.cp.size} x "
            f"pp {ps.pp.size} x dp {ps.dp.size}, {engine.num_microbatches} micro-batches of "
            f"{t.micro_batch_size} per step, {config.optim.params_dtype_name}")
    if t.eval_only:
        if not engine.available[1]:
            raise ConfigError(f"--eval-only: --split {config.data.split} has no validation data")
        loss = evaluate(engine, engine.datasets[1], t.eval_iters)
        log_validation(engine, "evaluation (--eval-only)", loss, TensorBoard(None, ps))
    else:
        train(engine)
        if t.save and (not t.save_interval or engine.state.iteration % t.save_interval != 0):
            save(engine)
            finish_saving(engine)
        if t.eval_interval and engine.available[2]:
            loss = evaluate(engine, engine.datasets[2], t.eval_iters)
            log_validation(engine, "the end of training for test data", loss,
                           TensorBoard(None, ps))
    shutdown_distributed()
    return engine.state
