"""Elementwise work in cache-sized blocks of rows on the CPU.

A chain of elementwise ops over a large tensor runs at memory speed on the CPU, and each op
that makes a new tensor of tens of MB also page-faults fresh memory in: the mixed-precision
parts of a step (fp32 math over bf16 activations) cost more than their arithmetic. Run block by
block, the same chain keeps its fp32 temporaries in the caches and in reused buffers. On a GPU
one block covers everything (each op is a kernel launch there).
"""
from __future__ import annotations

import torch

CPU_BLOCK_BYTES = 1 << 21  # fp32 bytes of one block of rows: within the L2 / L3 caches


def spans(total: int, step: int) -> list[tuple[int, int]]:
    """[start, end) ranges of ``step`` items covering ``total`` (the last may be shorter)."""
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def row_blocks(rows: int, row_elements: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, end) ranges of rows such that one range of fp32 rows fits CPU_BLOCK_BYTES (one
    range on other devices)."""
    if device.type != "cpu":
        return spans(rows, max(rows, 1))
    return spans(rows, max(1, min(rows, CPU_BLOCK_BYTES // (4 * max(row_elements, 1)))))


def row_buffer(blocks: list, columns: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The reused buffer of ``blocks`` (from ``row_blocks``): as many rows as the first block."""
    return torch.empty(blocks[0][1] if blocks else 0, columns, dtype=dtype, device=device)


def add_(accumulator: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """``accumulator += addend`` where a contiguous fp32 accumulator takes a contiguous 16-bit
    addend (gradient accumulation into main grads): on the CPU, block by block, so that the
    addend is converted in cache rather than into a full-size fp32 copy."""
    if (accumulator.dtype == addend.dtype or accumulator.device.type != "cpu"
            or not (accumulator.is_contiguous() and addend.is_contiguous())):
        return accumulator.add_(addend)
    flat_acc, flat_add = accumulator.view(-1), addend.view(-1)
    width = CPU_BLOCK_BYTES // 4
    buffer = torch.empty(min(width, flat_add.numel()), dtype=accumulator.dtype)
    for start, end in spans(flat_add.numel(), width):
        flat_acc[start:end].add_(buffer[:end - start].copy_(flat_add[start:end]))
    return accumulator
