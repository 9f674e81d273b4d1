"""Global gradient L2 norm across tensor, pipeline and data parallelism, and clipping by it.

Every element of the full model's gradient is counted exactly once over the world:
- a tensor-parallel parameter is a different shard on every TP rank: counted on each;
- a replicated parameter (including sequence-parallel norms, whose grads are all-reduced over TP
  before this point) is counted only on TP rank 0;
- the tied embedding (``shared_embedding``) lives on the first and the last pipeline stage with the
  same gradient: counted only on the first stage;
- with the distributed optimizer each DP rank passes only its own shard, and the squared norm is
  summed over the DP group too (without it, DP ranks hold identical grads and are not summed).
"""
from __future__ import annotations

import torch

from slimtron.parallel import comm


def counts_in_norm(param: torch.Tensor, tp_rank: int, first_stage: bool) -> bool:
    """Whether this rank's copy of ``param`` contributes to the global gradient norm."""
    if getattr(param, "shared_embedding", False) and not first_stage:
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def global_grad_norm(params: list, grads: list, model_group, shard_group=None, *,
                     tp_rank: int = 0, first_stage: bool = True) -> torch.Tensor:
    """L2 norm of the whole model's gradient as a 0-dim fp32 tensor on the gradients' device (no
    host sync); ``grads[i]`` is the (local part of) ``params[i]``'s gradient. The squared norm is
    summed over ``model_group`` (one replica's ranks: ``pstate.model.group``) and, when grads are
    sharded (the distributed optimizer, over ``pstate.dp_cp.group``), over ``shard_group``."""
    counted = [g for p, g in zip(params, grads) if counts_in_norm(p, tp_rank, first_stage)]
    device = grads[0].device if grads else params[0].device
    squared = torch.zeros(1, dtype=torch.float32, device=device)
    if counted:
        # One foreach launch for every tensor's norm, whatever their number.
        squared += torch.stack(torch._foreach_norm(counted)).float().pow(2).sum()
    comm.all_reduce(squared, model_group)
    comm.all_reduce(squared, shard_group)
    return squared.sqrt().reshape(())


def clip_grads_by_norm(grads: list, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale ``grads`` in place by ``max_norm / (total_norm + 1e-6)`` when that is below one
    (computed on the device: multiplying by exactly 1.0 leaves them unchanged otherwise)."""
    if not grads:
        return
    coefficient = (max_norm / (total_norm + 1.0e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coefficient)


def clip_grad_norm(params: list, grads: list, max_norm: float, model_group, shard_group=None,
                   *, tp_rank: int = 0, first_stage: bool = True) -> torch.Tensor:
    """Clip ``grads`` to a global L2 norm of ``max_norm``; returns the norm before clipping (a
    0-dim device tensor: reading it is the caller's sync). Arguments as ``global_grad_norm``."""
    total_norm = global_grad_norm(params, grads, model_group, shard_group, tp_rank=tp_rank,
                                  first_stage=first_stage)
    clip_grads_by_norm(grads, max_norm, total_norm)
    return total_norm
