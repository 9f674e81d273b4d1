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
from slimtron.training.metrics import (IterationLog, ScalarLog, TensorBoard, ThroughputWindow,
                                       log, validation_block)
from slimtron.training.run_control import RunControl
from slimtron.training.setup import (Engine, TrainState, finish_saving, save, setup,
                                     shutdown_distributed)


# --------------------------------------------------------------------------------------- step
def make_forward_step(engine: Engine, loss_scale: float, forward_only: bool = False,
                      token_counts: Optional[list] = None):
    """The closure the pipeline executor calls for one (chunk, micro-batch). With a teacher
    (--kd-teacher-load) a training step's loss is the distillation loss; evaluation keeps the
    LM loss, so validation perplexities compare with and without distillation.

    --calculate-per-token-loss (Megatron's): each micro-batch returns its loss summed over its
    tokens, and appends its token count to ``token_counts``; the step divides by the global count
    (``finalize_grads``), so every token of the global batch weighs the same."""
    n = engine.num_microbatches
    per_token = engine.config.training.calculate_per_token_loss
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
            out = micro_batch_loss(out, teacher, batch, engine.config, engine.pstate.tp)
        mask = batch["loss_mask"].float()
        if per_token:
            if token_counts is not None:
                token_counts.append(mask.sum())
            return (out.float() * mask).sum() * loss_scale
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


def batch_loss_parts(engine: Engine, microbatches: list, forward_only: bool):
    """Forward (and backward) of one global batch. On the last stage, the loss as (numerator,
    denominator) summed over dp x cp: per-token, (loss summed over tokens, tokens); otherwise
    (sum of the replicas' mean losses, number of replicas). 0-dim fp32 device tensors; None
    elsewhere. Each cp rank's mean loss is its share times cp (make_forward_step)."""
    scale = 1.0 if forward_only else engine.optimizer.loss_scale
    counts = []
    losses = forward_backward(engine.model_chunks,
                              make_forward_step(engine, scale, forward_only, counts), microbatches,
                              engine.pstate, activation_shape(engine.config, engine.pstate),
                              engine.params_dtype, forward_only=forward_only)
    if not engine.pstate.is_last_stage:
        return None
    total = torch.stack([l.float() for l in losses]).sum() / scale
    weight = torch.stack(counts).sum() if counts else torch.ones_like(total)
    parts = torch.stack([total, weight.to(total)])
    comm.all_reduce(parts, engine.pstate.dp_cp.group)
    return parts[0], parts[1]


def run_batch(engine: Engine, microbatches: list, forward_only: bool) -> Optional[torch.Tensor]:
    """The batch's loss on every rank of the last stage (None elsewhere), as a 0-dim fp32 tensor
    on the device: reading it is a sync."""
    parts = batch_loss_parts(engine, microbatches, forward_only)
    return None if parts is None else parts[0] / parts[1]


def finalize_grads(engine: Engine, num_tokens: Optional[torch.Tensor] = None):
    finalize_model_grads(engine.model_chunks, engine.grads, tp_group=engine.pstate.tp.group,
                         embedding_group=engine.pstate.embedding.group, num_tokens=num_tokens)


def train_step(engine: Engine, microbatches: list, lr_increment: int = 1):
    """One optimizer step; ``lr_increment`` advances the lr schedule (its unit: 1 per update, or
    the batch's samples)."""
    engine.optimizer.zero_grad()
    parts = batch_loss_parts(engine, microbatches, forward_only=False)
    loss, num_tokens = (None, None) if parts is None else (parts[0] / parts[1], parts[1])
    if engine.config.training.calculate_per_token_loss:
        num_tokens = broadcast_from_last_stage(num_tokens, engine.pstate)
    else:
        num_tokens = None
    finalize_grads(engine, num_tokens)
    ok, grad_norm, _ = engine.optimizer.step(lr_increment)
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
    """Validation loss over ``num_iters`` global batches of the final size (forward only): the
    mean of the batches' losses, or with --calculate-per-token-loss, all their tokens' mean."""
    for chunk in engine.model_chunks:
        chunk.eval()
    gbs = engine.config.training.global_batch_size
    during_training = engine.num_microbatches  # under a batch ramp-up, not the final batch's
    if engine.batch is not None:
        engine.num_microbatches = gbs // engine.batch.per_microbatch
    total = torch.zeros(2, dtype=torch.float64, device=engine.pstate.device)
    try:
        with torch.no_grad():
            for i in range(num_iters):
                mbs = microbatches_for(dataset, first_sample + i * gbs, engine.config,
                                       engine.pstate, engine.num_microbatches)
                parts = batch_loss_parts(engine, mbs, forward_only=True)
                total += _broadcast_pair(parts, engine.pstate)
    finally:
        engine.num_microbatches = during_training
        for chunk in engine.model_chunks:
            chunk.train()
    numerator, denominator = total.tolist()
    return numerator / denominator if denominator else 0.0


def _broadcast_pair(parts, pstate: ParallelState) -> torch.Tensor:
    """The last stage's (numerator, denominator) on every rank, fp64."""
    if parts is not None:
        t = torch.stack(parts).detach().to(torch.float64)
    else:
        t = torch.zeros(2, dtype=torch.float64, device=pstate.device)
    if pstate.pp.group is not None:
        dist.broadcast(t, src=pstate.pp.ranks[-1], group=pstate.pp.group)
    return t


def log_validation(engine: Engine, label: str, loss: float, tb):
    text, scalars = validation_block(label, loss)
    log(engine.pstate, text)
    tb.scalars(engine.state.iteration, scalars)


def run_validation(engine: Engine, tb):
    t = engine.config.training
    runs_done = engine.state.iteration // t.eval_interval if t.eval_interval else 0
    first = runs_done * t.eval_iters * t.global_batch_size
    loss = evaluate(engine, engine.datasets[1], t.eval_iters, first)
    log_validation(engine, f"iteration {engine.state.iteration}", loss, tb)
    return loss


# ---------------------------------------------------------------------------------------- loop
def train(engine: Engine, on_iteration=None) -> TrainState:
    """Train to --train-iters (or an early exit: --exit-interval, --exit-duration-in-mins,
    SIGTERM with --exit-signal-handler, each of which saves first). ``on_iteration(iteration,
    loss, grad_norm)`` is called on every rank after each step (tests record losses with it).
    ``engine.state.exit_reason`` says why it stopped early (None at --train-iters)."""
    config, pstate = engine.config, engine.pstate
    scalars = ScalarLog(config, pstate)
    control = RunControl(config, pstate, engine.started)
    data = MicroBatchPrefetcher(engine.datasets[0], config, pstate, engine.num_microbatches,
                                engine.batch)
    try:
        _train_loop(engine, data, scalars, control, on_iteration)
    finally:
        data.close()
        control.close()
        scalars.close()
    finish_saving(engine)
    return engine.state


def _train_loop(engine: Engine, data: MicroBatchPrefetcher, scalars: ScalarLog,
                control: RunControl, on_iteration) -> None:
    config, pstate, s = engine.config, engine.pstate, engine.state
    t = config.training
    fpt = flops_per_token(config.model, config.model.seq_length)
    peak = device_peak(engine.params_dtype, pstate.device)
    window = ThroughputWindow()
    per_sample = engine.optimizer.scheduler.unit == "samples"
    while s.iteration < t.train_iters:
        batch_size = _set_batch_size(engine)
        control.before_step()
        batch = data.get(s.consumed_train_samples)  # the next step's is read meanwhile
        loss, ok, grad_norm = train_step(engine, batch, batch_size if per_sample else 1)
        s.iteration += 1
        s.consumed_train_samples += batch_size
        window.add(batch_size * config.model.seq_length)
        # The step's one read of device values: the loss (NaN accounting) with the grad norm.
        loss_all, grad_norm = read_step_scalars(broadcast_from_last_stage(loss, pstate), grad_norm)
        _account(engine, ok, loss_all)
        control.after_step(s.iteration)
        if on_iteration is not None:
            on_iteration(s.iteration, loss_all, grad_norm)
        if s.iteration % t.log_interval == 0:
            entry = _iteration_log(engine, window, batch_size, loss_all, grad_norm, fpt, peak)
            log(pstate, entry.line())
            scalars.scalars(s.iteration, entry.scalars())
            window.reset()
        if t.eval_interval and s.iteration % t.eval_interval == 0 and engine.available[1]:
            control.around_evaluation()
            run_validation(engine, scalars)
            control.around_evaluation()
        saved = bool(t.save and t.save_interval and s.iteration % t.save_interval == 0)
        if saved:
            save(engine)
        reason = control.exit_reason()
        if reason is not None:  # SIGTERM or time: save now (pretrain saves after --exit-interval)
            s.exit_reason = reason
            if t.save and not saved:
                save(engine)
            log(pstate, f" exiting at iteration {s.iteration}: {reason}")
            break
        if t.exit_interval and s.iteration % t.exit_interval == 0:
            log(pstate, f" exiting at iteration {s.iteration} (--exit-interval {t.exit_interval})")
            break


def _set_batch_size(engine: Engine) -> int:
    """This step's global batch (from consumed samples); the micro-batch count follows it."""
    consumed = engine.state.consumed_train_samples
    size, count = engine.batch.global_batch_size(consumed), engine.batch.num_microbatches(consumed)
    if count != engine.num_microbatches:
        engine.num_microbatches = count
        engine.grads.set_microbatches_per_step(count)
        p = engine.config.parallel
        if engine.pstate.virtual_pp_size > 1 and count % p.pp:
            raise ConfigError(f"interleaved schedule: {count} micro-batches (global batch {size} at "
                              f"{consumed} consumed samples) is not divisible by "
                              f"--pipeline-model-parallel-size {p.pp}")
    return size


def _iteration_log(engine: Engine, window: ThroughputWindow, batch_size: int, loss: float,
                   grad_norm, fpt: float, peak) -> IterationLog:
    s, t, world = engine.state, engine.config.training, engine.pstate.world_size
    seconds, tokens_per_s = window.read()
    tflops = tokens_per_s * fpt / world / 1e12
    return IterationLog(
        iteration=s.iteration, train_iters=t.train_iters, consumed_samples=s.consumed_train_samples,
        elapsed_ms=seconds * 1e3, tflops_per_gpu=tflops if t.log_throughput else None,
        learning_rate=engine.optimizer.get_lr(), global_batch_size=batch_size, loss=loss,
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
    cp = f" x cp {ps.cp.size}" if ps.cp.size > 1 else ""  # the line users grep, as before cp
    log(ps, f" slimtron: world {ps.world_size} = tp {ps.tp.size}{cp} x "
            f"pp {ps.pp.size} x dp {ps.dp.size}, {engine.num_microbatches} micro-batches of "
            f"{t.micro_batch_size} per step, {config.optim.params_dtype_name}")
    ignored = no_effect_here(config, ps)
    if ignored:
        log(ps, f" no effect on this device: {', '.join(ignored)}")
    if t.eval_only:
        if not engine.available[1]:
            raise ConfigError(f"--eval-only: --split {config.data.split} has no validation data")
        loss = evaluate(engine, engine.datasets[1], t.eval_iters)
        log_validation(engine, "evaluation (--eval-only)", loss, TensorBoard(None, ps))
    else:
        train(engine)
        if t.save and engine.state.last_saved_iteration != engine.state.iteration:
            save(engine)
            finish_saving(engine)
        # An early exit (Megatron's --exit-* flags) leaves without the final test evaluation.
        if t.eval_interval and engine.available[2] and engine.state.exit_reason is None:
            loss = evaluate(engine, engine.datasets[2], t.eval_iters)
            log_validation(engine, "the end of training for test data", loss,
                           TensorBoard(None, ps))
    shutdown_distributed()
    return engine.state


def no_effect_here(config: Config, pstate: ParallelState) -> list:
    """The Megatron flags given that change nothing on this device (reported once)."""
    flags = list(config.training.no_effect_flags)
    if config.training.empty_unused_memory_level and pstate.device.type != "cuda":
        flags.append("--empty-unused-memory-level (no CUDA cache)")
    return flags
