"""The rank grid and its process groups, as named axes.

Rank order is Megatron's tp-cp-dp-pp: tensor-parallel ranks are neighbours (so they share a node and
its fast links), then context parallel, then data parallel, with pipeline parallel outermost. The
grid is one reshape of ``arange(world)``; every group is the set of ranks that differ only along some
of its axes. ``rank_grid`` and ``axis_groups`` are pure functions; ``ParallelState`` builds the real
process groups from them and is passed to whatever needs them (there is no module-level state).

Adding an axis means adding its name to ``ORDER`` (and to ``COMBINED`` where a group spans it), a
size argument to ``ParallelState.build``, and its uses.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from slimtron.config import ConfigError

# Innermost (neighbouring ranks) first, as Megatron writes it.
ORDER = ("tp", "cp", "dp", "pp")

# Groups that span several axes: name -> the axes whose ranks it joins.
COMBINED = {
    "dp_cp": ("cp", "dp"),  # gradient reduction and the distributed optimizer's shards
    "tp_cp": ("tp", "cp"),
    "model": ("tp", "pp"),  # one model replica's ranks (CP ranks hold identical grads, as DP)
}

_FLAG_NAMES = {"tp": "tensor-model-parallel size", "cp": "context-parallel size",
               "pp": "pipeline-model-parallel size", "dp": "data-parallel size"}


def rank_grid(sizes: dict[str, int], order: Sequence[str] = ORDER) -> np.ndarray:
    """Global ranks in a grid indexed outermost first: ``grid[pp, dp, cp, tp]`` for Megatron's
    order. ``sizes`` names every axis of ``order``."""
    for name in order:
        if sizes[name] < 1:
            raise ConfigError(f"parallel sizes must be positive, got {name}={sizes[name]}")
    shape = [sizes[name] for name in reversed(order)]
    return np.arange(math.prod(shape)).reshape(shape)


def axis_groups(grid: np.ndarray, axes: Sequence[str], order: Sequence[str] = ORDER) -> list[list[int]]:
    """Every group of ranks that differ only along ``axes``, each listed in rank order."""
    dims = [len(order) - 1 - order.index(name) for name in axes]
    dims.sort()  # outer axis first keeps each group's ranks ascending
    moved = np.moveaxis(grid, dims, list(range(grid.ndim - len(dims), grid.ndim)))
    size = math.prod(grid.shape[d] for d in dims)
    return moved.reshape(-1, size).tolist()


def embedding_groups(grid: np.ndarray, order: Sequence[str] = ORDER) -> list[list[int]]:
    """First and last pipeline stage of each pipeline: they hold the input embedding and the (tied)
    output layer."""
    return [sorted({ranks[0], ranks[-1]}) for ranks in axis_groups(grid, ["pp"], order)]


def layout_sizes(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
                 dp: Optional[int] = None) -> dict[str, int]:
    """Every axis's size for ``world_size`` ranks, the data-parallel size derived when None."""
    if min(tp, pp, cp) < 1:
        raise ConfigError(f"parallel sizes must be positive, got tp={tp} cp={cp} pp={pp}")
    model = tp * cp * pp
    if dp is None:
        if world_size % model:
            raise ConfigError(f"world size {world_size} is not divisible by tensor-model-parallel "
                              f"size {tp} x context-parallel size {cp} x pipeline-model-parallel "
                              f"size {pp} = {model}")
        dp = world_size // model
    elif model * dp != world_size:
        raise ConfigError(f"tensor ({tp}) x context ({cp}) x pipeline ({pp}) x data ({dp}) "
                          f"parallel sizes = {model * dp} does not equal the world size {world_size}")
    return {"tp": tp, "cp": cp, "dp": dp, "pp": pp}


@dataclass(frozen=True)
class Axis:
    """One parallel dimension (or a combination of them) as this rank sees it. ``group`` is None
    when there is nothing to communicate (size one, or a state built without process groups)."""
    name: str
    size: int
    rank: int
    ranks: list
    group: Optional[object] = None


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


GroupFactory = Callable[[list], Optional[object]]


def _no_groups(ranks: list) -> None:
    return None


def _process_groups(world: int, timeout: Optional[datetime.timedelta]) -> GroupFactory:
    """A factory that creates one process group per distinct rank list (new_group is collective
    over the whole world: every rank asks for every group, in the same order)."""
    made: dict[tuple, object] = {}

    def make(ranks: list):
        key = tuple(ranks)
        if key not in made:
            made[key] = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 and world > 1 else None
        return made[key]
    return make


def _all_axes(grid: np.ndarray, rank: int, make_group: GroupFactory) -> dict[str, Axis]:
    """Every single and combined axis of ``grid``, as seen by ``rank``. Groups are created for
    every group of every axis (collective), in one fixed order."""
    kinds = {name: axis_groups(grid, [name]) for name in ORDER}
    kinds.update({name: axis_groups(grid, axes) for name, axes in COMBINED.items()})
    kinds["embedding"] = embedding_groups(grid)
    axes = {}
    for name, groups in kinds.items():
        mine = None
        for ranks in groups:
            handle = make_group(ranks)
            if rank in ranks:
                mine = Axis(name, len(ranks), ranks.index(rank), ranks, handle)
        # Middle pipeline stages are in no embedding group.
        axes[name] = mine or Axis(name, 0, -1, [], None)
    return axes


@dataclass
class ParallelState:
    """This rank's place in the grid: ``pstate.tp``, ``.cp``, ``.dp``, ``.pp`` and the combined
    ``.dp_cp``, ``.tp_cp``, ``.model``, ``.embedding``, each an ``Axis`` (size, rank, ranks, group).

    Groups of size one are ``None``; the collectives in ``slimtron.parallel.comm`` treat a ``None``
    group as "nothing to communicate", so a single process needs no process group at all.
    """
    world_size: int
    rank: int
    axes: dict
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    virtual_pp_size: int = 1

    @classmethod
    def _create(cls, sizes: dict, rank: int, make_group: GroupFactory, device,
                virtual_pp_size: int) -> "ParallelState":
        grid = rank_grid(sizes)
        return cls(world_size=grid.size, rank=rank, axes=_all_axes(grid, rank, make_group),
                   device=device, virtual_pp_size=virtual_pp_size)

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: Optional[int] = None, cp: int = 1,
              device: Optional[torch.device] = None, virtual_pp_size: int = 1,
              timeout: Optional[datetime.timedelta] = None) -> "ParallelState":
        """Create the grid's process groups (collective: every rank must call it).

        ``timeout`` bounds every collective on these groups; pass the one given to
        ``init_distributed``: torch gives new groups its own default (30 minutes), not the world's.
        """
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        sizes = layout_sizes(world, tp=tp, pp=pp, cp=cp, dp=dp)
        return cls._create(sizes, rank, _process_groups(world, timeout),
                           device or torch.device("cpu"), virtual_pp_size)

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "ParallelState":
        """One process, no process groups: the reference every parallel layout is compared with."""
        return cls._create(layout_sizes(1), 0, _no_groups, device or torch.device("cpu"), 1)

    @classmethod
    def for_planning(cls, tp: int, pp: int, dp: int, rank: int = 0, cp: int = 1,
                     virtual_pp_size: int = 1) -> "ParallelState":
        """The coordinates of ``rank`` in a layout, with no groups: for meta-device planning."""
        sizes = layout_sizes(tp * pp * dp * cp, tp=tp, pp=pp, cp=cp, dp=dp)
        return cls._create(sizes, rank, _no_groups, torch.device("meta"), virtual_pp_size)

    tp = property(lambda self: self.axes["tp"])
    cp = property(lambda self: self.axes["cp"])
    dp = property(lambda self: self.axes["dp"])
    pp = property(lambda self: self.axes["pp"])
    dp_cp = property(lambda self: self.axes["dp_cp"])
    tp_cp = property(lambda self: self.axes["tp_cp"])
    model = property(lambda self: self.axes["model"])
    embedding = property(lambda self: self.axes["embedding"])

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    @property
    def next_stage_rank(self) -> int:
        return self.pp.ranks[(self.pp.rank + 1) % self.pp.size]

    @property
    def prev_stage_rank(self) -> int:
        return self.pp.ranks[(self.pp.rank - 1) % self.pp.size]
