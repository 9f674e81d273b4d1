"""Mixed-precision AdamW over fp32 main parameters, fed by the data-parallel gradient buffers.

One optimizer step (``step()``), after ``DataParallelGrads.finish_grad_sync()``:
1. the fp32 gradients in the grad buffer become the main parameters' ``.grad`` (no copy);
2. fp16 (loss scaler) and fp32: the gradients are divided by the loss scale and checked for
   inf/nan in one foreach kernel; inf/nan in any gradient on any rank (agreed by an all-reduce MAX
   over the world) skips the step on every rank, counts it, and lets the loss scaler back off.
   This is the step's only device->host sync. bf16 has no loss scaler and, as in Megatron, no
   check (its exponent range does not overflow where fp16's does);
3. gradients are clipped to a global L2 norm (``clip_grads.py``), on the device;
4. AdamW (``torch.optim.AdamW``, fused or foreach) updates the main parameters with the learning
   rate of the schedule, decaying only parameters with ``ndim >= 2``;
5. updated main parameters are copied into the (bf16/fp16) model parameters (one foreach copy).
   fp32 model parameters are their own main parameters.

Every part is a fixed number of foreach/fused ops whatever the number of parameter tensors.
``step()`` returns ``(update_successful, grad_norm or None, None)``; ``grad_norm`` is a 0-dim
device tensor, read (synced) only where it is logged.

Parameter state for checkpoint resharding
-----------------------------------------
``param_state()`` returns ``{global_name: entry}`` for every parameter this rank optimizes, with

- ``"main_param"``, ``"exp_avg"``, ``"exp_avg_sq"``: flat fp32 CPU tensors (copies, so that saving
  a checkpoint takes no device memory) of this rank's part of the parameter's TP-local shard (the
  tensor the model holds on this rank, flattened row-major);
- ``"range"``: ``(start, end)``, the part's position in that flattened shard: ``(0, numel)``
  without the distributed optimizer; with it, the intersection of the parameter with this DP rank's
  range of the grad buffer (parameters outside the range are absent).

Adam moments are zeros before the first update. ``load_param_state`` takes the same structure for
exactly this rank's ranges; it writes the main parameters (and their rounding into the model
parameters' local part), the moments, and sets Adam's step to the number of updates done
(``state_dict()["num_updates"]``). The step counters, learning-rate schedule and loss scaler are in
``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from slimtron.config import ConfigError
from slimtron.model.init import VOCAB_PARAMETERS
from slimtron.optim.clip_grads import clip_grad_norm
from slimtron.parallel.data_parallel import param_label


@dataclass
class ParamShard:
    """What the optimizer updates for one model parameter on this rank."""
    model_param: torch.nn.Parameter
    main_param: torch.Tensor  # fp32 leaf AdamW updates; may be the model parameter itself
    grad: torch.Tensor  # fp32 view into the grad buffer, shaped like main_param
    start: int  # range in the flattened TP-local model parameter
    end: int
    copy_back: bool  # main_param is a separate fp32 copy to be rounded into the model parameter

    def model_part(self) -> torch.Tensor:
        """The model parameter's elements this shard covers (a flat view)."""
        return self.model_param.detach().view(-1)[self.start:self.end]

    def main_part(self) -> torch.Tensor:
        return self.main_param.detach().view(-1)


def _decoupled_lr(param: torch.Tensor, config) -> bool:
    """--decoupled-lr applies, as in Megatron, to the input embedding and the output layer
    (with tied embeddings: to both stages' copies of the word embeddings)."""
    return (config.decoupled_lr is not None
            and getattr(param, "global_name", None) in VOCAB_PARAMETERS)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).to("cpu", torch.float32, copy=True)


def _fused_supported(device: torch.device) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:
        return device.type == "cuda"


def make_adamw(decay: list, no_decay: list, config,
               decoupled: Sequence = ()) -> Optional[torch.optim.AdamW]:
    """AdamW with weight decay on ``decay`` (and ``decoupled``) only; None when this rank owns no
    parameters. ``decoupled`` (the input embedding and output layer under --decoupled-lr) has its
    own max/min lr, read by the step through the group's ``max_lr``/``min_lr``."""
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if decoupled:
        low = config.min_lr if config.decoupled_min_lr is None else config.decoupled_min_lr
        groups.append({"params": list(decoupled), "weight_decay": config.weight_decay,
                       "max_lr": config.decoupled_lr, "min_lr": low})
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None
    device = groups[0]["params"][0].device
    fast = {"fused": True} if _fused_supported(device) else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, **fast)


class MixedPrecisionOptimizer:
    """AdamW on fp32 main copies of the whole model (every DP rank holds all of it)."""

    sum_norm_over_dp = False

    def __init__(self, grads, config, pstate, scheduler, loss_scaler=None):
        if config.optimizer != "adam":
            raise ConfigError(f"--optimizer {config.optimizer!r} is not supported; use adam")
        self.grads = grads
        self.config = config
        self.pstate = pstate
        self.scheduler = scheduler
        self.loss_scaler = loss_scaler
        self.num_updates = 0
        self.num_skipped = 0
        self.shards = self._build_shards()
        decoupled = [s for s in self.shards if _decoupled_lr(s.model_param, config)]
        others = [s for s in self.shards if not _decoupled_lr(s.model_param, config)]
        self.adam = make_adamw([s.main_param for s in others if s.model_param.ndim >= 2],
                               [s.main_param for s in others if s.model_param.ndim < 2],
                               config, [s.main_param for s in decoupled])
        self._lr = scheduler.get_lr()
        # Flat views built once, so that the copies between main and model parameters are one
        # foreach op each (the model parameters' storage never moves after the grad buffers).
        copied = [s for s in self.shards if s.copy_back]
        self._model_parts = [s.model_part() for s in copied]
        self._main_parts = [s.main_part() for s in copied]

    def _build_shards(self) -> list:
        shards = []
        for param in self.grads.params:
            copy = param.dtype != torch.float32
            main = param.detach().clone().to(torch.float32) if copy else param
            shards.append(ParamShard(param, main, param.main_grad, 0, param.numel(), copy))
        return shards

    # ---- interface -----------------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scaler.scale if self.loss_scaler is not None else loss

    def get_lr(self) -> float:
        """Learning rate of the latest update (before any: the one the first update will use)."""
        return self._lr

    def zero_grad(self) -> None:
        self.grads.zero_grad()

    def step(self, increment: int = 1):
        """One update; ``increment`` advances the lr schedule (the batch's samples when the
        schedule counts samples)."""
        self._attach_grads()
        try:
            if self._unscale_and_find_nonfinite():
                if self.loss_scaler is not None:
                    self.loss_scaler.update(True)
                self.num_skipped += 1
                return False, None, None
            if self.loss_scaler is not None:
                self.loss_scaler.update(False)
            grad_norm = self._clip() if self.config.clip_grad > 0 else None
            self._update(increment)
            return True, grad_norm, None
        finally:
            self._detach_grads()

    # ---- step parts ----------------------------------------------------------------------------
    def _attach_grads(self) -> None:
        for shard in self.shards:
            grad = shard.grad
            shard.main_param.grad = grad if grad.dtype == torch.float32 else grad.float()

    def _detach_grads(self) -> None:
        for shard in self.shards:
            shard.main_param.grad = None

    def _main_grads(self) -> list:
        return [shard.main_param.grad for shard in self.shards]

    def _checks_nonfinite(self) -> bool:
        """fp16 (loss scaler) and fp32 check gradients; bf16 does not, as in Megatron."""
        return self.loss_scaler is not None or self.grads.params[0].dtype == torch.float32

    def _unscale_and_find_nonfinite(self) -> bool:
        if not self._checks_nonfinite():
            return False
        grads = self._main_grads()
        device = self._device()
        found = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            inverse = torch.full((), 1.0 / self.loss_scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inverse)
        # The whole world decides together so that every rank skips the same steps.
        if self.pstate.world_size > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item() > 0)

    def _device(self) -> torch.device:
        return self.grads.params[0].device

    def _clip(self) -> torch.Tensor:
        ps = self.pstate
        return clip_grad_norm([s.model_param for s in self.shards], self._main_grads(),
                              self.config.clip_grad, ps.model.group,
                              ps.dp_cp.group if self.sum_norm_over_dp else None,
                              tp_rank=ps.tp.rank, first_stage=ps.is_first_stage)

    def _update(self, increment: int = 1) -> None:
        self._lr = self.scheduler.get_lr()
        if self.adam is not None:
            for group in self.adam.param_groups:
                group["lr"] = self.scheduler.lr_at(self.scheduler.num_steps, group.get("max_lr"),
                                                   group.get("min_lr"))
            self.adam.step()
        self.scheduler.step(increment)
        self.num_updates += 1
        self._copy_main_to_model()

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        if self._model_parts:
            torch._foreach_copy_(self._model_parts, self._main_parts)

    # ---- checkpoints ---------------------------------------------------------------------------
    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 main copies from the model parameters (after loading weights into the
        model without optimizer state)."""
        if self._main_parts:
            torch._foreach_copy_(self._main_parts, self._model_parts)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "num_skipped": self.num_skipped,
                "lr_scheduler": self.scheduler.state_dict(),
                "loss_scaler": (self.loss_scaler.state_dict()
                                if self.loss_scaler is not None else None)}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state["num_skipped"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        self._lr = self.scheduler.lr_at(max(self.scheduler.num_steps - 1, 0))
        self._set_adam_steps()

    def param_ranges(self) -> dict:
        """``{global_name: (start, end)}``: the part of each parameter this rank optimizes."""
        out = {}
        for shard in self.shards:
            name = self._global_name(shard.model_param)
            if name in out:
                raise ValueError(f"two parameters on rank {self.pstate.rank} share the global "
                                 f"name {name}; optimizer state needs unique names")
            out[name] = (shard.start, shard.end)
        return out

    def param_state(self) -> dict:
        """This rank's main parameters and Adam moments by global name (format: module doc)."""
        ranges = self.param_ranges()  # also refuses two parameters with one name
        out = {}
        for shard in self.shards:
            name = self._global_name(shard.model_param)
            state = self.adam.state.get(shard.main_param, {}) if self.adam is not None else {}
            zeros = torch.zeros(shard.end - shard.start, dtype=torch.float32, device="cpu")
            out[name] = {
                "main_param": _host_copy(shard.main_param),
                "exp_avg": _host_copy(state["exp_avg"]) if state else zeros.clone(),
                "exp_avg_sq": _host_copy(state["exp_avg_sq"]) if state else zeros.clone(),
                "range": ranges[name],
            }
        return out

    @torch.no_grad()
    def load_param_state(self, param_state: dict) -> None:
        for shard in self.shards:
            entry = self._entry_for(shard, param_state)
            shard.main_param.view(-1).copy_(entry["main_param"])
            if shard.copy_back:
                shard.model_part().copy_(shard.main_param.view(-1))
            if self.adam is None:
                continue
            state = self.adam.state[shard.main_param]
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = entry[key].to(shard.main_param.device, torch.float32) \
                    .reshape(shard.main_param.shape).clone()
        self._set_adam_steps()

    def _entry_for(self, shard: ParamShard, param_state: dict) -> dict:
        name = self._global_name(shard.model_param)
        if name not in param_state:
            raise ValueError(f"optimizer parameter state has no entry for {name}")
        entry = param_state[name]
        expected = (shard.start, shard.end)
        if tuple(entry["range"]) != expected:
            raise ValueError(f"optimizer parameter state for {name} covers range "
                             f"{tuple(entry['range'])}, this rank holds {expected}")
        for key in ("main_param", "exp_avg", "exp_avg_sq"):
            if entry[key].numel() != shard.end - shard.start:
                raise ValueError(f"optimizer parameter state {key} of {name} has "
                                 f"{entry[key].numel()} elements, expected "
                                 f"{shard.end - shard.start}")
        return entry

    def _set_adam_steps(self) -> None:
        """Adam's per-parameter step (bias correction) equals the number of updates done."""
        if self.adam is None:
            return
        for group in self.adam.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for main in group["params"]:
                state = self.adam.state.get(main)
                if state and "exp_avg" in state:
                    device = main.device if on_device else torch.device("cpu")
                    state["step"] = torch.tensor(float(self.num_updates), dtype=torch.float32,
                                                 device=device)

    @staticmethod
    def _global_name(param: torch.Tensor) -> str:
        name = getattr(param, "global_name", None)
        if name is None:
            raise ValueError(f"{param_label(param)} has no global_name attribute "
                             "(see docs/CONVENTIONS.md); optimizer state needs it")
        return name
