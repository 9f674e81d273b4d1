"""Where a rank's piece of a parameter lies in the layout-independent tensors a checkpoint stores.

A checkpoint stores *entries*: one global tensor per parameter, or, for a parameter whose full
tensor is ``partition_chunks`` blocks (SwiGLU's fc1 = [gate; up]), one entry per block
(``name#0``, ``name#1``), so that every TP shard is a plain rectangle of each entry. Vocabulary
parameters are stored without their padding rows (which depend on tp).

A rank's data is a flat range of its TP-local tensor (the distributed optimizer's range, or a
share of the weights); ``flat_range_boxes`` cuts it into rectangles, ``pieces`` maps each to its
entry. Everything here is pure arithmetic on shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from slimtron.model.init import VOCAB_PARAMETERS


@dataclass(frozen=True)
class Box:
    """A rectangle of a tensor: ``offsets`` and ``sizes`` per dimension."""
    offsets: tuple
    sizes: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def slices(self) -> tuple:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def intersect(self, other: "Box"):
        """The common rectangle, or None."""
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a + s, b + t) for a, s, b, t in
                   zip(self.offsets, self.sizes, other.offsets, other.sizes))
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def shifted(self, delta: tuple) -> "Box":
        return Box(tuple(o + d for o, d in zip(self.offsets, delta)), self.sizes)


def flat_range_boxes(shape: tuple, start: int, end: int) -> list:
    """Rectangles (in row-major order) that together are elements [start, end) of a row-major
    tensor of ``shape``: at most a partial leading row, a block of whole rows, a partial last row
    (recursively for more dimensions). Each rectangle is contiguous in memory."""
    shape = tuple(shape)
    if start >= end:
        return []
    if len(shape) <= 1:
        return [Box((start,), (end - start,))] if shape else [Box((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner
    head_start, tail_end = start - first * inner, end - last * inner
    boxes = []
    if first == last:
        return [_prefixed(first, b) for b in flat_range_boxes(shape[1:], head_start, tail_end)]
    if head_start:
        boxes += [_prefixed(first, b) for b in flat_range_boxes(shape[1:], head_start, inner)]
        first += 1
    whole_end = last + 1 if tail_end == inner else last
    if whole_end > first:
        boxes.append(Box((first,) + (0,) * (len(shape) - 1), (whole_end - first,) + shape[1:]))
    if tail_end != inner:
        boxes += [_prefixed(last, b) for b in flat_range_boxes(shape[1:], 0, tail_end)]
    return boxes


def _prefixed(row: int, box: Box) -> Box:
    return Box((row,) + box.offsets, (1,) + box.sizes)


def flat_offset(shape: tuple, box: Box) -> int:
    """Position of the box's first element in the row-major flattening of ``shape``."""
    offset = 0
    for size, o in zip(shape, box.offsets):
        offset = offset * size + o
    return offset


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter's TP-local tensor on one TP rank maps onto its checkpoint entries."""
    name: str
    local_shape: tuple
    dim: int  # partition dimension; -1 when replicated over TP
    chunks: int
    tp_rank: int
    rows_kept: int  # entry rows along dim 0 (the unpadded vocabulary), else the full size

    @classmethod
    def of(cls, param, tp_rank: int, vocab_size: int) -> "ParamLayout":
        tp = bool(getattr(param, "tensor_model_parallel", False))
        dim = int(param.partition_dim) if tp else -1
        chunks = int(getattr(param, "partition_chunks", 1)) if tp else 1
        full = tuple(param.full_shape)
        rows = vocab_size if param.global_name in VOCAB_PARAMETERS else full[0]
        return cls(param.global_name, tuple(param.shape), dim, chunks, tp_rank if tp else 0, rows)

    def entry_key(self, block: int) -> str:
        return self.name if self.chunks == 1 else f"{self.name}#{block}"

    def entries(self, tp_size: int) -> dict:
        """``{key: global shape}`` of this parameter's entries."""
        out = {}
        for block in range(self.chunks):
            shape = list(self.local_shape)
            if self.dim >= 0:
                shape[self.dim] = shape[self.dim] // self.chunks * tp_size
            shape[0] = min(shape[0], self.rows_kept)
            out[self.entry_key(block)] = tuple(shape)
        return out

    def pieces(self, local: Box) -> list:
        """``[(entry key, box in the entry, box in the local tensor)]`` covering ``local`` minus
        the vocabulary padding rows."""
        out = []
        for block in range(self.chunks):
            in_block, shift = local, [0] * len(self.local_shape)
            if self.dim >= 0:
                size = self.local_shape[self.dim] // self.chunks
                lo, hi = [0] * len(self.local_shape), list(self.local_shape)
                lo[self.dim], hi[self.dim] = block * size, (block + 1) * size
                in_block = local.intersect(Box(tuple(lo), tuple(h - l for l, h in zip(lo, hi))))
                shift[self.dim] = (self.tp_rank - block) * size
            if in_block is None:
                continue
            entry_box = in_block.shifted(tuple(shift))
            rows = min(entry_box.offsets[0] + entry_box.sizes[0], self.rows_kept) \
                - entry_box.offsets[0]
            if rows <= 0:
                continue
            kept = Box(entry_box.offsets, (rows,) + entry_box.sizes[1:])
            local_kept = kept.shifted(tuple(-s for s in shift))
            out.append((self.entry_key(block), kept, local_kept))
        return out
