"""What a run reports: Megatron's iteration line, the validation block, TensorBoard scalars and the
throughput over the last logging window. Only the logging rank writes anything."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from slimtron.parallel.state import ParallelState


def is_logging_rank(pstate: ParallelState) -> bool:
    """The last rank prints (it sits on the last pipeline stage, where the loss is)."""
    return pstate.rank == pstate.world_size - 1


def log(pstate: ParallelState, text: str):
    if is_logging_rank(pstate):
        print(text, flush=True)


@dataclass
class IterationLog:
    """One logged iteration: Megatron's fields, then tokens/s and MFU against a stated peak."""
    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    tflops_per_gpu: float
    learning_rate: float
    global_batch_size: int
    loss: float
    loss_scale: float
    grad_norm: Optional[float]
    skipped_iterations: int
    nan_iterations: int
    tokens_per_second: float
    mfu: float
    peak: str

    def line(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        parts = [
            f" [{stamp}] iteration {self.iteration:8d}/{self.train_iters:8d}",
            f" consumed samples: {self.consumed_samples:12d}",
            f" elapsed time per iteration (ms): {self.elapsed_ms:.1f}",
            f" throughput per GPU (TFLOP/s/GPU): {self.tflops_per_gpu:.1f}",
            f" learning rate: {self.learning_rate:.6E}",
            f" global batch size: {self.global_batch_size:5d}",
            f" lm loss: {self.loss:.6E}",
            f" loss scale: {self.loss_scale:.1f}",
        ]
        if self.grad_norm is not None:
            parts.append(f" grad norm: {self.grad_norm:.3f}")
        parts += [f" number of skipped iterations: {self.skipped_iterations:3d}",
                  f" number of nan iterations: {self.nan_iterations:3d}",
                  f" tokens per second: {self.tokens_per_second:.1f}",
                  f" MFU: {100 * self.mfu:.2f}% (peak: {self.peak})"]
        return " |".join(parts) + " |"

    def scalars(self) -> dict:
        return {"lm loss": self.loss, "learning rate": self.learning_rate,
                "grad norm": self.grad_norm, "loss scale": self.loss_scale,
                "batch size": self.global_batch_size, "tokens per second": self.tokens_per_second}


def validation_block(label: str, loss: float) -> tuple[str, dict]:
    """Megatron's framed validation line, and its scalars."""
    ppl = math.exp(min(20.0, loss))
    line = f" validation loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    bar = "-" * (len(line) + 1)
    return f"{bar}\n{line}\n{bar}", {"lm loss validation": loss, "lm loss validation ppl": ppl}


class ThroughputWindow:
    """Wall time and tokens since the last report."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.iterations, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int):
        self.iterations += 1
        self.tokens += tokens

    def read(self) -> tuple[float, float]:
        """(seconds per iteration, tokens per second) over the window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed / max(self.iterations, 1), self.tokens / elapsed


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
