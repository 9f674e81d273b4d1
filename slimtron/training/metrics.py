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
    tflops_per_gpu: Optional[float]  # shown with --log-throughput, as Megatron
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
        ]
        if self.tflops_per_gpu is not None:
            parts.append(f" throughput per GPU (TFLOP/s/GPU): {self.tflops_per_gpu:.1f}")
        parts += [
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
                "batch size": self.global_batch_size, "tokens per second": self.tokens_per_second,
                "throughput": self.tflops_per_gpu}


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


class Wandb:
    """Scalars to Weights & Biases on the logging rank with --wandb-project (Megatron's flags:
    run name --wandb-exp-name, files under --wandb-save-dir, default <--save>/wandb). Offline
    runs (``WANDB_MODE=offline``) need no network."""

    def __init__(self, config, pstate: ParallelState):
        t = config.training
        self.run = None
        if t.wandb_project and is_logging_rank(pstate):
            import os

            import wandb
            directory = t.wandb_save_dir or os.path.join(t.save or ".", "wandb")
            os.makedirs(directory, exist_ok=True)
            self.run = wandb.init(project=t.wandb_project, name=t.wandb_exp_name, dir=directory,
                                  config=config.to_dict())

    def scalars(self, iteration: int, values: dict):
        if self.run is not None:
            self.run.log({k: v for k, v in values.items() if v is not None}, step=iteration)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


class ScalarLog:
    """Every scalar sink of the run (TensorBoard, W&B) behind one ``scalars`` call."""

    def __init__(self, config, pstate: ParallelState):
        self.sinks = [TensorBoard(config.training.tensorboard_dir, pstate), Wandb(config, pstate)]

    def scalars(self, iteration: int, values: dict):
        for sink in self.sinks:
            sink.scalars(iteration, values)

    def close(self):
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
