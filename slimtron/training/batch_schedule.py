"""The global batch size as a function of consumed samples (Megatron's micro-batch calculators).

- constant: ``--global-batch-size``;
- ``--rampup-batch-size START INCREMENT SAMPLES``: START, growing by INCREMENT in equal steps over
  the first SAMPLES samples, then ``--global-batch-size``;
- ``--step-batch-size-schedule "0:16 2.4B:320 ..."``: the batch size of the last threshold reached;
  thresholds count tokens (divided by ``--seq-length`` into samples, as Megatron does) and take
  the suffixes K, M, B, T.

Each step takes ``global_batch / (micro_batch x dp)`` micro-batches; every batch size in use must
divide evenly. The sampler and the learning-rate schedule advance by the batch actually consumed.
"""
from __future__ import annotations

import re
from typing import Optional

from slimtron.config import ConfigError

_SUFFIXES = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}


def parse_count(text: str, flag: str) -> int:
    """``2.4B`` -> 2400000000 (Megatron's suffixes K, M, B, T)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMBT]?)\s*", text.upper())
    if not m:
        raise ConfigError(f"{flag}: {text!r} is not a number (suffixes K, M, B, T allowed)")
    return int(float(m.group(1)) * _SUFFIXES.get(m.group(2), 1))


def parse_step_schedule(text: str, seq_length: int) -> list[tuple[int, int]]:
    """``"0:16 2.4B:320"`` -> [(threshold in samples, batch size), ...], sorted, checked."""
    flag = "--step-batch-size-schedule"
    entries = text.strip().replace(",", " ").split()
    schedule = []
    for entry in entries:
        if ":" not in entry:
            raise ConfigError(f"{flag}: entry {entry!r} is not THRESHOLD:BATCH_SIZE")
        threshold, batch = entry.split(":", 1)
        schedule.append((parse_count(threshold, flag) // seq_length, parse_count(batch, flag)))
    schedule.sort()
    if not schedule or schedule[0][0] != 0:
        raise ConfigError(f"{flag} {text!r}: the first threshold must be 0")
    for (a, _), (b, _) in zip(schedule, schedule[1:]):
        if b <= a:
            raise ConfigError(f"{flag} {text!r}: thresholds must increase (in samples of "
                              f"--seq-length {seq_length}: {a} then {b})")
    if any(batch < 1 for _, batch in schedule):
        raise ConfigError(f"{flag} {text!r}: batch sizes must be positive")
    return schedule


class BatchSchedule:
    """Global batch size and micro-batches per step from the number of consumed samples."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 rampup: Optional[list] = None, steps: Optional[list] = None):
        self.final = global_batch_size
        self.per_microbatch = micro_batch_size * data_parallel_size
        self.rampup = rampup
        self.steps = steps
        if rampup is not None:
            start, increment, samples = rampup
            if start < 1 or increment < 1 or samples < 0:
                raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: start and "
                                  "increment must be positive, samples non-negative")
            difference = global_batch_size - start
            if difference < 0 or difference % increment:
                raise ConfigError(f"--rampup-batch-size: --global-batch-size {global_batch_size} "
                                  f"minus the start {start} is not a non-negative multiple of the "
                                  f"increment {increment}")
            increments = difference // increment
            self._samples_per_increment = samples / increments if increments else 0.0

    @classmethod
    def from_config(cls, training, data_parallel_size: int, seq_length: int) -> "BatchSchedule":
        """The schedule a TrainingConfig asks for (its global batch already resolved)."""
        steps = (parse_step_schedule(training.step_batch_size_schedule, seq_length)
                 if training.step_batch_size_schedule is not None else None)
        return cls(training.global_batch_size, training.micro_batch_size, data_parallel_size,
                   rampup=training.rampup_batch_size, steps=steps)

    @property
    def varies(self) -> bool:
        return self.rampup is not None or self.steps is not None

    def global_batch_size(self, consumed_samples: int) -> int:
        if self.steps is not None:
            size = self.steps[0][1]
            for threshold, batch in self.steps:
                if consumed_samples >= threshold:
                    size = batch
            return size
        if self.rampup is not None:
            start, increment, samples = self.rampup
            if consumed_samples > samples or not self._samples_per_increment:
                return self.final
            return start + int(consumed_samples / self._samples_per_increment) * increment
        return self.final

    def num_microbatches(self, consumed_samples: int) -> int:
        size = self.global_batch_size(consumed_samples)
        if size % self.per_microbatch:
            raise ConfigError(f"global batch size {size} (at {consumed_samples} consumed samples) is "
                              f"not divisible by --micro-batch-size x data-parallel size = "
                              f"{self.per_microbatch}")
        return size // self.per_microbatch

    def samples_after(self, iterations: int) -> int:
        """Samples consumed by the first ``iterations`` steps."""
        consumed = 0
        for _ in range(iterations):
            consumed += self.global_batch_size(consumed)
        return consumed

    def iterations_for(self, train_samples: int) -> int:
        """Megatron's --train-samples -> iterations: a constant batch drops the partial last
        batch; ramp-up counts its steps (up to the ramp's end), then whole final batches; a step
        schedule counts every step that starts below ``train_samples``."""
        if self.steps is not None:
            iterations = consumed = 0
            while consumed < train_samples:
                consumed += self.global_batch_size(consumed)
                iterations += 1
            return iterations
        if self.rampup is None:
            return train_samples // self.final
        iterations = consumed = 0
        while consumed <= self.rampup[2] and consumed <= train_samples:
            consumed += self.global_batch_size(consumed)
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // self.final
        return iterations

