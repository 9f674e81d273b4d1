"""Loss scaling for fp16 training.

The loss is multiplied by ``scale`` before backward so that small fp16 gradients do not flush to
zero; the optimizer divides the gradients by the same scale before using them. A step whose
gradients contain inf/nan is skipped and reported to ``update(found_inf=True)``.

``DynamicLossScaler`` follows Megatron-LM's dynamic grad scaler:
- on an overflow step the growth counter restarts and the hysteresis counter drops by one; once it
  reaches zero, every overflow multiplies the scale by ``backoff_factor`` (never below
  ``min_scale``);
- after ``growth_interval`` consecutive clean steps the scale is multiplied by ``growth_factor``
  and the hysteresis counter is refilled.
"""
from __future__ import annotations

from slimtron.config import ConfigError


class ConstantLossScaler:
    """A fixed loss scale (``--loss-scale``); overflowing steps are still skipped."""

    def __init__(self, scale: float = 1.0):
        if scale <= 0:
            raise ConfigError(f"--loss-scale must be positive, got {scale}")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self._scale}

    def load_state_dict(self, state: dict) -> None:
        """The configured scale wins over a checkpoint's (nothing else to restore)."""


class DynamicLossScaler:
    """Loss scale that backs off on overflow (after ``hysteresis`` overflow steps) and grows after
    ``growth_interval`` clean steps."""

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0,
                 growth_interval: int = 1000, hysteresis: int = 2, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5):
        if not 0 < min_scale <= initial_scale:
            raise ConfigError(f"loss scaling needs 0 < --min-loss-scale ({min_scale}) <= "
                              f"--initial-loss-scale ({initial_scale})")
        if growth_interval < 1 or hysteresis < 1:
            raise ConfigError(f"--loss-scale-window ({growth_interval}) and --hysteresis "
                              f"({hysteresis}) must be at least 1")
        if growth_factor <= 1 or not 0 < backoff_factor < 1:
            raise ConfigError(f"loss scale growth factor must be > 1 and backoff factor in (0, 1), "
                              f"got {growth_factor} and {backoff_factor}")
        self._scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])
        # A checkpoint written with a constant scale has no trackers: start their counts afresh.
        self._growth_tracker = int(state.get("growth_tracker", 0))
        self._hysteresis_tracker = int(state.get("hysteresis_tracker", self.hysteresis))
