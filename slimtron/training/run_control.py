"""What a run does around its steps, from Megatron's flags: when to stop early (--exit-signal-handler,
--exit-duration-in-mins), Python's garbage collector (--manual-gc), the CUDA cache
(--empty-unused-memory-level) and the torch profiler (--profile). Every exit decision is taken by
all ranks together, so that they all save the same checkpoint and leave at the same step."""
from __future__ import annotations

import gc
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from slimtron.config import Config
from slimtron.parallel.state import ParallelState


class SignalFlag:
    """Records that SIGTERM arrived (the step in progress finishes; the loop then saves and
    leaves). The previous handler is restored by ``close``."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum, self.received = signum, False
        self._previous = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.received = True

    def close(self):
        signal.signal(self.signum, self._previous)


def any_rank(flag: bool, pstate: ParallelState) -> bool:
    """True on every rank when ``flag`` is True on any (a collective over the world)."""
    if pstate.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=pstate.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class RunControl:
    def __init__(self, config: Config, pstate: ParallelState, start: Optional[float] = None):
        """``start``: the run's start (``time.monotonic()``), from which --exit-duration-in-mins
        counts (Megatron counts from the start of pretrain, set-up included)."""
        self.training, self.pstate = config.training, pstate
        self.start = time.monotonic() if start is None else start
        t = self.training
        self.signals = SignalFlag() if t.exit_signal_handler else None
        if t.manual_gc:  # collections happen where the loop asks, at the same step on every rank
            gc.disable()
            gc.collect()
        self.profiler = self._start_profiler() if t.profile and self._profiled_rank() else None

    # ---- early exit ---------------------------------------------------------------------------
    def exit_reason(self) -> Optional[str]:
        """Why to stop after this step (the same answer on every rank), or None."""
        t = self.training
        if self.signals is not None and any_rank(self.signals.received, self.pstate):
            return "received SIGTERM (--exit-signal-handler)"
        if t.exit_duration_in_mins is not None:
            minutes = (time.monotonic() - self.start) / 60.0
            if any_rank(minutes > t.exit_duration_in_mins, self.pstate):
                return (f"trained for {minutes:.2f} minutes (--exit-duration-in-mins "
                        f"{t.exit_duration_in_mins:g})")
        return None

    # ---- per step -----------------------------------------------------------------------------
    def after_forward_backward(self):
        if self.training.empty_unused_memory_level >= 1:
            self._empty_cache()

    def before_step(self):
        if self.profiler is not None:  # Megatron steps its profiler at the top of an iteration
            self.profiler.step()

    def after_step(self, iteration: int):
        """``iteration``: the number of completed iterations."""
        t = self.training
        if t.empty_unused_memory_level >= 2:
            self._empty_cache()
        if t.manual_gc and t.manual_gc_interval and iteration % t.manual_gc_interval == 0:
            gc.collect()
        if self.profiler is not None and iteration >= t.profile_step_end:
            self._stop_profiler()  # writes the trace

    def around_evaluation(self):
        """Megatron collects before and after evaluation under --manual-gc."""
        if self.training.manual_gc:
            gc.collect()

    def close(self):
        if self.signals is not None:
            self.signals.close()
        if self.profiler is not None:
            self._stop_profiler()
        if self.training.manual_gc:
            gc.enable()

    # ---- parts --------------------------------------------------------------------------------
    def _empty_cache(self):
        if self.pstate.device.type == "cuda":
            torch.cuda.empty_cache()

    def _profiled_rank(self) -> bool:
        ranks = self.training.profile_ranks
        return not ranks or self.pstate.rank in ranks  # [] profiles every rank, as Megatron

    def trace_path(self) -> Path:
        """Megatron's place, <tensorboard dir>/../torch_profile/rank-<r>.json.gz (./torch_profile
        without --tensorboard-dir)."""
        tb = self.training.tensorboard_dir
        root = Path(tb).parent if tb else Path(".")
        return root / "torch_profile" / f"rank-{self.pstate.rank}.json.gz"

    def _start_profiler(self):
        t = self.training
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.pstate.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        path = self.trace_path()

        def write_trace(profiler):
            path.parent.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(path))

        # Steps are counted from the run's first iteration, as Megatron's schedule is.
        profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=max(t.profile_step_start - 1, 0),
                                             warmup=1 if t.profile_step_start > 0 else 0,
                                             active=t.profile_step_end - t.profile_step_start,
                                             repeat=1),
            on_trace_ready=write_trace)
        profiler.start()
        return profiler

    def _stop_profiler(self):
        profiler, self.profiler = self.profiler, None
        profiler.stop()
