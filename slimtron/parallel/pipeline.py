"""The pipeline executor: runs this stage's schedule (``pipeline_schedules``) on model chunks.

The executor knows nothing of the model. It calls the user's
``forward_step(chunk_index, microbatch, input_tensor_or_None) -> output``; on the last stage's last
chunk that output is the micro-batch's scalar loss already divided by the number of micro-batches
(the executor backpropagates it), elsewhere it is the activation sent on to the next stage. With
one stage the schedule is plain gradient accumulation: forward and backward of each micro-batch.

Memory: an output is freed as soon as it has been sent; only its autograd edge is kept, which is
all its backward needs (Megatron's "deallocate output tensor").
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.autograd.graph import get_gradient_edge

from slimtron.parallel.p2p import Direction, StageLink
from slimtron.parallel.pipeline_schedules import Action, Kind, build_schedule, steps

__all__ = ["forward_backward", "build_schedule", "Action", "Kind", "StageLink"]

ForwardStep = Callable[[int, Optional[dict], Optional[torch.Tensor]], torch.Tensor]


def forward_backward(model_chunks: Sequence[torch.nn.Module], forward_step: ForwardStep,
                     microbatches: Sequence[Optional[dict]], pstate, tensor_shape: Sequence[int],
                     dtype: torch.dtype, forward_only: bool = False,
                     link: Optional[StageLink] = None) -> list[torch.Tensor]:
    """Run one batch of ``len(microbatches)`` micro-batches through this pipeline stage.

    ``model_chunks`` are this stage's virtual-pipeline chunks (their number selects 1F1B or the
    interleaved schedule); ``forward_step`` closes over them. Stages that read no data may pass
    ``None`` micro-batches, but every stage passes the same number. ``tensor_shape``/``dtype``
    describe the activations between stages. Grads accumulate into the parameters' ``.grad``.
    Pass a ``link`` to read its count of bytes sent afterwards.

    Returns the detached per-micro-batch losses (as ``forward_step`` returned them, so they sum to
    the batch loss) on the last stage, and an empty list elsewhere.
    """
    if not model_chunks:
        raise ValueError("forward_backward needs at least one model chunk")
    schedule = build_schedule(pstate.pp.size, pstate.pp.rank, len(microbatches), len(model_chunks),
                              forward_only)
    run = _StageRun(forward_step, microbatches, len(model_chunks), pstate.is_last_stage,
                    forward_only, link or StageLink(pstate, tensor_shape, dtype))
    for step in steps(schedule):
        if step[0].kind is Kind.FORWARD:
            run.forward(step[0])
        elif step[0].kind is Kind.BACKWARD:
            run.backward(step[0])
        else:
            run.transfer(step)
    return [run.losses[i] for i in sorted(run.losses)]


class _StageRun:
    """The tensors in flight on one stage during one batch, keyed by (micro-batch, chunk)."""

    def __init__(self, forward_step, microbatches, num_chunks, is_last_stage, forward_only, link):
        self.forward_step = forward_step
        self.microbatches = microbatches
        self.loss_chunk = num_chunks - 1 if is_last_stage else None
        self.forward_only = forward_only
        self.link = link
        self.inputs: dict = {}  # received activations waiting for their forward
        self.outputs: dict = {}  # activations waiting to be sent
        self.output_grads: dict = {}  # received grads waiting for their backward
        self.input_grads: dict = {}  # grads waiting to be sent
        self.saved: dict = {}  # (input, loss or output's autograd edge) waiting for backward
        self.losses: dict = {}

    def forward(self, action: Action) -> None:
        key = (action.microbatch, action.chunk)
        input_tensor = self.inputs.pop(key, None)
        with torch.set_grad_enabled(not self.forward_only):
            output = self.forward_step(action.chunk, self.microbatches[action.microbatch],
                                       input_tensor)
        if action.chunk == self.loss_chunk:
            if output.numel() != 1:
                raise ValueError("forward_step of the last chunk must return the scalar loss, got "
                                 f"shape {tuple(output.shape)} for micro-batch {action.microbatch}")
            self.losses[action.microbatch] = output.detach()
            target = output
        else:
            self.outputs[key] = output
            target = None if self.forward_only else _gradient_edge(output, action)
        if not self.forward_only:
            self.saved[key] = (input_tensor, target)

    def backward(self, action: Action) -> None:
        key = (action.microbatch, action.chunk)
        input_tensor, target = self.saved.pop(key)
        if action.chunk == self.loss_chunk:
            torch.autograd.backward(target)
        else:
            torch.autograd.backward(target, self.output_grads.pop(key))
        if input_tensor is not None:
            if input_tensor.grad is None:
                raise RuntimeError(f"output of chunk {action.chunk} does not depend on its input "
                                   f"(micro-batch {action.microbatch}): no grad to send back")
            self.input_grads[key] = input_tensor.grad

    def transfer(self, batch: list[Action]) -> None:
        sends, recvs = [], []
        for a in batch:
            key = (a.microbatch, a.chunk)
            if a.kind is Kind.SEND_FWD:
                sends.append((Direction.FORWARD, self.outputs[key]))
            elif a.kind is Kind.SEND_BWD:
                sends.append((Direction.BACKWARD, self.input_grads.pop(key)))
            else:
                recvs.append(a)
        received = self.link.exchange(sends, [
            Direction.FORWARD if a.kind is Kind.RECV_FWD else Direction.BACKWARD for a in recvs])
        for a in batch:
            if a.kind is Kind.SEND_FWD:
                _free_storage(self.outputs.pop((a.microbatch, a.chunk)))
        for a, tensor in zip(recvs, received):
            if a.kind is Kind.RECV_FWD:
                self.inputs[(a.microbatch, a.chunk)] = tensor.requires_grad_(not self.forward_only)
            else:
                self.output_grads[(a.microbatch, a.chunk)] = tensor


def _gradient_edge(output: torch.Tensor, action: Action):
    """The autograd edge of an output: backward through it needs neither the tensor nor its data."""
    if not output.requires_grad:
        raise ValueError(f"output of chunk {action.chunk} (micro-batch {action.microbatch}) does "
                         "not require grad: it must be part of the autograd graph")
    return get_gradient_edge(output)


def _free_storage(output: torch.Tensor) -> None:
    """Drop an already-sent output's data; its autograd edge stays valid. A view is left alone:
    its storage belongs to its base tensor."""
    if output._base is None:
        output.data = torch.empty((0,), dtype=output.dtype, device=output.device)
