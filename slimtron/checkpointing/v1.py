"""Format version 1 (``--ckpt-format torch``): one ``torch.save`` file per (tp, pp) shard.

Layout of an iteration directory::

    common.pt                  iteration, consumed samples, config, layout, optimizer state_dict
    model_tp00_pp000.pt        the (tp, pp) shard of every parameter of that stage, with the fp32
                               main parameter and Adam moments of the same shard (gathered over
                               data-parallel ranks), written by data-parallel rank 0
    rng_rank00000.pt           every rank's RNG states

Kept so that checkpoints written before format 2 load, and for ``--ckpt-format torch``. Its costs
are why format 2 exists: a save gathers the whole optimizer state of a (tp, pp) shard on every DP
rank and one rank writes it; a load rebuilds every full tensor from all TP files.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from slimtron.checkpointing.common import (COMMON_FILE, OPTIM_KEYS, barrier, iteration_dir,
                                           layout_of, load_file, named_params, rng_file,
                                           rng_state, write_atomic, write_tracker)
from slimtron.config import ConfigError
from slimtron.model.init import VOCAB_PARAMETERS
from slimtron.parallel import sharding

FORMAT_VERSION = 1


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:03d}.pt"


def param_meta(p) -> dict:
    return {"full_shape": list(p.full_shape), "tensor_model_parallel": bool(p.tensor_model_parallel),
            "partition_dim": int(getattr(p, "partition_dim", 0)),
            "partition_chunks": int(getattr(p, "partition_chunks", 1))}


# -------------------------------------------------------------------------------------- save
def _gather_over_dp(flat_piece: torch.Tensor, rng: tuple, numel: int, pstate,
                    sharded: bool) -> torch.Tensor:
    """The whole flat TP-local tensor (CPU) on data-parallel rank 0, from every rank's range.
    ``sharded``: the dp x cp ranks hold disjoint ranges (distributed optimizer) to be summed, on
    the rank's device (NCCL reduces device tensors only); otherwise every rank holds all of it."""
    replicas = pstate.dp_cp  # context-parallel ranks are replicas too
    reduce = sharded and replicas.group is not None
    device = pstate.device if reduce else torch.device("cpu")
    full = torch.zeros(numel, dtype=torch.float32, device=device)
    full[rng[0]:rng[1]] = flat_piece.to(device, torch.float32)
    if reduce:
        dist.reduce(full, dst=replicas.ranks[0], group=replicas.group)
    return full.cpu()


def _optimizer_shards(optimizer, params: dict, pstate) -> dict:
    state = optimizer.param_state()
    sharded = bool(getattr(optimizer.grads, "use_distributed_optimizer", False))
    empty = torch.zeros(0, device="cpu")
    out = {}
    for name, p in params.items():
        entry = state.get(name, {"range": (0, 0), **{k: empty for k in OPTIM_KEYS}})
        out[name] = {k: _gather_over_dp(entry[k], entry["range"], p.numel(), pstate, sharded)
                     .view(p.shape) for k in OPTIM_KEYS}
    return out


def save(root: str, iteration: int, model_chunks, optimizer, pstate, common: dict,
         rng_tracker=None) -> str:
    """Collective: the version-1 writer. ``common``: common.pt's dict (without its version)."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if pstate.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    params = named_params(model_chunks)
    optim = _optimizer_shards(optimizer, params, pstate) if optimizer is not None else None
    if pstate.dp_cp.rank == 0:  # one writer per (tp, pp)
        shard = {
            "params": {n: p.detach().cpu() for n, p in params.items()},
            "meta": {n: param_meta(p) for n, p in params.items()},
            "tp_rank": pstate.tp.rank, "tp_size": pstate.tp.size, "pp_rank": pstate.pp.rank,
        }
        if optim is not None:
            shard["optim"] = optim
        write_atomic(shard, os.path.join(tmp, model_file(pstate.tp.rank, pstate.pp.rank)))
    write_atomic(rng_state(pstate.device, rng_tracker), os.path.join(tmp, rng_file(pstate.rank)))
    if pstate.rank == 0:
        write_atomic({**common, "format_version": FORMAT_VERSION, "layout": layout_of(pstate)},
                     os.path.join(tmp, COMMON_FILE))
    barrier()
    if pstate.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_tracker(root, iteration)
    barrier()
    return final


# -------------------------------------------------------------------------------------- load
class SavedShards:
    """Lazy (memory-mapped) access to the TP shards of every parameter in a checkpoint."""

    def __init__(self, ckpt_dir: str, layout: dict):
        self.ckpt_dir = ckpt_dir
        self.tp = layout["tp"]
        self.files = {}
        self.where = {}  # global name -> pp rank of a file holding it
        for pp_rank in range(layout["pp"]):
            for tp_rank in range(self.tp):
                shard = load_file(os.path.join(ckpt_dir, model_file(tp_rank, pp_rank)))
                self.files[tp_rank, pp_rank] = shard
                for name in shard["params"]:
                    self.where.setdefault(name, pp_rank)

    def names(self) -> list:
        return list(self.where)

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The unsharded tensor (weights, or the optimizer's ``key``), vocabulary padded as saved."""
        if name not in self.where:
            raise ValueError(f"checkpoint {self.ckpt_dir} has no parameter {name}")
        pp_rank = self.where[name]
        meta = self.files[0, pp_rank]["meta"][name]
        shards = []
        for tp_rank in range(self.tp):
            f = self.files[tp_rank, pp_rank]
            if key is None:
                shards.append(f["params"][name])
            else:
                if "optim" not in f:
                    raise ValueError(f"checkpoint {self.ckpt_dir} holds no optimizer state "
                                     "(use --no-load-optim)")
                shards.append(f["optim"][name][key])
        if not meta["tensor_model_parallel"]:
            return shards[0]
        return sharding.unshard(shards, meta["partition_dim"], meta["partition_chunks"])


def _fit_full(full: torch.Tensor, p, name: str, ckpt_dir: str) -> torch.Tensor:
    """Match the saved full tensor to this run's full shape; only vocab padding may differ."""
    want = tuple(p.full_shape)
    if tuple(full.shape) == want:
        return full
    if full.shape[1:] == torch.Size(want[1:]) and name in VOCAB_PARAMETERS:
        fitted = full.new_zeros(want)
        rows = min(want[0], full.shape[0])
        fitted[:rows] = full[:rows]
        return fitted
    raise ConfigError(f"checkpoint {ckpt_dir}: parameter {name} has shape {tuple(full.shape)} there "
                      f"and {want} in this run")


def load_weights(ckpt_dir: str, common: dict, model_chunks, pstate) -> SavedShards:
    saved = SavedShards(ckpt_dir, common["layout"])
    with torch.no_grad():
        for name, p in named_params(model_chunks).items():
            full = _fit_full(saved.full(name), p, name, ckpt_dir)
            p.copy_(sharding.shard_like(full, p, pstate.tp.size, pstate.tp.rank).to(p.dtype))
    return saved


def load_optimizer(saved: SavedShards, optimizer, model_chunks, pstate):
    params = named_params(model_chunks)
    ranges = optimizer.param_ranges()
    new_state = {}
    for name, p in params.items():
        if name not in ranges:  # distributed optimizer: none of it is in this rank's range
            continue
        start, end = ranges[name]
        entry = {"range": (start, end)}
        for key in OPTIM_KEYS:
            full = _fit_full(saved.full(name, key), p, name, saved.ckpt_dir)
            local = sharding.shard_like(full, p, pstate.tp.size, pstate.tp.rank)
            entry[key] = local.reshape(-1)[start:end].float().clone()
        new_state[name] = entry
    optimizer.load_param_state(new_state)
