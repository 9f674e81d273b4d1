"""Checkpoints that resume exactly and load under any parallel layout.

Why a format of our own rather than torch.distributed.checkpoint: our TP shards are not always a
contiguous slice of the full tensor (SwiGLU's fc1 holds a piece of the gate *and* of the up
projection, see ``slimtron.parallel.sharding``), and the padded vocabulary changes size with tp.
Both are one call to ``sharding.unshard`` / ``sharding.shard`` here, and the files stay plain
``torch.save`` dictionaries of tensors that any tool can open with ``weights_only=True``.

Layout of ``DIR``::

    latest_checkpointed_iteration.txt    the newest complete iteration (written last, atomically)
    iter_0000010/
        common.pt                        iteration, consumed samples, config, layout, and the
                                         optimizer's state_dict: update counters, LR schedule,
                                         loss scaler (rank 0)
        model_tp00_pp000.pt              the (tp, pp) shard of every parameter of that stage, with the
                                         fp32 main parameter and Adam moments of the same shard
                                         (gathered over data-parallel ranks for the distributed
                                         optimizer), written by data-parallel rank 0
        rng_rank00000.pt                 every rank's RNG states

A save goes to ``iter_0000010.tmp`` and is renamed when every rank has written its files; only then
does the tracker move. A run killed mid-save leaves a ``.tmp`` directory that is never loaded.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from slimtron.config import ConfigError
from slimtron.model.init import VOCAB_PARAMETERS
from slimtron.parallel import sharding
from slimtron.parallel.state import ParallelState

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
# Fields of ModelConfig that decide the shape or meaning of the weights.
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                      "norm_epsilon", "num_query_groups", "kv_channels", "vocab_size", "normalization",
                      "position_embedding_type", "swiglu", "add_bias_linear", "add_qkv_bias",
                      "untie_embeddings_and_output_weights", "max_position_embeddings")
OPTIM_KEYS = ("main_param", "exp_avg", "exp_avg_sq")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:03d}.pt"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _named_params(model_chunks) -> dict[str, torch.nn.Parameter]:
    """Global name -> parameter, over every chunk (tied copies share a name)."""
    out = {}
    for chunk in model_chunks:
        for p in chunk.parameters():
            out.setdefault(p.global_name, p)
    return out


def _write_atomic(obj, path: str):
    tmp = path + ".part"
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- RNG
def rng_state(device: torch.device, rng_tracker=None) -> dict:
    """Every generator this rank draws from: CPU ones, its own device's, the tracker's streams."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate(),
             "device": device.type}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if rng_tracker is not None:
        state["tracker"] = rng_tracker.get_states()
    return state


def _numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
            "has_gauss": has_gauss, "cached": cached}


def set_rng_state(state: dict, device: torch.device, rng_tracker=None) -> bool:
    """Restore ``rng_state``'s generators; False when it was saved on another kind of device,
    whose generator states (its own and the tracker's) do not fit this one's and are skipped."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    random.setstate(_as_python_state(state["python"]))
    if state.get("device", "cuda" if "cuda" in state else "cpu") != device.type:
        return False
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if rng_tracker is not None and "tracker" in state:
        rng_tracker.set_states(state["tracker"])
    return True


def _as_python_state(s):
    # torch.save turns the inner tuple of random.getstate() into a list.
    return (s[0], tuple(s[1]), s[2])


# --------------------------------------------------------------------------------- optimizer
def _gather_over_dp(flat_piece: torch.Tensor, rng: tuple[int, int], numel: int,
                    pstate: ParallelState, sharded: bool) -> torch.Tensor:
    """The whole flat TP-local tensor (CPU) on data-parallel rank 0, from every rank's range.
    ``sharded``: the DP ranks hold disjoint ranges (distributed optimizer) to be summed, on the
    rank's device (NCCL reduces device tensors only); otherwise every rank holds all of it."""
    reduce = sharded and pstate.dp_group is not None
    device = pstate.device if reduce else torch.device("cpu")
    full = torch.zeros(numel, dtype=torch.float32, device=device)
    full[rng[0]:rng[1]] = flat_piece.to(device, torch.float32)
    if reduce:
        dist.reduce(full, dst=pstate.dp_ranks[0], group=pstate.dp_group)
    return full.cpu()


def _optimizer_shards(optimizer, params: dict, pstate: ParallelState) -> dict:
    """Main parameters and Adam moments of every parameter as whole TP-local shards (on DP rank 0).

    Under the distributed optimizer a rank holds a range of some parameters and none of others
    (absent from ``param_state``); it then contributes an empty range."""
    state = optimizer.param_state()
    sharded = bool(getattr(optimizer.grads, "use_distributed_optimizer", False))
    empty = torch.zeros(0, device="cpu")
    out = {}
    for name, p in params.items():
        entry = state.get(name, {"range": (0, 0), **{k: empty for k in OPTIM_KEYS}})
        out[name] = {k: _gather_over_dp(entry[k], entry["range"], p.numel(), pstate, sharded)
                     .view(p.shape) for k in OPTIM_KEYS}
    return out


# -------------------------------------------------------------------------------------- save
def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, pstate:
                    ParallelState, config, consumed_samples: int, extra: Optional[dict] = None,
                    rng_tracker=None):
    """Collective: every rank calls it. Returns the directory written."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if pstate.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    params = _named_params(model_chunks)
    optim = _optimizer_shards(optimizer, params, pstate) if optimizer is not None else None
    if pstate.dp_rank == 0:
        shard = {
            "params": {n: p.detach().cpu() for n, p in params.items()},
            "meta": {n: _param_meta(p) for n, p in params.items()},
            "tp_rank": pstate.tp_rank, "tp_size": pstate.tp_size, "pp_rank": pstate.pp_rank,
        }
        if optim is not None:
            shard["optim"] = optim
        _write_atomic(shard, os.path.join(tmp, model_file(pstate.tp_rank, pstate.pp_rank)))
    _write_atomic(rng_state(pstate.device, rng_tracker),
                  os.path.join(tmp, f"rng_rank{pstate.rank:05d}.pt"))
    if pstate.rank == 0:
        common = {
            "format_version": FORMAT_VERSION, "iteration": iteration,
            "consumed_samples": consumed_samples, "config": config.to_dict(),
            "layout": {"tp": pstate.tp_size, "pp": pstate.pp_size, "dp": pstate.dp_size,
                       "world": pstate.world_size},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "extra": extra or {},
        }
        _write_atomic(common, os.path.join(tmp, "common.pt"))
    _barrier()
    if pstate.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_tracker(root, iteration)
    _barrier()
    return final


def _param_meta(p) -> dict:
    return {"full_shape": list(p.full_shape), "tensor_model_parallel": bool(p.tensor_model_parallel),
            "partition_dim": int(getattr(p, "partition_dim", 0)),
            "partition_chunks": int(getattr(p, "partition_chunks", 1))}


def _write_tracker(root: str, iteration: int):
    tmp = os.path.join(root, TRACKER + ".part")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))


# -------------------------------------------------------------------------------------- load
def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by the tracker, or None when the directory holds no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: tracker file is damaged (content {text[:40]!r})")
    iteration = int(text)
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise ValueError(f"{path}: names iteration {iteration} but {iteration_dir(root, iteration)} "
                         "does not exist")
    return iteration


def _load(path: str):
    if not os.path.exists(path):
        raise ValueError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(f"checkpoint file {path} is damaged: {type(e).__name__}: {e}") from None


def load_common(root: str) -> tuple[str, dict]:
    iteration = latest_iteration(root)
    if iteration is None:
        raise ValueError(f"{root}: no {TRACKER}: not a checkpoint directory")
    ckpt_dir = iteration_dir(root, iteration)
    return ckpt_dir, _load(os.path.join(ckpt_dir, "common.pt"))


def check_same_model(common: dict, model_config, ckpt_dir: str):
    saved = common["config"]["model"]
    for field_name in MODEL_SHAPE_FIELDS:
        ours = getattr(model_config, field_name)
        if saved.get(field_name) != ours:
            raise ConfigError(f"checkpoint {ckpt_dir} is from a different model: {field_name} is "
                              f"{saved.get(field_name)!r} there and {ours!r} in this run")


class _SavedShards:
    """Lazy (memory-mapped) access to the TP shards of every parameter in a checkpoint."""

    def __init__(self, ckpt_dir: str, layout: dict):
        self.ckpt_dir = ckpt_dir
        self.tp = layout["tp"]
        self.files = {}
        self.where = {}  # global name -> pp rank of a file holding it
        for pp_rank in range(layout["pp"]):
            for tp_rank in range(self.tp):
                shard = _load(os.path.join(ckpt_dir, model_file(tp_rank, pp_rank)))
                self.files[tp_rank, pp_rank] = shard
                for name in shard["params"]:
                    self.where.setdefault(name, pp_rank)

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
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


def load_checkpoint(root: str, model_chunks, optimizer, pstate: ParallelState, config,
                    load_optim: bool = True, load_rng: bool = True, finetune: bool = False,
                    rng_tracker=None) -> dict:
    """Load the newest complete checkpoint into this layout. Returns {"iteration",
    "consumed_samples", "extra", "rng_restored"}; with finetune, which loads weights only,
    {"iteration": 0, "consumed_samples": 0, "extra": {}}. RNG states are restored only into the
    layout (world, tp, pp) that saved them."""
    ckpt_dir, common = load_common(root)
    if common.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir}: unknown checkpoint format version "
                         f"{common.get('format_version')!r}")
    check_same_model(common, config.model, ckpt_dir)
    saved = _SavedShards(ckpt_dir, common["layout"])
    params = _named_params(model_chunks)
    with torch.no_grad():
        for name, p in params.items():
            full = _fit_full(saved.full(name), p, name, ckpt_dir)
            p.copy_(sharding.shard_like(full, p, pstate.tp_size, pstate.tp_rank).to(p.dtype))
    if finetune:
        optimizer_reload_main_params(optimizer)
        return {"iteration": 0, "consumed_samples": 0, "extra": {}}
    if load_optim and optimizer is not None:
        _load_optimizer(saved, optimizer, params, pstate, ckpt_dir)
        optimizer.load_state_dict(common["optimizer"])  # step counters, LR schedule, loss scale
    else:
        optimizer_reload_main_params(optimizer)
    same_layout = (common["layout"]["world"] == pstate.world_size
                   and common["layout"]["tp"] == pstate.tp_size
                   and common["layout"]["pp"] == pstate.pp_size)
    restored = load_rng and same_layout and set_rng_state(
        _load(os.path.join(ckpt_dir, f"rng_rank{pstate.rank:05d}.pt")), pstate.device, rng_tracker)
    return {"iteration": common["iteration"], "consumed_samples": common["consumed_samples"],
            "extra": common.get("extra", {}), "rng_restored": restored}


def optimizer_reload_main_params(optimizer):
    """After weights change under the optimizer, its fp32 main copy must follow them."""
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()


def _load_optimizer(saved: _SavedShards, optimizer, params: dict, pstate: ParallelState,
                    ckpt_dir: str):
    ranges = optimizer.param_ranges()
    new_state = {}
    for name, p in params.items():
        if name not in ranges:  # distributed optimizer: none of it is in this rank's range
            continue
        start, end = ranges[name]
        entry = {"range": (start, end)}
        for key in OPTIM_KEYS:
            full = _fit_full(saved.full(name, key), p, name, ckpt_dir)
            local = sharding.shard_like(full, p, pstate.tp_size, pstate.tp_rank)
            entry[key] = local.reshape(-1)[start:end].float().clone()
        new_state[name] = entry
    optimizer.load_param_state(new_state)
