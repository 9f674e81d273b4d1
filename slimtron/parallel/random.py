"""Random-number streams for model parallelism.

Two streams, as in Megatron:
- the default torch generator, seeded with ``seed + 100 * pp_rank`` (identical on every TP and DP
  rank of a stage), drives dropout on replicated activations (outside tensor-parallel regions), so
  TP ranks drop the same elements;
- the tracker's named stream, seeded with that seed ``+ 2718 + tp_rank``, drives dropout on sharded
  activations (attention probabilities of this rank's heads, sequence-parallel slices), so each rank
  draws its own mask.

``RNGStatesTracker.fork()`` swaps the tracker's state into the default generator of the tracker's
device for the duration of a block, then stores the advanced state back. The tracker is an object
owned by the model (no module-level state); ``get_states()/set_states()`` serve checkpoints.
"""
from __future__ import annotations

import contextlib
import random as _pyrandom
from typing import Dict, Optional

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

MODEL_PARALLEL_RNG = "model-parallel-rng"
TP_SEED_OFFSET = 2718  # Megatron's offset between the default and the model-parallel seed
PP_SEED_STRIDE = 100  # pipeline stages draw different default streams (Megatron)


def _device_rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_device_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _seeded_state(seed: int, device: torch.device) -> torch.Tensor:
    return torch.Generator(device=device).manual_seed(seed).get_state()


class RNGStatesTracker:
    """Named generator states for one device, swapped into its default generator by ``fork``."""

    def __init__(self, device: Optional[torch.device] = None):
        device = torch.device(device or "cpu")
        # A model built on meta never runs; its tracker still needs real (CPU) states to checkpoint.
        self.device = torch.device("cpu") if device.type == "meta" else device
        self._states: Dict[str, torch.Tensor] = {}

    @classmethod
    def for_rank(cls, seed: int, pstate, device: Optional[torch.device] = None) -> "RNGStatesTracker":
        """The tracker of this rank: stream ``MODEL_PARALLEL_RNG`` seeded by ``model_parallel_seed``."""
        tracker = cls(device or pstate.device)
        tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed, pstate))
        return tracker

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG tracker: stream {name!r} already exists")
        self._states[name] = _seeded_state(seed, self.device)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with the default generator of the device drawing from stream ``name``."""
        if name not in self._states:
            raise KeyError(f"RNG tracker: no stream named {name!r}")
        outside = _device_rng_state(self.device)
        _set_device_rng_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = _device_rng_state(self.device)
            _set_device_rng_state(outside, self.device)

    @contextlib.contextmanager
    def replay(self, states: Dict[str, torch.Tensor]):
        """Run the block with the tracker rewound to ``states``, then put the current ones back
        (activation recomputation replays the dropout masks of the original forward)."""
        current = self.get_states()
        self.set_states(states)
        try:
            yield
        finally:
            self.set_states(current)


def checkpoint_with_rng(fn, tracker: RNGStatesTracker, *args):
    """``fn(*args)`` with its activations recomputed in backward, replaying the same dropout masks:
    torch restores the default generators, and the tracker is rewound to its state at forward."""
    states = tracker.get_states()

    def contexts():
        return contextlib.nullcontext(), tracker.replay(states)

    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)


def model_parallel_seed(seed: int, pstate) -> int:
    return seed + TP_SEED_OFFSET + pstate.tp.rank + PP_SEED_STRIDE * pstate.pp.rank


def default_seed(seed: int, pstate) -> int:
    """Seed of the default generators: equal over TP (and DP) ranks, different per pipeline stage."""
    return seed + PP_SEED_STRIDE * pstate.pp.rank


def seed_default_generators(seed: int, pstate) -> None:
    """Seed python, numpy and torch (CPU and CUDA) default generators for this rank."""
    s = default_seed(seed, pstate)
    _pyrandom.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device
