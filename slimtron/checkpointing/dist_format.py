"""Format version 2 (``--ckpt-format torch_dist``): every rank writes and reads only its share.

Layout of an iteration directory::

    common.pt              iteration, consumed samples, config, layout, optimizer state_dict
    metadata.json          every entry's global shape and dtype, and where each of its
                           rectangles (chunks) lies: file, byte offset, offsets, sizes
    shard_00003.bin        rank 3's chunks, raw row-major bytes, one after the other
    rng_rank00003.pt       rank 3's RNG states

Entries are layout-independent (``layout.py``): ``model/<name>`` holds the weights in their dtype,
``optim/<key>/<name>`` the fp32 main parameter and Adam moments. A rank writes the part of each
that it owns: under the distributed optimizer its own range of the optimizer state; ranks that
hold the same thing (the weights of one (tp, pp) on its DP x CP ranks, or the whole optimizer state
without the distributed optimizer) write equal parts of it. No rank gathers anything but this
metadata. A load reads, for each rectangle it needs, only the overlapping rows (or row segments)
of the chunks that hold it, through a bounded buffer.

``metadata.json`` is plain JSON: loading unpickles nothing but ``common.pt`` and the RNG files,
both with ``weights_only``.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from slimtron.checkpointing.common import OPTIM_KEYS, named_params
from slimtron.checkpointing.layout import Box, ParamLayout, flat_offset, flat_range_boxes
from slimtron.config import ConfigError

FORMAT_VERSION = 2
FORMAT_NAME = "torch_dist"
METADATA_FILE = "metadata.json"
# Host memory one rank uses to stage a write from device memory or to read a rectangle.
STAGING_BYTES = 64 << 20
_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


_SHARD_NAME = re.compile(r"shard_\d{5,}\.bin")


def shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.bin"


@dataclass
class Chunk:
    """One rectangle of one entry that this rank writes; ``data`` is its tensor (any device)."""
    key: str
    box: Box
    data: torch.Tensor


# ---------------------------------------------------------------------------------- planning
def _share(start: int, end: int, index: int, count: int) -> tuple:
    """Part ``index`` of ``count`` near-equal parts of [start, end)."""
    n = end - start
    return start + n * index // count, start + n * (index + 1) // count


def _shares(ranges: dict, axis) -> dict:
    """This rank's part of each range: ranks of ``axis`` holding an equal range split it."""
    if axis.size <= 1 or axis.group is None:
        return ranges
    everyone = [None] * axis.size
    dist.all_gather_object(everyone, ranges, group=axis.group)
    out = {}
    for name, rng in ranges.items():
        holders = [i for i, theirs in enumerate(everyone) if theirs.get(name) == rng]
        out[name] = _share(rng[0], rng[1], holders.index(axis.rank), len(holders))
    return out


def _writes_param(p, pstate) -> bool:
    # The last stage's copy of a tied embedding is written by the first stage, a parameter
    # replicated over TP (norms, biases after a row-parallel layer) by TP rank 0.
    if getattr(p, "shared_embedding", False) and pstate.pp.rank != 0:
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or pstate.tp.rank == 0


def _optimizer_tensors(optimizer) -> dict:
    """``{name: (range, {key: flat tensor})}``: the optimizer's own tensors, not copies."""
    out = {}
    for shard in optimizer.shards:
        state = optimizer.adam.state.get(shard.main_param, {}) if optimizer.adam is not None else {}
        n = shard.end - shard.start
        tensors = {"main_param": shard.main_param.detach().reshape(-1)}
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[key] = (state[key].reshape(-1) if key in state else
                            torch.zeros(n, dtype=torch.float32, device=shard.main_param.device))
        out[optimizer._global_name(shard.model_param)] = ((shard.start, shard.end), tensors)
    return out


def _contiguous(shape: tuple, box: Box) -> bool:
    inner_full = True
    for size, o, s in reversed(list(zip(shape, box.offsets, box.sizes))):
        if not inner_full and s != 1:
            return False
        inner_full = inner_full and o == 0 and s == size
    return True


def plan(model_chunks, optimizer, pstate, vocab_size: int) -> tuple:
    """``(entries, chunks)``: ``{key: (shape, dtype, block)}`` of every entry this rank writes to,
    and the chunks it writes. Collective over ``pstate.dp_cp`` when the optimizer is given."""
    params = {n: p for n, p in named_params(model_chunks).items() if _writes_param(p, pstate)}
    axis = pstate.dp_cp
    layouts = {n: ParamLayout.of(p, pstate.tp.rank, vocab_size) for n, p in params.items()}
    entries, chunks = {}, []

    def add(prefix: str, name: str, flat: torch.Tensor, base: int, start: int, end: int):
        _add_range(entries, chunks, layouts[name], pstate.tp.size, prefix, flat, base, start, end)

    for name, p in params.items():
        start, end = _share(0, p.numel(), axis.rank, axis.size)
        add("model/", name, p.detach().reshape(-1), 0, start, end)
    if optimizer is not None:
        tensors = {n: t for n, t in _optimizer_tensors(optimizer).items() if n in params}
        shares = _shares({n: rng for n, (rng, _) in tensors.items()}, axis)
        for name, ((base, _), flats) in tensors.items():
            start, end = shares[name]
            for key in OPTIM_KEYS:
                add(f"optim/{key}/", name, flats[key], base, start, end)
    return entries, chunks


def _add_range(entries: dict, chunks: list, lay: ParamLayout, tp_size: int, prefix: str,
               flat: torch.Tensor, base: int, start: int, end: int):
    """Add to ``entries`` one parameter's entries (under ``prefix``: "model/", "optim/<key>/")
    and to ``chunks`` those of elements [start, end) of its TP-local tensor, ``flat`` holding
    its elements from ``base`` on."""
    for block, (key, shape) in enumerate(lay.entries(tp_size).items()):
        # block: block `block` of `chunks` along dim of the parameter, when it has blocks
        entries[prefix + key] = (list(shape), str(flat.dtype).removeprefix("torch."),
                                 [block, lay.chunks, lay.dim] if lay.chunks > 1 else None)
    for box in flat_range_boxes(lay.local_shape, start, end):
        for key, entry_box, local_box in lay.pieces(box):
            if not _contiguous(lay.local_shape, local_box):
                raise ValueError(f"checkpoint: a piece of {lay.name} is not contiguous")
            at = flat_offset(lay.local_shape, local_box) - base
            chunks.append(Chunk(prefix + key, entry_box,
                                flat[at:at + local_box.numel].view(local_box.sizes)))


def _aligned(n: int) -> int:
    return -(-n // 8) * 8


def staging_size(chunks: list) -> int:
    return sum(_aligned(c.box.numel * c.data.element_size()) for c in chunks)


def stage(chunks: list, buffer: torch.Tensor) -> list:
    """Copies of every chunk in ``buffer`` (uint8, host, ``staging_size`` bytes), for a
    background write while training goes on changing the originals. A buffer kept from one save
    to the next makes this a plain copy: first-touch page faults cost 4x the copy on CPU."""
    out, at = [], 0
    for c in chunks:
        n = c.box.numel * c.data.element_size()
        view = buffer[at:at + n].view(c.data.dtype).view(c.box.sizes)
        view.copy_(c.data, non_blocking=buffer.is_pinned())
        out.append(Chunk(c.key, c.box, view))
        at += _aligned(n)
    if buffer.is_pinned() and any(c.data.is_cuda for c in chunks):
        torch.cuda.synchronize()
    return out


def chunk_records(chunks: list, start: int = 0) -> list:
    """``(key, byte offset, offsets, sizes)`` of the chunks as ``write_chunks`` lays them out in
    a rank's file from byte ``start``: plain tuples, which rank 0 gathers from every rank at each
    save (at thousands of ranks, dicts cost seconds to unpickle)."""
    records, offset = [], start
    for c in chunks:
        records.append((c.key, offset, c.box.offsets, c.box.sizes))
        offset += c.box.numel * c.data.element_size()
    return records


def metadata(entries_by_rank: list, records_by_rank: list, common_layout: dict) -> dict:
    """The metadata of a save from every rank's ``plan`` entries and ``chunk_records``, in rank
    order (rank r writes ``shard_file(r)``)."""
    entries = {}
    for part in entries_by_rank:
        for key, (shape, dtype, block) in part.items():
            entries[key] = {"shape": shape, "dtype": dtype}
            if block is not None:
                entries[key]["block"] = block
            entries[key]["chunks"] = []
    files = {}
    for rank, rank_records in enumerate(records_by_rank):
        file = shard_file(rank)
        for key, byte_offset, offsets, sizes in rank_records:
            entries[key]["chunks"].append([file, byte_offset, list(offsets), list(sizes)])
            item = math.prod(sizes) * _DTYPES[entries[key]["dtype"]].itemsize
            files[file] = max(files.get(file, 0), byte_offset + item)
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": common_layout,
            "files": files, "entries": entries}


# ---------------------------------------------------------------------------------- writing
def _host_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_chunks(path: str, chunks: list) -> int:
    """Write the chunks' bytes, in order, and fsync; returns the bytes written. Host tensors are
    written in place; device tensors through one host buffer of STAGING_BYTES."""
    written = 0
    staging = None
    with open(path, "wb", buffering=0) as f:
        for c in chunks:
            flat = c.data.reshape(-1) if c.data.is_contiguous() else c.data.contiguous().reshape(-1)
            if flat.device.type == "cpu":
                written += _write_all(f, _host_bytes(flat))
                continue
            if staging is None:
                staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, device="cpu",
                                      pin_memory=flat.is_cuda)
            step = max(1, STAGING_BYTES // flat.element_size())
            for start in range(0, flat.numel(), step):
                piece = flat[start:start + step]
                host = staging[:piece.numel() * piece.element_size()].view(piece.dtype)
                host.copy_(piece)
                written += _write_all(f, _host_bytes(host))
        os.fsync(f.fileno())
    return written


def _write_all(f, view: memoryview) -> int:
    done = 0
    while done < len(view):
        done += f.write(view[done:])
    return done


def write_metadata(path: str, meta: dict):
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SingleRankWriter:
    """A format-2 save written by one process one parameter at a time, as rank 0 of a
    one-rank layout (tools: convert_from_hf): only the parameter at hand is in memory, and the
    result loads, reading only its own bytes, into any layout."""

    def __init__(self, directory: str, vocab_size: int):
        self.directory, self.vocab_size = directory, vocab_size
        self._file = open(os.path.join(directory, shard_file(0)), "wb", buffering=0)
        self.entries: dict = {}
        self.records: list = []
        self.offset = 0

    def add(self, param, value: torch.Tensor):
        """``value``: the full (host) tensor of ``param``, a parameter tagged as the model's
        (global_name, full_shape, TP attributes) of a tp=1 model, e.g. built on meta."""
        chunks: list = []
        _add_range(self.entries, chunks, ParamLayout.of(param, 0, self.vocab_size), 1, "model/",
                   value.contiguous().reshape(-1), 0, 0, value.numel())
        self.records += chunk_records(chunks, self.offset)
        for c in chunks:
            self.offset += _write_all(self._file, _host_bytes(c.data.contiguous()))

    def finish(self, layout: dict) -> dict:
        """Sync and close the shard file; write and return the metadata."""
        os.fsync(self._file.fileno())
        self._file.close()
        meta = metadata([self.entries], [self.records], layout)
        write_metadata(os.path.join(self.directory, METADATA_FILE), meta)
        return meta


# ---------------------------------------------------------------------------------- reading
class Reader:
    """Byte-range access to a format-2 checkpoint's entries."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir
        path = os.path.join(ckpt_dir, METADATA_FILE)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint file {path} is missing")
        try:
            with open(path) as f:
                self.meta = json.load(f)
            self.entries = self.meta["entries"]
            files = self.meta["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint file {path} is damaged: {type(e).__name__}: "
                             f"{e}") from None
        for name in files:
            if not _SHARD_NAME.fullmatch(name):  # never a path that leads out of the checkpoint
                raise ValueError(f"checkpoint file {path} is damaged: it names a shard file "
                                 f"{name!r}")
        self._fds: dict = {}

    def check_files(self):
        """Every shard file present with the size the metadata gives (a load checks only the
        files it opens: thousands of ranks each stat-ing every file is a metadata storm)."""
        for name in self.meta["files"]:
            os.close(self._open_checked(name))

    def _open_checked(self, name: str) -> int:
        path = os.path.join(self.ckpt_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ValueError(f"checkpoint file {path} is missing") from None
        actual, size = os.fstat(fd).st_size, self.meta["files"][name]
        if actual != size:
            os.close(fd)
            raise ValueError(f"checkpoint file {path} is damaged: {actual} bytes, "
                             f"{METADATA_FILE} says {size}")
        return fd

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.entries)

    def entry(self, key: str, what: str) -> dict:
        if key not in self.entries:
            raise ValueError(f"checkpoint {self.ckpt_dir} holds no {what}")
        return self.entries[key]

    def dtype(self, key: str) -> torch.dtype:
        name = self.entries[key]["dtype"]
        if name not in _DTYPES:
            raise ValueError(f"checkpoint {self.ckpt_dir}: entry {key} has unknown dtype {name!r}")
        return _DTYPES[name]

    def read_into(self, key: str, want: Box, target: torch.Tensor, what: str):
        """Fill ``target`` (shaped ``want.sizes``, any device and dtype) with rectangle ``want``
        of entry ``key``, reading only the bytes that overlap it."""
        entry = self.entry(key, what)
        dtype = self.dtype(key)
        covered = 0
        for file_name, byte_offset, offsets, sizes in entry["chunks"]:
            if file_name not in self.meta["files"]:
                raise ValueError(f"checkpoint {self.ckpt_dir}: {METADATA_FILE} is damaged: "
                                 f"entry {key} names an unlisted file {file_name!r}")
            chunk = Box(tuple(offsets), tuple(sizes))
            common = chunk.intersect(want)
            if common is None:
                continue
            dest = target[common.shifted(tuple(-o for o in want.offsets)).slices()]
            self._read_rect(file_name, byte_offset, chunk, common, dtype, dest)
            covered += common.numel
        if covered > want.numel:
            raise ValueError(f"checkpoint {self.ckpt_dir}: {METADATA_FILE} is damaged: chunks of "
                             f"{key} overlap")
        if covered < want.numel:
            raise ValueError(f"checkpoint {self.ckpt_dir} holds only {covered} of the "
                             f"{want.numel} elements of {what} this rank needs")

    def _fd(self, file_name: str) -> int:
        if file_name not in self._fds:
            self._fds[file_name] = self._open_checked(file_name)
        return self._fds[file_name]

    def _read_rect(self, file_name: str, byte_offset: int, chunk: Box, rect: Box,
                   dtype: torch.dtype, dest: torch.Tensor):
        """Rows of ``rect`` (inside ``chunk``, stored row-major from ``byte_offset``) into
        ``dest``, a bounded group of rows at a time."""
        fd = self._fd(file_name)
        item = dtype.itemsize
        rel = tuple(r - c for r, c in zip(rect.offsets, chunk.offsets))
        row_items = math.prod(rect.sizes[1:])
        per_group = max(1, STAGING_BYTES // max(1, row_items * item))
        for first in range(0, rect.sizes[0], per_group):
            rows = min(per_group, rect.sizes[0] - first)
            host = torch.empty((rows,) + tuple(rect.sizes[1:]), dtype=dtype, device="cpu")
            out = host.reshape(-1).view(torch.uint8).numpy()
            for src, dst, length in _runs(chunk.sizes, rel, (rows,) + tuple(rect.sizes[1:]), first):
                _pread_all(fd, out[dst * item:(dst + length) * item],
                           byte_offset + src * item, file_name)
            dest[first:first + rows].copy_(host)


def _runs(chunk_sizes: tuple, rel: tuple, sizes: tuple, first_row: int):
    """(element offset in the chunk, offset in the output, length) of the contiguous runs that
    make up ``sizes`` (rows first) starting at row ``rel[0] + first_row`` of a chunk (<= 2-D)."""
    if len(chunk_sizes) > 2:
        raise ValueError(f"checkpoint: {len(chunk_sizes)}-D entries are not supported")
    row0 = rel[0] + first_row
    if len(chunk_sizes) == 1:
        return [(row0, 0, sizes[0])]
    rows, cols = sizes
    width = chunk_sizes[1]
    if cols == width:
        return [(row0 * width, 0, rows * cols)]
    return [((row0 + r) * width + rel[1], r * cols, cols) for r in range(rows)]


def _pread_all(fd: int, out, offset: int, file_name: str):
    view = memoryview(out)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"checkpoint file {file_name} is damaged: ends before byte "
                             f"{offset + len(view)}")
        done += n


# ---------------------------------------------------------------------------------- loading
def load_weights(reader: Reader, model_chunks, pstate, vocab_size: int):
    with torch.no_grad():
        for name, p in named_params(model_chunks).items():
            lay = ParamLayout.of(p, pstate.tp.rank, vocab_size)
            _check_shapes(reader, "model/", lay, pstate.tp.size)
            target = p.detach()
            target.zero_()  # the vocabulary padding rows, which are not stored
            whole = Box((0,) * p.dim(), tuple(p.shape))
            for key, entry_box, local_box in lay.pieces(whole):
                reader.read_into("model/" + key, entry_box, target[local_box.slices()],
                                 f"weights of {name}")


def _check_shapes(reader: Reader, prefix: str, lay: ParamLayout, tp_size: int):
    for key, shape in lay.entries(tp_size).items():
        saved = reader.entry(prefix + key, f"{prefix}{key}")["shape"]
        if tuple(saved) != tuple(shape):
            raise ConfigError(f"checkpoint {reader.ckpt_dir}: parameter {lay.name} has shape "
                              f"{tuple(saved)} there and {tuple(shape)} in this run")


def load_optimizer(reader: Reader, optimizer, model_chunks, pstate, vocab_size: int):
    if not reader.has_prefix("optim/"):
        raise ValueError(f"checkpoint {reader.ckpt_dir} holds no optimizer state "
                         "(use --no-load-optim)")
    params = named_params(model_chunks)
    new_state = {}
    for name, (start, end) in optimizer.param_ranges().items():
        lay = ParamLayout.of(params[name], pstate.tp.rank, vocab_size)
        entry = {"range": (start, end)}
        for key in OPTIM_KEYS:
            flat = torch.zeros(end - start, dtype=torch.float32, device="cpu")
            for box in flat_range_boxes(lay.local_shape, start, end):
                for ekey, entry_box, local_box in lay.pieces(box):
                    at = flat_offset(lay.local_shape, local_box) - start
                    reader.read_into(f"optim/{key}/{ekey}", entry_box,
                                     flat[at:at + local_box.numel].view(local_box.sizes),
                                     f"optimizer {key} of {name}")
            entry[key] = flat
        new_state[name] = entry
    optimizer.load_param_state(new_state)


def full_tensor(reader: Reader, name: str, key: Optional[str] = None) -> torch.Tensor:
    """The whole (unpadded) tensor of a parameter, blocks joined: for single-process tools."""
    prefix = "model/" if key is None else f"optim/{key}/"
    if prefix + name in reader.entries:
        keys = [name]
    else:
        keys = sorted((k[len(prefix):] for k in reader.entries
                       if k.startswith(prefix + name + "#")), key=lambda k: int(k.split("#")[-1]))
        if not keys:
            raise ValueError(f"checkpoint {reader.ckpt_dir} has no parameter {name}")
    parts, dim = [], 0
    for k in keys:
        dim = reader.entries[prefix + k].get("block", [0, 1, 0])[2]
        shape = tuple(reader.entries[prefix + k]["shape"])
        out = torch.empty(shape, dtype=reader.dtype(prefix + k), device="cpu")
        reader.read_into(prefix + k, Box((0,) * len(shape), shape), out, f"{prefix}{k}")
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
