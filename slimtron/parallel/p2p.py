"""Point-to-point transfers between neighbouring pipeline stages.

Activations travel forward (to ``pstate.next_stage_rank``), their grads backward (to
``pstate.prev_stage_rank``); both are ``[s, b, h]`` tensors (``[s/tp, b, h]`` under sequence
parallelism) of one known shape and dtype, so receivers allocate their buffers without a handshake.
Every transfer of one step is posted in a single ``batch_isend_irecv`` and waited for together,
which is what keeps two neighbours that send to each other at once from deadlocking. With two
stages (or interleaving) the next and previous stage can be the same rank; the schedules post
activations and grads in the same order on both ends (``simulate(..., tagged=False)`` checks it),
and each direction also has its own tag so that an activation is never matched with a grad.
"""
from __future__ import annotations

import enum
from typing import Sequence

import torch
import torch.distributed as dist


class Direction(enum.Enum):
    FORWARD = 0  # activations, to the next stage
    BACKWARD = 1  # grads, to the previous stage


class StageLink:
    """This rank's links to its two pipeline neighbours, with a count of the bytes sent."""

    def __init__(self, pstate, tensor_shape: Sequence[int], dtype: torch.dtype):
        self.next_rank = pstate.next_stage_rank
        self.prev_rank = pstate.prev_stage_rank
        self.group = pstate.pp.group
        self.device = pstate.device
        self.shape = torch.Size(tensor_shape)
        self.dtype = dtype
        self.bytes_sent = 0

    def exchange(self, sends: Sequence[tuple[Direction, torch.Tensor]] = (),
                 recvs: Sequence[Direction] = ()) -> list[torch.Tensor]:
        """Send ``sends`` and receive one tensor per entry of ``recvs``, as one batch; returns the
        received tensors in the order of ``recvs`` once every transfer has completed."""
        ops, received = [], []
        for direction, tensor in sends:
            self._check(tensor, direction)
            peer = self.next_rank if direction is Direction.FORWARD else self.prev_rank
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, self.group,
                                  tag=direction.value))
            self.bytes_sent += tensor.numel() * tensor.element_size()
        for direction in recvs:
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            peer = self.prev_rank if direction is Direction.FORWARD else self.next_rank
            ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group, tag=direction.value))
            received.append(buffer)
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received

    def _check(self, tensor: torch.Tensor, direction: Direction) -> None:
        if tensor.shape != self.shape or tensor.dtype != self.dtype:
            raise ValueError(f"pipeline {direction.name.lower()} send of a {tuple(tensor.shape)} "
                             f"{tensor.dtype} tensor, but the pipeline's tensor_shape/dtype is "
                             f"{tuple(self.shape)} {self.dtype}")
