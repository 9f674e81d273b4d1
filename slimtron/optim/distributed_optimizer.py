"""Distributed optimizer (ZeRO-1 style, as Megatron-LM's): optimizer state sharded over DP.

The grad buffer of ``DataParallelGrads(use_distributed_optimizer=True)`` is reduce-scattered, so
DP rank ``r`` holds the averaged gradient of the range ``r`` of every bucket. For each parameter
that intersects this range, the optimizer keeps a flat fp32 main shard (a copy for bf16/fp16
parameters, a view of the model parameter for fp32) and its Adam moments, and steps only those.
The updated shards are written into the parameter buffer, which is then all-gathered over the DP
group so that every rank again holds the whole model.

Bytes per parameter on each of d DP ranks with bf16 parameters: 2 (bf16 parameter) + 4 (fp32
gradient, the whole buffer) + 12 / d (fp32 main parameter, exp_avg and exp_avg_sq of 1/d of the
parameters), against 18 without sharding. Gradient norm and overflow checks see only the local
shards, so the norm's square is also summed over the DP group.
"""
from __future__ import annotations

import torch

from slimtron.config import ConfigError
from slimtron.optim.optimizer import MixedPrecisionOptimizer, ParamShard


class DistributedOptimizer(MixedPrecisionOptimizer):
    sum_norm_over_dp = True

    def __init__(self, grads, config, pstate, scheduler, loss_scaler=None):
        if not grads.use_distributed_optimizer:
            raise ConfigError("the distributed optimizer needs DataParallelGrads built with "
                              "use_distributed_optimizer=True (reduce-scatter, parameter buffer)")
        super().__init__(grads, config, pstate, scheduler, loss_scaler)

    def _build_shards(self) -> list:
        shards = []
        for param in self.grads.params:
            span = self.grads.param_shard_range(param)
            if span is None:
                continue
            start, end = span
            model_part = param.detach().view(-1)[start:end]
            copy = param.dtype != torch.float32
            main = model_part.clone().to(torch.float32) if copy else model_part
            grad = param.main_grad.view(-1)[start:end]
            shards.append(ParamShard(param, main, grad, start, end, copy))
        return shards

    def _update(self, increment: int = 1) -> None:
        super()._update(increment)
        self.grads.gather_params()
