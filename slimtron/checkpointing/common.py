"""What every checkpoint format shares: the directory layout and tracker, ``common.pt``, the RNG
states, the model-identity check, and safe file loading (``weights_only``: tensors and plain
containers only, never arbitrary objects)."""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from slimtron.config import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
COMMON_FILE = "common.pt"
# Fields of ModelConfig that decide the shape or meaning of the weights.
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                      "norm_epsilon", "num_query_groups", "kv_channels", "vocab_size", "normalization",
                      "position_embedding_type", "swiglu", "add_bias_linear", "add_qkv_bias",
                      "untie_embeddings_and_output_weights", "max_position_embeddings")
OPTIM_KEYS = ("main_param", "exp_avg", "exp_avg_sq")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def barrier(group=None):
    if dist.is_initialized():
        dist.barrier(group=group)


def named_params(model_chunks) -> dict:
    """Global name -> parameter, over every chunk (tied copies share a name)."""
    out = {}
    for chunk in model_chunks:
        for p in chunk.parameters():
            out.setdefault(p.global_name, p)
    return out


def write_atomic(obj, path: str):
    tmp = path + ".part"
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tracker(root: str, iteration: int):
    tmp = os.path.join(root, TRACKER + ".part")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    fsync_dir(root)


def fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- RNG
def has_rng_states(common: dict) -> bool:
    """Whether the checkpoint holds every rank's RNG states: an import (convert_from_hf) holds
    weights only."""
    return "converted_from" not in common.get("extra", {})


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


def load_file(path: str):
    """A ``torch.save`` file of tensors and plain containers (``weights_only``: no arbitrary
    objects are ever unpickled)."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(f"checkpoint file {path} is damaged: {type(e).__name__}: {e}") from None


def load_common(root: str) -> tuple:
    """(directory, common.pt's dict) of the newest complete checkpoint in ``root``."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise ValueError(f"{root}: no {TRACKER}: not a checkpoint directory")
    ckpt_dir = iteration_dir(root, iteration)
    return ckpt_dir, load_file(os.path.join(ckpt_dir, COMMON_FILE))


def check_same_model(common: dict, model_config, ckpt_dir: str):
    saved = common["config"]["model"]
    for field_name in MODEL_SHAPE_FIELDS:
        ours = getattr(model_config, field_name)
        if saved.get(field_name) != ours:
            raise ConfigError(f"checkpoint {ckpt_dir} is from a different model: {field_name} is "
                              f"{saved.get(field_name)!r} there and {ours!r} in this run")


def layout_of(pstate) -> dict:
    return {"tp": pstate.tp.size, "pp": pstate.pp.size, "dp": pstate.dp.size,
            "cp": pstate.cp.size, "world": pstate.world_size}


def optimizer_reload_main_params(optimizer):
    """After weights change under the optimizer, its fp32 main copy must follow them."""
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
