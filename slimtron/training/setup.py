"""Everything one rank trains (or evaluates) with, built once: process groups, model chunks, grad
buffers, optimizer, datasets; and the checkpoint load/save around them."""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from slimtron import checkpointing
from slimtron.arguments import validate
from slimtron.config import Config, ConfigError
from slimtron.model import build_model_chunks
from slimtron.model.transformer import Recompute
from slimtron.optim import build_optimizer, build_scheduler
from slimtron.optim.lr_schedule import OptimizerParamScheduler
from slimtron.parallel.data_parallel import DataParallelGrads
from slimtron.parallel.random import seed_default_generators
from slimtron.parallel.state import ParallelState, init_distributed
from slimtron.training.batch_schedule import BatchSchedule
from slimtron.training.data import build_datasets
from slimtron.training.metrics import log

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    consecutive_nan_iterations: int = 0
    last_saved_iteration: Optional[int] = None
    exit_reason: Optional[str] = None  # why training stopped before --train-iters, if it did


@dataclass
class Engine:
    """Everything one rank trains with (``grads`` and ``optimizer`` are None for evaluation)."""
    config: Config
    pstate: ParallelState
    model_chunks: list
    grads: Optional[DataParallelGrads]
    optimizer: object
    datasets: tuple  # (train, valid, test), None where not needed
    state: TrainState
    params_dtype: torch.dtype
    num_microbatches: int  # of the current step (it follows the batch schedule)
    available: tuple = (False, False, False)  # which splits exist (same on every rank)
    batch: Optional[BatchSchedule] = None  # global batch size by consumed samples
    started: float = field(default_factory=time.monotonic)  # --exit-duration-in-mins counts from
    async_saver: Optional[checkpointing.AsyncSaver] = None  # --async-save, made at first save
    teacher: Optional[torch.nn.Module] = None  # --kd-teacher-load, on the last pipeline stage


def build_tokenizer_for(config: Config):
    """The run's tokenizer (None without --tokenizer-type, or --vocab-file and --merge-file);
    its size becomes the model's."""
    from slimtron.data.tokenizers import tokenizer_from_data_config
    tokenizer = tokenizer_from_data_config(config.data, config.model.vocab_size)
    if tokenizer is None:
        return None
    config.model.vocab_size = tokenizer.vocab_size
    return tokenizer


def build_parallel_state(config: Config, device: torch.device) -> ParallelState:
    p = config.parallel
    return ParallelState.build(p.tp, p.pp, p.data_parallel_size, p.cp, device=device,
                               virtual_pp_size=p.virtual_pipeline_size(config.model.num_layers),
                               timeout=datetime.timedelta(minutes=p.distributed_timeout_minutes))


def setup(config: Config, world_size: Optional[int] = None, *, training: bool = True,
          tokenizer=None) -> Engine:
    """Initialise distributed, validate, build tokenizer, model, (grads, optimizer,) data; load.

    ``training=False`` builds no gradient buffers and no optimizer (evaluation); ``tokenizer``
    replaces the one --tokenizer-type names (the caller has set the model's vocabulary)."""
    started = time.monotonic()
    p, t = config.parallel, config.training
    device = init_distributed(p.distributed_backend, p.distributed_timeout_minutes)
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    if tokenizer is None:
        tokenizer = build_tokenizer_for(config)
    validate(config, world)
    pstate = build_parallel_state(config, device)
    seed_default_generators(t.seed, pstate)
    # A checkpoint about to overwrite every weight: draw no initial values (start-up time).
    weights_from_checkpoint = (bool(t.load) and not t.finetune
                               and checkpointing.latest_iteration(t.load) is not None)
    engine = build_training_parts(config, pstate, device, training=training,
                                  initialize=not weights_from_checkpoint)
    engine.started = started
    if training and t.kd_teacher_load:
        from slimtron.post_training.distillation import load_teacher
        engine.teacher = load_teacher(t.kd_teacher_load, config, pstate,
                                      sequence_parallel=p.sequence_parallel,
                                      params_dtype=engine.params_dtype, seed=t.seed)
        log(pstate, f" distillation from {t.kd_teacher_load}: the training loss (logged as lm "
                    f"loss) is {t.kd_alpha} * T^2 KL + {1 - t.kd_alpha:g} * LM at T = "
                    f"{t.kd_temperature}; validation reports the LM loss")
    if t.load:
        load(engine)
    engine.datasets, engine.available = build_datasets(config, tokenizer, pstate,
                                                       engine.batch.samples_after(t.train_iters))
    if training and not engine.available[0] and not t.eval_only:
        raise ConfigError(f"--split {config.data.split} leaves no training data")
    return engine


def build_training_parts(config: Config, pstate: ParallelState, device: torch.device, *,
                         training: bool = True, initialize: bool = True) -> Engine:
    """This rank's model chunks, batch schedule and (``training``) gradient buffers and optimizer,
    on ``device``: an Engine without data or checkpoint. setup() and the dry run both build here.
    ``initialize=False`` draws no initial weights (a checkpoint will overwrite them)."""
    p, t = config.parallel, config.training
    if t.compile_layers and device.type == "meta":
        raise ConfigError("--compile-layers: the dry run builds on the meta device and predicts "
                          "eager memory; torch.compile chooses what to save itself, so run "
                          "the dry run without it")
    params_dtype = DTYPES[config.optim.params_dtype_name]
    model_chunks = build_model_chunks(
        config.model, pstate, pstate.virtual_pp_size, sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype, seed=t.seed, device=device,
        recompute=Recompute.from_training_config(t), initialize=initialize,
        compile_layers=t.compile_layers)
    batch = BatchSchedule.from_config(t, pstate.dp.size, config.model.seq_length)
    num_micro = batch.num_microbatches(0)
    grads = optimizer = None
    if training:
        grad_dtype = torch.bfloat16 if p.grad_reduce_in_bf16 else torch.float32
        grads = DataParallelGrads(model_chunks, pstate, p.bucket_size, p.overlap_grad_reduce,
                                  p.use_distributed_optimizer, grad_dtype=grad_dtype)
        optimizer = build_optimizer(model_chunks, config.optim, p, pstate, grads,
                                    scheduler=build_lr_scheduler(config, batch))
        # The pipeline interleaves micro-batches, so "last micro-batch" is per parameter: a
        # bucket's reduction starts once each of its parameters has had all its gradients.
        grads.set_microbatches_per_step(num_micro)
    return Engine(config, pstate, model_chunks, grads, optimizer, (None,) * 3, TrainState(),
                  params_dtype, num_micro, batch=batch)


def build_lr_scheduler(config: Config, batch: BatchSchedule) -> OptimizerParamScheduler:
    """Megatron's schedule lengths. Sample-based training, or a batch size that changes, counts
    samples (each update advances it by its batch); otherwise it counts updates, which for a
    constant batch is the same curve (Megatron's iteration-based lengths are iterations x batch)."""
    o, t = config.optim, config.training
    if t.train_samples is None and not batch.varies:
        return build_scheduler(o, t.train_iters)
    if t.train_samples is not None:
        decay = o.lr_decay_samples if o.lr_decay_samples is not None else t.train_samples
        warmup = o.lr_warmup_samples
    else:
        decay = (o.lr_decay_iters if o.lr_decay_iters is not None else t.train_iters) * batch.final
        warmup = o.lr_warmup_iters * batch.final
    if o.lr_warmup_fraction is not None:
        warmup = o.lr_warmup_fraction * decay
    return OptimizerParamScheduler(o.lr, o.min_lr, warmup, decay, o.lr_decay_style, unit="samples")


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
    args = (t.save, s.iteration, engine.model_chunks, engine.optimizer, engine.pstate,
            engine.config, s.consumed_train_samples)
    kw = dict(extra={"skipped_iterations": s.skipped_iterations,
                     "nan_iterations": s.nan_iterations},
              rng_tracker=engine.model_chunks[0].rng_tracker)
    s.last_saved_iteration = s.iteration
    if t.async_save:
        if engine.async_saver is None:
            engine.async_saver = checkpointing.AsyncSaver()
        path = engine.async_saver.save(*args, **kw)
        log(engine.pstate, f" saving checkpoint at iteration {s.iteration:7d} to {path} in the "
                           "background")
    else:
        path = checkpointing.save_checkpoint(*args, **kw, ckpt_format=t.ckpt_format)
        log(engine.pstate, f" saved checkpoint at iteration {s.iteration:7d} to {path}")


def finish_saving(engine: Engine):
    """Wait for a background (--async-save) checkpoint to be committed."""
    if engine.async_saver is not None:
        engine.async_saver.wait()


def shutdown_distributed():
    """Leave together: a process that exits while gloo's threads still serve a peer aborts."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
