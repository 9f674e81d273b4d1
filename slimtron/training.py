"""The training loop: set-up, one step, evaluation, logging, checkpoints.

The order of things in a step (each a module's job):
  micro-batches (data) -> pipeline schedule (parallel.pipeline) running the model chunks ->
  data-parallel average (parallel.data_parallel) -> all-reduce of sequence-parallel and
  tied-embedding grads (model) -> unscale / clip / AdamW (optim) -> logging.
"""
from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from slimtron import checkpointing
from slimtron.arguments import validate
from slimtron.config import Config, ConfigError
from slimtron.flops import device_peak, flops_per_token, mfu
from slimtron.model import build_model_chunks
from slimtron.model.transformer import Recompute
from slimtron.optim import build_optimizer
from slimtron.parallel.data_parallel import DataParallelGrads
from slimtron.parallel.finalize_grads import finalize_model_grads
from slimtron.parallel.pipeline import forward_backward
from slimtron.parallel.random import seed_default_generators
from slimtron.parallel.state import ParallelState, init_distributed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    consecutive_nan_iterations: int = 0


@dataclass
class Engine:
    """Everything one rank trains with."""
    config: Config
    pstate: ParallelState
    model_chunks: list
    grads: DataParallelGrads
    optimizer: object
    datasets: tuple  # (train, valid, test), None where not needed
    state: TrainState
    params_dtype: torch.dtype
    num_microbatches: int
    available: tuple = (False, False, False)  # which splits exist (same on every rank)


# ------------------------------------------------------------------------------------ logging
def is_logging_rank(pstate: ParallelState) -> bool:
    """The last rank prints (it sits on the last pipeline stage, where the loss is)."""
    return pstate.rank == pstate.world_size - 1


def log(pstate: ParallelState, text: str):
    if is_logging_rank(pstate):
        print(text, flush=True)


def format_iteration_line(iteration: int, train_iters: int, consumed: int, elapsed_ms: float,
                          tflops_per_gpu: float, lr: float, global_batch: int, loss: float,
                          loss_scale: float, grad_norm: Optional[float], skipped: int, nans: int,
                          tokens_per_s: float, mfu_value: float, peak_label: str) -> str:
    """One line in Megatron's format, then tokens/s and MFU."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{stamp}] iteration {iteration:8d}/{train_iters:8d}",
        f" consumed samples: {consumed:12d}",
        f" elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f" throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.1f}",
        f" learning rate: {lr:.6E}",
        f" global batch size: {global_batch:5d}",
        f" lm loss: {loss:.6E}",
        f" loss scale: {loss_scale:.1f}",
    ]
    if grad_norm is not None:
        parts.append(f" grad norm: {grad_norm:.3f}")
    parts += [f" number of skipped iterations: {skipped:3d}",
              f" number of nan iterations: {nans:3d}",
              f" tokens per second: {tokens_per_s:.1f}",
              f" MFU: {100 * mfu_value:.2f}% (peak: {peak_label})"]
    return " |".join(parts) + " |"


class TensorBoard:
    """Scalars to TensorBoard on the logging rank when --tensorboard-dir is given."""

    def __init__(self, directory: Optional[str], pstate: ParallelState):
        self.writer = None
        if directory and is_logging_rank(pstate):
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=directory)

    def scalars(self, iteration: int, values: dict):
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(name, value, iteration)
            self.writer.flush()


# --------------------------------------------------------------------------------------- data
def build_datasets(config: Config, tokenizer, pstate: ParallelState):
    """(train, valid, test) datasets, and which of them exist (an empty split has none).
    Ranks that read no data (middle pipeline stages) get Nones but the same availability."""
    from slimtron.data import build_train_valid_test_datasets
    from slimtron.data.mock_dataset import MockGPTDataset

    t = config.training
    gbs = t.global_batch_size
    eval_runs = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 1
    num_samples = (t.train_iters * gbs, eval_runs * t.eval_iters * gbs, t.eval_iters * gbs)
    seq = config.model.seq_length
    if config.data.mock_data:
        datasets = tuple(MockGPTDataset(n, seq, config.model.vocab_size, t.seed + i)
                         for i, n in enumerate(num_samples))
    else:  # collective (rank 0 builds the index cache, the others wait): every rank calls it
        datasets = tuple(build_train_valid_test_datasets(
            config.data.data_path, config.data.split, seq, t.seed, num_samples,
            cache_dir=config.data.data_cache_path, eod_id=getattr(tokenizer, "eod", None),
            eod_mask_loss=config.data.eod_mask_loss, pstate=pstate))
    available = tuple(d is not None for d in datasets)  # the same on every rank
    if not (pstate.is_first_stage or pstate.is_last_stage):
        datasets = (None, None, None)
    return datasets, available


def microbatches_for(dataset, first_sample: int, config: Config, pstate: ParallelState,
                     num_microbatches: int) -> list:
    """This rank's micro-batches of the global batch starting at ``first_sample``.

    Megatron's sampler: each group of ``mbs * dp`` consecutive samples is one micro-batch step,
    data-parallel rank d taking the d-th ``mbs`` of it. Samples depend only on the global index,
    so any layout sees the same global batch and a resumed run the same data.
    """
    if dataset is None:
        return [None] * num_microbatches
    mbs, dp = config.training.micro_batch_size, pstate.dp_size
    out = []
    for k in range(num_microbatches):
        start = first_sample + k * mbs * dp + pstate.dp_rank * mbs
        if start + mbs > len(dataset):
            raise ConfigError(f"the dataset has {len(dataset)} samples; sample {start + mbs - 1} "
                              "was asked for (it was built for fewer iterations than this run)")
        samples = [dataset[start + j] for j in range(mbs)]
        out.append({key: torch.stack([torch.as_tensor(s[key], device="cpu") for s in samples])
                    .to(pstate.device) for key in samples[0]})
    return out


# --------------------------------------------------------------------------------------- step
def make_forward_step(engine: Engine, loss_scale: float):
    """The closure the pipeline executor calls for one (chunk, micro-batch)."""
    n = engine.num_microbatches

    def forward_step(chunk_index: int, batch: Optional[dict], input_tensor):
        model = engine.model_chunks[chunk_index]
        tokens = batch["tokens"] if (batch is not None and model.pre_process) else None
        positions = batch["position_ids"] if batch is not None else None
        labels = batch["labels"] if (batch is not None and model.post_process) else None
        out = model(tokens=tokens, position_ids=positions, labels=labels,
                    hidden_states=input_tensor)
        if not model.post_process:
            return out
        mask = batch["loss_mask"].float()
        loss = (out.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss * (loss_scale / n)

    return forward_step


def activation_shape(config: Config, pstate: ParallelState) -> tuple:
    seq = config.model.seq_length
    if config.parallel.sequence_parallel:
        seq //= pstate.tp_size
    return seq, config.training.micro_batch_size, config.model.hidden_size


def run_batch(engine: Engine, microbatches: list, forward_only: bool) -> Optional[float]:
    """Forward (and backward) of one global batch; the mean loss over DP on every rank of the
    last stage (None elsewhere)."""
    scale = 1.0 if forward_only else engine.optimizer.loss_scale
    losses = forward_backward(engine.model_chunks, make_forward_step(engine, scale), microbatches,
                              engine.pstate, activation_shape(engine.config, engine.pstate),
                              engine.params_dtype, forward_only=forward_only)
    if not engine.pstate.is_last_stage:
        return None
    total = torch.stack([l.float() for l in losses]).sum() / scale
    if engine.pstate.dp_group is not None:
        dist.all_reduce(total, group=engine.pstate.dp_group)
        total /= engine.pstate.dp_size
    return total.item()


def finalize_grads(engine: Engine):
    finalize_model_grads(engine.model_chunks, engine.grads, tp_group=engine.pstate.tp.group,
                         embedding_group=engine.pstate.embedding.group)


def train_step(engine: Engine, microbatches: list):
    engine.optimizer.zero_grad()
    loss = run_batch(engine, microbatches, forward_only=False)
    finalize_grads(engine)
    ok, grad_norm, _ = engine.optimizer.step()
    return loss, ok, grad_norm


def broadcast_from_last_stage(value: Optional[float], pstate: ParallelState) -> float:
    """Every rank learns the last stage's loss (for NaN checks and checkpoint decisions)."""
    t = torch.tensor([value if value is not None else 0.0], dtype=torch.float64,
                     device=pstate.device)
    if pstate.pp_group is not None:
        dist.broadcast(t, src=pstate.pp_ranks[-1], group=pstate.pp_group)
    return t.item()


# ----------------------------------------------------------------------------------- evaluate
def evaluate(engine: Engine, dataset, num_iters: int, first_sample: int = 0) -> Optional[float]:
    """Mean validation loss over ``num_iters`` global batches (forward only)."""
    for chunk in engine.model_chunks:
        chunk.eval()
    gbs = engine.config.training.global_batch_size
    total = 0.0
    with torch.no_grad():
        for i in range(num_iters):
            mbs = microbatches_for(dataset, first_sample + i * gbs, engine.config, engine.pstate,
                                   engine.num_microbatches)
            loss = run_batch(engine, mbs, forward_only=True)
            total += broadcast_from_last_stage(loss, engine.pstate)
    for chunk in engine.model_chunks:
        chunk.train()
    return total / max(num_iters, 1)


def log_validation(engine: Engine, label: str, loss: float, tb: TensorBoard):
    ppl = math.exp(min(20.0, loss))
    line = f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    bar = "-" * (len(line) + 1)
    log(engine.pstate, f"{bar}\n{line}\n{bar}")
    tb.scalars(engine.state.iteration, {"lm loss validation": loss, "lm loss validation ppl": ppl})


# ------------------------------------------------------------------------------------- set-up
def setup(config: Config, world_size: Optional[int] = None) -> Engine:
    """Initialise distributed, validate, build tokenizer, model, grads, optimizer, data; load."""
    device = init_distributed(config.parallel.distributed_backend,
                              config.parallel.distributed_timeout_minutes)
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    tokenizer = None
    if config.data.tokenizer_type:
        from slimtron.data.tokenizers import build_tokenizer
        tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
        config.model.vocab_size = tokenizer.vocab_size
    validate(config, world)
    p = config.parallel
    vpp = p.virtual_pipeline_size(config.model.num_layers)
    pstate = ParallelState.build(p.tp, p.pp, p.data_parallel_size, p.cp, device=device,
                                 virtual_pp_size=vpp,
                                 timeout=datetime.timedelta(minutes=p.distributed_timeout_minutes))
    seed = config.training.seed
    seed_default_generators(seed, pstate)
    params_dtype = DTYPES[config.optim.params_dtype_name]
    model_chunks = build_model_chunks(
        config.model, pstate, vpp, sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype, seed=seed, device=device,
        recompute=Recompute.from_training_config(config.training))
    grads = DataParallelGrads(model_chunks, pstate, p.bucket_size, p.overlap_grad_reduce,
                              p.use_distributed_optimizer)
    optimizer = build_optimizer(model_chunks, config.optim, p, pstate, grads,
                                train_iters=config.training.train_iters)
    t = config.training
    num_micro = t.global_batch_size // (t.micro_batch_size * pstate.dp_size)
    # The pipeline interleaves micro-batches, so "last micro-batch" is per parameter: a bucket's
    # reduction starts once each of its parameters has had all its gradients for the step.
    grads.set_microbatches_per_step(num_micro)
    engine = Engine(config, pstate, model_chunks, grads, optimizer, (None,) * 3, TrainState(),
                    params_dtype, num_micro)
    if t.load:
        load(engine)
    engine.datasets, engine.available = build_datasets(config, tokenizer, pstate)
    if not engine.available[0] and not t.eval_only:
        raise ConfigError(f"--split {config.data.split} leaves no training data")
    return engine


def load(engine: Engine):
    t = engine.config.training
    if checkpointing.latest_iteration(t.load) is None:
        log(engine.pstate, f" no checkpoint in {t.load}: starting from scratch")
        return
    info = checkpointing.load_checkpoint(
        t.load, engine.model_chunks, engine.optimizer, engine.pstate,
        engine.config, load_optim=not (t.no_load_optim or t.finetune), load_rng=not t.no_load_rng,
        finetune=t.finetune, rng_tracker=engine.model_chunks[0].rng_tracker)
    extra = info.get("extra", {})
    engine.state = TrainState(iteration=info["iteration"],
                              consumed_train_samples=info["consumed_samples"],
                              skipped_iterations=extra.get("skipped_iterations", 0),
                              nan_iterations=extra.get("nan_iterations", 0))
    log(engine.pstate, f" loaded checkpoint from {t.load} at iteration {info['iteration']}")


def save(engine: Engine):
    t = engine.config.training
    s = engine.state
    path = checkpointing.save_checkpoint(
        t.save, s.iteration, engine.model_chunks, engine.optimizer, engine.pstate, engine.config, s.consumed_train_samples,
        extra={"skipped_iterations": s.skipped_iterations, "nan_iterations": s.nan_iterations},
        rng_tracker=engine.model_chunks[0].rng_tracker)
    log(engine.pstate, f" saved checkpoint at iteration {s.iteration:7d} to {path}")


# ---------------------------------------------------------------------------------------- loop
def train(engine: Engine, on_iteration=None) -> TrainState:
    """Train to --train-iters (or --exit-interval). ``on_iteration(iteration, loss, grad_norm)``
    is called on every rank after each step (tests record losses with it)."""
    config, pstate, s = engine.config, engine.pstate, engine.state
    t = config.training
    tb = TensorBoard(t.tensorboard_dir, pstate)
    tokens_per_batch = t.global_batch_size * config.model.seq_length
    fpt = flops_per_token(config.model, config.model.seq_length)
    peak = device_peak(engine.params_dtype, pstate.device)
    train_ds = engine.datasets[0]
    window_start, window_iters = time.perf_counter(), 0
    while s.iteration < t.train_iters:
        batch = microbatches_for(train_ds, s.consumed_train_samples, config, pstate,
                                 engine.num_microbatches)
        loss, ok, grad_norm = train_step(engine, batch)
        s.iteration += 1
        s.consumed_train_samples += t.global_batch_size
        window_iters += 1
        loss_all = broadcast_from_last_stage(loss, pstate)
        _account(engine, ok, loss_all)
        if on_iteration is not None:
            on_iteration(s.iteration, loss_all, grad_norm)
        if s.iteration % t.log_interval == 0:
            elapsed = (time.perf_counter() - window_start) / window_iters
            tokens_per_s = tokens_per_batch / elapsed
            line = format_iteration_line(
                s.iteration, t.train_iters, s.consumed_train_samples, elapsed * 1e3,
                tokens_per_s * fpt / pstate.world_size / 1e12, engine.optimizer.get_lr(),
                t.global_batch_size, loss_all, engine.optimizer.loss_scale, grad_norm,
                s.skipped_iterations, s.nan_iterations, tokens_per_s,
                mfu(tokens_per_s / pstate.world_size, fpt, peak), str(peak))
            log(pstate, line)
            tb.scalars(s.iteration, {"lm loss": loss_all, "learning rate": engine.optimizer.get_lr(),
                                     "grad norm": grad_norm, "loss scale": engine.optimizer.loss_scale,
                                     "tokens per second": tokens_per_s})
            window_start, window_iters = time.perf_counter(), 0
        if t.eval_interval and s.iteration % t.eval_interval == 0 and engine.available[1]:
            run_validation(engine, tb)
        if t.save and t.save_interval and s.iteration % t.save_interval == 0:
            save(engine)
        if t.exit_interval and s.iteration % t.exit_interval == 0:
            log(pstate, f" exiting at iteration {s.iteration} (--exit-interval {t.exit_interval})")
            break
    return s


def run_validation(engine: Engine, tb: TensorBoard):
    t = engine.config.training
    runs_done = engine.state.iteration // t.eval_interval if t.eval_interval else 0
    first = runs_done * t.eval_iters * t.global_batch_size
    loss = evaluate(engine, engine.datasets[1], t.eval_iters, first)
    log_validation(engine, f"iteration {engine.state.iteration}", loss, tb)
    return loss


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
    t = config.training
    log(engine.pstate, f" slimtron: world {engine.pstate.world_size} = tp {engine.pstate.tp_size} x "
                       f"pp {engine.pstate.pp_size} x dp {engine.pstate.dp_size}, "
                       f"{engine.num_microbatches} micro-batches of {t.micro_batch_size} per step, "
                       f"{engine.config.optim.params_dtype_name}")
    if t.eval_only:
        if not engine.available[1]:
            raise ConfigError(f"--eval-only: --split {config.data.split} has no validation data")
        loss = evaluate(engine, engine.datasets[1], t.eval_iters)
        log_validation(engine, "evaluation (--eval-only)", loss, TensorBoard(None, engine.pstate))
    else:
        train(engine)
        if t.save and (not t.save_interval or engine.state.iteration % t.save_interval != 0):
            save(engine)
        if t.eval_interval and engine.available[2]:
            loss = evaluate(engine, engine.datasets[2], t.eval_iters)
            log_validation(engine, "the end of training for test data", loss,
                           TensorBoard(None, engine.pstate))
    shutdown_distributed()
    return engine.state


def shutdown_distributed():
    """Leave together: a process that exits while gloo's threads still serve a peer aborts."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
