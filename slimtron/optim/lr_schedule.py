"""Learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr``.

Megatron-LM's formulas, counted in optimizer updates (skipped steps do not advance the schedule).
With ``n`` updates done, the next update uses:

- ``n <= warmup`` (and warmup > 0): ``max_lr * n / warmup`` (so the very first update uses 0);
- ``constant``: ``max_lr``;
- ``n > decay_iters``: ``min_lr``;
- otherwise, with ``r = (n - warmup) / (decay_iters - warmup)``:
  ``min_lr + (max_lr - min_lr) * c`` where ``c = 1 - r`` (linear) or ``(cos(pi r) + 1) / 2``
  (cosine).
"""
from __future__ import annotations

import math
from typing import Optional

from slimtron.config import ConfigError

DECAY_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    def __init__(self, max_lr: float, min_lr: float = 0.0, warmup_iters: int = 0,
                 decay_iters: Optional[int] = None, decay_style: str = "cosine",
                 unit: str = "iterations"):
        if decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style must be one of {', '.join(DECAY_STYLES)}, "
                              f"got {decay_style!r}")
        if not 0.0 <= min_lr <= max_lr:
            raise ConfigError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
        if warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must be >= 0, got {warmup_iters}")
        if decay_style != "constant":
            if decay_iters is None:
                raise ConfigError(f"--lr-decay-style {decay_style} needs --lr-decay-iters "
                                  "(or --train-iters)")
            if decay_iters <= warmup_iters:
                raise ConfigError(f"--lr-decay-iters ({decay_iters}) must be larger than "
                                  f"--lr-warmup-iters ({warmup_iters})")
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.warmup_iters = warmup_iters  # may be fractional (--lr-warmup-fraction)
        self.decay_iters = decay_iters
        self.decay_style = decay_style
        # What a step counts: "iterations" (step(1) per update), or "samples" (step(batch) per
        # update: Megatron's unit, needed when the batch size changes or training is sample-based;
        # warmup_iters and decay_iters then count samples).
        self.unit = unit
        self.num_steps = 0

    def lr_at(self, num_steps: int, max_lr: Optional[float] = None,
              min_lr: Optional[float] = None) -> float:
        """Learning rate of the update that follows ``num_steps`` completed updates; a parameter
        group with its own max/min lr (--decoupled-lr) passes them and follows the same shape."""
        max_lr = self.max_lr if max_lr is None else max_lr
        min_lr = self.min_lr if min_lr is None else min_lr
        if self.warmup_iters > 0 and num_steps <= self.warmup_iters:
            return max_lr * num_steps / self.warmup_iters
        if self.decay_style == "constant":
            return max_lr
        if num_steps > self.decay_iters:
            return min_lr
        ratio = (num_steps - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def get_lr(self) -> float:
        """Learning rate of the next update."""
        return self.lr_at(self.num_steps)

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "warmup_iters": self.warmup_iters,
                "decay_iters": self.decay_iters, "decay_style": self.decay_style,
                "num_steps": self.num_steps, "unit": self.unit}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count; the schedule's shape stays as configured (so a resumed run may
        change it, as with Megatron's --override-opt_param-scheduler)."""
        unit = state.get("unit", "iterations")
        if unit != self.unit:
            raise ConfigError(f"the checkpoint's learning-rate schedule counts {unit}, this run's "
                              f"counts {self.unit}: sample-based training and batch-size "
                              "schedules must match the run that saved it")
        self.num_steps = int(state["num_steps"])
