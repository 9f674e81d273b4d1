"""The rank grid and its process groups.

Rank order is Megatron's tp-dp-pp: tensor-parallel ranks are neighbours (so they share a node and its
fast links), then data parallel, with pipeline parallel outermost. The grid is one reshape of
``arange(world)`` to ``[pp, dp, tp]``; every group is a slice of it. ``rank_grid`` and ``group_ranks``
are pure functions; ``ParallelState`` builds the real process groups from them and is passed to
whatever needs them (there is no module-level state).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from slimtron.config import ConfigError


def rank_grid(world_size: int, tp: int, pp: int) -> np.ndarray:
    """Global ranks laid out as ``grid[pp_rank, dp_rank, tp_rank]``."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel sizes must be positive, got tp={tp} pp={pp}")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor-model-parallel size "
                          f"{tp} x pipeline-model-parallel size {pp} = {tp * pp}")
    return np.arange(world_size).reshape(pp, world_size // (tp * pp), tp)


def group_ranks(grid: np.ndarray) -> dict[str, list[list[int]]]:
    """Every process group of the grid, as lists of global ranks, keyed by kind."""
    pp, dp, tp = grid.shape
    pipeline = [grid[:, d, t].tolist() for d in range(dp) for t in range(tp)]
    return {
        "tensor": [grid[p, d, :].tolist() for p in range(pp) for d in range(dp)],
        "data": [grid[p, :, t].tolist() for p in range(pp) for t in range(tp)],
        "pipeline": pipeline,
        "model": [grid[:, d, :].reshape(-1).tolist() for d in range(dp)],
        # First and last pipeline stage hold the input embedding and the (tied) output layer.
        "embedding": [sorted({ranks[0], ranks[-1]}) for ranks in pipeline],
    }


def coordinates(grid: np.ndarray, rank: int) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank."""
    p, d, t = np.argwhere(grid == rank)[0]
    return int(p), int(d), int(t)


def default_device_and_backend(backend: Optional[str] = None) -> tuple[torch.device, str]:
    """NCCL on CUDA when there is a GPU, gloo on CPU otherwise. ``--distributed-backend gloo``
    asks for CPU training even on a GPU machine (gloo lacks some collectives on CUDA tensors)."""
    if backend == "gloo":
        return torch.device("cpu"), backend
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank), backend or "nccl"
    return torch.device("cpu"), backend or "gloo"


def init_distributed(backend: Optional[str] = None, timeout_minutes: float = 10.0) -> torch.device:
    """Initialise torch.distributed from torchrun's environment (or as a single process)."""
    device, backend = default_device_and_backend(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        # Binding NCCL to the rank's GPU gives barriers their device and creates each group's
        # communicator with the group: a pipeline group's first batch_isend_irecv, which involves
        # only neighbouring stages, must not be the call that creates it.
        bound = {"device_id": device} if backend == "nccl" and device.type == "cuda" else {}
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **bound)
    return device


@dataclass
class ParallelState:
    """This rank's place in the grid and the process groups it belongs to.

    Groups of size one are ``None``; the collectives in ``slimtron.parallel.comm`` treat a ``None``
    group as "nothing to communicate", so a single process needs no process group at all.
    """
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_ranks: list[int]
    pp_ranks: list[int]
    dp_ranks: list[int]
    mp_ranks: list[int]
    embedding_ranks: list[int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    virtual_pp_size: int = 1
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None
    embedding_group: Optional[dist.ProcessGroup] = None

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: Optional[int] = None,
              device: Optional[torch.device] = None, virtual_pp_size: int = 1,
              timeout: Optional[datetime.timedelta] = None) -> "ParallelState":
        """Create the grid's process groups (collective: every rank must call it).

        ``timeout`` bounds every collective on these groups; pass the one given to
        ``init_distributed``: torch gives new groups its own default (30 minutes), not the world's.
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dp is not None and tp * pp * dp != world:
            raise ConfigError(f"tensor ({tp}) x pipeline ({pp}) x data ({dp}) parallel sizes = "
                              f"{tp * pp * dp} does not equal the world size {world}")
        grid = rank_grid(world, tp, pp)
        groups = group_ranks(grid)
        mine = {}
        handles = {}
        for kind, all_ranks in groups.items():
            for ranks in all_ranks:
                # new_group is collective over the whole world: create every group, in the same
                # order on every rank, and keep the one this rank is in.
                handle = (dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 and world > 1
                          else None)
                if rank in ranks:
                    mine[kind], handles[kind] = ranks, handle
        p, d, t = coordinates(grid, rank)
        return cls(world_size=world, rank=rank, tp_size=tp, pp_size=pp, dp_size=grid.shape[1],
                   tp_rank=t, pp_rank=p, dp_rank=d, tp_ranks=mine["tensor"],
                   pp_ranks=mine["pipeline"], dp_ranks=mine["data"], mp_ranks=mine["model"],
                   embedding_ranks=mine.get("embedding", []),  # middle stages: in none
                   device=device or torch.device("cpu"),
                   virtual_pp_size=virtual_pp_size, tp_group=handles["tensor"],
                   pp_group=handles["pipeline"], dp_group=handles["data"],
                   mp_group=handles["model"], embedding_group=handles.get("embedding"))

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "ParallelState":
        """One process, no process groups: the reference every parallel layout is compared with."""
        return cls(world_size=1, rank=0, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0,
                   dp_rank=0, tp_ranks=[0], pp_ranks=[0], dp_ranks=[0], mp_ranks=[0],
                   embedding_ranks=[0], device=device or torch.device("cpu"))

    @classmethod
    def for_planning(cls, tp: int, pp: int, dp: int, rank: int = 0) -> "ParallelState":
        """The coordinates of ``rank`` in a layout, with no groups: for meta-device planning."""
        grid = rank_grid(tp * pp * dp, tp, pp)
        groups = group_ranks(grid)
        p, d, t = coordinates(grid, rank)
        # Middle pipeline stages are in no embedding group.
        find = {kind: next((r for r in rs if rank in r), []) for kind, rs in groups.items()}
        return cls(world_size=tp * pp * dp, rank=rank, tp_size=tp, pp_size=pp, dp_size=dp,
                   tp_rank=t, pp_rank=p, dp_rank=d, tp_ranks=find["tensor"],
                   pp_ranks=find["pipeline"], dp_ranks=find["data"], mp_ranks=find["model"],
                   embedding_ranks=find["embedding"], device=torch.device("meta"))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_stage_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_stage_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]
