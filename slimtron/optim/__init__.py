"""Optimizers: mixed-precision AdamW, its distributed (DP-sharded) variant, loss scaling, the
learning-rate schedule and gradient clipping.

Typical step, with ``grads = DataParallelGrads(...)`` and ``opt = build_optimizer(...)``::

    opt.zero_grad()
    with grads.no_sync():                       # every micro-batch but the last
        opt.scale_loss(loss_0).backward()
    opt.scale_loss(loss_last).backward()
    grads.finish_grad_sync()                    # DP average (all-reduce or reduce-scatter)
    # then TP/embedding grad all-reduces, which must act on param.main_grad
    ok, grad_norm, _ = opt.step()

The parameter-state format used for checkpoint resharding is described in ``optimizer.py``.
"""
from __future__ import annotations

from typing import Optional

from slimtron.config import ConfigError, check_precision
from slimtron.optim.clip_grads import clip_grad_norm, global_grad_norm
from slimtron.optim.distributed_optimizer import DistributedOptimizer
from slimtron.optim.loss_scaler import ConstantLossScaler, DynamicLossScaler
from slimtron.optim.lr_schedule import OptimizerParamScheduler
from slimtron.optim.optimizer import MixedPrecisionOptimizer

__all__ = ["build_optimizer", "build_loss_scaler", "build_scheduler", "MixedPrecisionOptimizer",
           "DistributedOptimizer", "ConstantLossScaler", "DynamicLossScaler",
           "OptimizerParamScheduler", "clip_grad_norm", "global_grad_norm"]


def build_scheduler(optim_config, train_iters: Optional[int] = None) -> OptimizerParamScheduler:
    decay_iters = optim_config.lr_decay_iters if optim_config.lr_decay_iters is not None \
        else train_iters
    warmup = optim_config.lr_warmup_iters
    if optim_config.lr_warmup_fraction is not None:  # Megatron: a fraction of the decay length
        warmup = optim_config.lr_warmup_fraction * (decay_iters or 0)
    return OptimizerParamScheduler(optim_config.lr, optim_config.min_lr, warmup, decay_iters,
                                   optim_config.lr_decay_style)


def build_loss_scaler(optim_config):
    """fp16 only: a constant scaler with --loss-scale, else a dynamic one. None otherwise."""
    if not optim_config.fp16:
        return None
    if optim_config.loss_scale is not None:
        return ConstantLossScaler(optim_config.loss_scale)
    return DynamicLossScaler(initial_scale=optim_config.initial_loss_scale,
                             min_scale=optim_config.min_loss_scale,
                             growth_interval=optim_config.loss_scale_window,
                             hysteresis=optim_config.hysteresis)


def build_optimizer(model_chunks, optim_config, parallel_config, pstate, grads, *,
                    train_iters: Optional[int] = None,
                    scheduler: Optional[OptimizerParamScheduler] = None):
    """The optimizer for ``model_chunks`` whose gradients live in ``grads``.

    ``train_iters`` is the default for ``lr_decay_iters`` (needed unless the decay is constant).
    """
    check_precision(optim_config)
    if grads.use_distributed_optimizer != parallel_config.use_distributed_optimizer:
        raise ConfigError(
            f"gradient buffers were built with use_distributed_optimizer="
            f"{grads.use_distributed_optimizer} but --use-distributed-optimizer is "
            f"{parallel_config.use_distributed_optimizer}")
    _check_all_params_in(model_chunks, grads)
    cls = DistributedOptimizer if parallel_config.use_distributed_optimizer \
        else MixedPrecisionOptimizer
    return cls(grads, optim_config, pstate, scheduler or build_scheduler(optim_config, train_iters),
               build_loss_scaler(optim_config))


def _check_all_params_in(model_chunks, grads) -> None:
    known = {id(p) for p in grads.params}
    chunks = [model_chunks] if hasattr(model_chunks, "parameters") else model_chunks
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if param.requires_grad and id(param) not in known:
                raise ConfigError(f"parameter {name} is not in the data-parallel gradient buffers "
                                  "(build DataParallelGrads from the same model chunks)")
