#!/usr/bin/env python3
"""Checkpoint cost per rank, each figure next to its ideal: host memory a save adds, bytes
written, bytes read by a load into another layout, and how long a save blocks training.

Setup: a Llama-style model (bf16 weights, distributed optimizer, one optimizer step so that the
Adam moments exist) on ``--dp`` forked gloo ranks (tests/distributed.py), saved synchronously and
with ``AsyncSaver`` (--async-save); then loaded by ``--load-tp`` x ``--dp / --load-tp`` ranks.

Measurements, per rank, from /proc/self:
- added RSS: VmHWM during the save (reset first through /proc/self/clear_refs) minus VmRSS before.
  Ideal: 0 for a synchronous save on CPU (the state is already in host memory; a GPU rank adds the
  64 MiB staging buffer), the rank's own share for an async save (its host copy).
- written: growth of ``wchar`` (every write system call of the process: files, plus the few KiB of
  metadata gloo sends). Ideal: the rank's share of the checkpoint; summed: the checkpoint's size.
- read on the reshard load: growth of ``rchar``. Ideal: what the rank needs: its weights, its range
  of the optimizer state (both without vocabulary padding), metadata.json and common.pt.
- blocking time: wall time of the save call (the async one returns once staged).
- versus torch.distributed.checkpoint (``--versus-dcp-size``): the same reshard read on one
  tensor. DCP reads every saved chunk that overlaps the target whole (``torch.load`` of the item,
  then ``narrow``), so a column slice of row-block chunks costs all of them; this format reads the
  overlapping row segments only.
Targets (issue 9): added RSS <= own share + 256 MiB; bytes written summed <= 1.05 x checkpoint
size; bytes read <= 1.5 x needed; async blocking <= 25% of the synchronous save.

Usage: python bench/checkpoint.py [--hidden 2048 --layers 16 --ffn 5632 --heads 16
                                   --vocab 32000] [--dp 4] [--load-tp 2] [--dir /tmp/ckpt_bench]
(the defaults are about 1B parameters. Host memory per rank is about 2 (bf16 weights) + 2 (bf16
gradient buffer) + 12/dp (optimizer range) bytes per parameter, plus the own share again while an
async save is staged: 1B at dp=4 needs about 40 GiB in all. The figures are ratios, so a smaller
model shows them too: the README's table is --hidden 1024 --layers 16 --ffn 2816, 0.27B.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron import checkpointing  # noqa: E402
from slimtron.checkpointing import dist_format  # noqa: E402
from slimtron.checkpointing.common import OPTIM_KEYS, named_params  # noqa: E402
from slimtron.checkpointing.layout import ParamLayout, flat_range_boxes  # noqa: E402
from slimtron.config import Config, ModelConfig, OptimizerConfig, ParallelConfig  # noqa: E402
from slimtron.model import build_model_chunks  # noqa: E402
from slimtron.optim import build_optimizer  # noqa: E402
from slimtron.parallel.data_parallel import DataParallelGrads  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

MiB = 1 << 20


def proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def proc_io(field: str) -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_config(args, tp: int) -> Config:
    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                        num_attention_heads=args.heads, seq_length=256, vocab_size=args.vocab,
                        normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                        add_bias_linear=False, untie_embeddings_and_output_weights=True,
                        hidden_dropout=0.0, attention_dropout=0.0)
    return Config(model=model,
                  parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                          use_distributed_optimizer=True),
                  optim=OptimizerConfig(bf16=True, lr=1e-4, lr_warmup_iters=0))


def build(args, tp: int):
    config = make_config(args, tp)
    pstate = ParallelState.build(tp=tp)
    chunks = build_model_chunks(config.model, pstate, params_dtype=torch.bfloat16,
                                device=torch.device("cpu"))
    # bf16 gradient buffers: the bench needs the optimizer state, not fp32 gradients.
    grads = DataParallelGrads(chunks, pstate, use_distributed_optimizer=True,
                              grad_dtype=torch.bfloat16)
    optimizer = build_optimizer(chunks, config.optim, config.parallel, pstate, grads,
                                train_iters=10)
    optimizer.step()  # creates the Adam moments
    return config, pstate, chunks, optimizer


def _save_rank(rank, world, args):
    config, pstate, chunks, optimizer = build(args, 1)
    _, own = dist_format.plan(chunks, optimizer, pstate, config.model.vocab_size)
    own_bytes = sum(c.box.numel * c.data.element_size() for c in own)
    del own
    out = {"own": own_bytes}
    for mode in ("sync", "async"):
        root = os.path.join(args.dir, mode)
        saver = checkpointing.AsyncSaver() if mode == "async" else None
        # Memory and bytes from the first save (a later one reuses the heap the first freed),
        # time from the second (the first also makes the async saver's process group).
        for iteration in (1, 2):
            torch.distributed.barrier()
            reset_peak()
            rss, written = proc_status("VmRSS"), proc_io("wchar")
            start = time.perf_counter()
            if saver is None:
                checkpointing.save_checkpoint(root, iteration, chunks, optimizer, pstate, config, 0)
            else:
                saver.save(root, iteration, chunks, optimizer, pstate, config, 0)
            blocked = time.perf_counter() - start
            if saver is not None:
                saver.wait()
            total = time.perf_counter() - start
            if iteration == 1:
                out[mode] = {"added_rss": proc_status("VmHWM") - rss,
                             "written": proc_io("wchar") - written}
            out[mode].update(blocked=blocked, total=total)
    return out


def needed_bytes(chunks, optimizer, pstate, vocab: int) -> int:
    """Tensor bytes this rank must read: its weights and optimizer range, padding excluded."""
    total = 0
    params = named_params(chunks)
    for p in params.values():
        lay = ParamLayout.of(p, pstate.tp.rank, vocab)
        whole = flat_range_boxes(lay.local_shape, 0, p.numel())
        total += sum(b.numel for box in whole for _, b, _ in lay.pieces(box)) * p.element_size()
    for name, (start, end) in optimizer.param_ranges().items():
        lay = ParamLayout.of(params[name], pstate.tp.rank, vocab)
        boxes = flat_range_boxes(lay.local_shape, start, end)
        total += sum(b.numel for box in boxes for _, b, _ in lay.pieces(box)) * 4 * len(OPTIM_KEYS)
    return total


def _load_rank(rank, world, args):
    config, pstate, chunks, optimizer = build(args, args.load_tp)
    root = os.path.join(args.dir, "sync")
    ckpt_dir = checkpointing.iteration_dir(root, 2)
    small = sum(os.path.getsize(os.path.join(ckpt_dir, f))
                for f in (dist_format.METADATA_FILE, "common.pt"))
    need = needed_bytes(chunks, optimizer, pstate, config.model.vocab_size) + small
    torch.distributed.barrier()
    read = proc_io("rchar")
    checkpointing.load_checkpoint(root, chunks, optimizer, pstate, config)
    return {"read": proc_io("rchar") - read, "need": need}


def _versus_dcp_rank(rank, world, args):
    """One [n, n] fp32 tensor saved as row blocks by the 4 ranks (as dp=4 ranges of a tp=1
    weight), read back as column halves on a (dp 2, tp 2) grid (a row-parallel weight at tp=2):
    bytes read by torch.distributed.checkpoint and by this format's reader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from slimtron.checkpointing.layout import Box

    n = args.versus_dcp_size
    full = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    rows = n // world
    mine = full[rank * rows:(rank + 1) * rows].contiguous()
    dcp_dir, own_dir = os.path.join(args.dir, "dcp"), os.path.join(args.dir, "own")
    mesh = init_device_mesh("cpu", (world,))
    dcp.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, checkpoint_id=dcp_dir)
    if rank == 0:
        os.makedirs(own_dir, exist_ok=True)
    torch.distributed.barrier()
    chunk = dist_format.Chunk("w", Box((rank * rows, 0), (rows, n)), mine)
    dist_format.write_chunks(os.path.join(own_dir, dist_format.shard_file(rank)), [chunk])
    records = [None] * world
    torch.distributed.all_gather_object(records, dist_format.chunk_records([chunk]))
    if rank == 0:
        meta = dist_format.metadata([{"w": ([n, n], "float32", None)}] * world,
                                    records, {})
        dist_format.write_metadata(os.path.join(own_dir, dist_format.METADATA_FILE), meta)
    torch.distributed.barrier()

    grid = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    target = distribute_tensor(torch.zeros(n, n), grid, [Replicate(), Shard(1)])
    before = proc_io("rchar")
    dcp.load({"w": target}, checkpoint_id=dcp_dir)
    dcp_read = proc_io("rchar") - before
    half = n // 2
    col = grid.get_local_rank("tp") * half
    out = torch.zeros(n, half)
    before = proc_io("rchar")
    reader = dist_format.Reader(own_dir)
    reader.read_into("w", Box((0, col), (n, half)), out, "w")
    own_read = proc_io("rchar") - before
    assert torch.equal(out, full[:, col:col + half])
    assert torch.equal(target.to_local(), out)
    return {"need": out.numel() * 4, "dcp": dcp_read, "own": own_read}


def checkpoint_size(root: str) -> int:
    d = checkpointing.iteration_dir(root, 2)
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dp", type=int, default=4)
    p.add_argument("--load-tp", type=int, default=2)
    p.add_argument("--dir", default="/tmp/slimtron_ckpt_bench")
    p.add_argument("--versus-dcp-size", type=int, default=4096,
                   help="n of the [n, n] tensor of the DCP comparison (0: skip it)")
    args = p.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    n = sum(p.numel() for p in named_params(build_model_chunks(
        make_config(args, 1).model, ParallelState.single(), device=torch.device("meta"))).values())
    print(f"model: {n / 1e9:.3f} B parameters, bf16, distributed optimizer; save at dp={args.dp}, "
          f"load at tp={args.load_tp} x dp={args.dp // args.load_tp}")
    saves = run_distributed(_save_rank, args.dp, args, timeout=3600)
    size = checkpoint_size(os.path.join(args.dir, "sync"))
    print(f"checkpoint size {size / MiB:,.1f} MiB\n")
    print(f"{'rank':>4} {'own share':>10} | {'added RSS sync':>14} {'async':>8} {'ideal':>8} | "
          f"{'written sync':>12} {'async':>8} {'ideal':>8} | {'blocked sync':>12} {'async':>8}")
    for rank, r in enumerate(saves):
        s, a = r["sync"], r["async"]
        print(f"{rank:>4} {r['own'] / MiB:>9.0f}M | {s['added_rss'] / MiB:>13.0f}M "
              f"{a['added_rss'] / MiB:>7.0f}M {r['own'] / MiB:>7.0f}M | "
              f"{s['written'] / MiB:>11.0f}M {a['written'] / MiB:>7.0f}M {r['own'] / MiB:>7.0f}M | "
              f"{s['blocked']:>11.2f}s {a['blocked']:>7.2f}s")
    written = sum(r["sync"]["written"] for r in saves)
    worst_rss = max(max(r["sync"]["added_rss"], r["async"]["added_rss"]) - r["own"] for r in saves)
    sync_t = max(r["sync"]["blocked"] for r in saves)
    async_t = max(r["async"]["blocked"] for r in saves)
    print(f"\nwritten, all ranks: {written / size:.3f} x checkpoint size (target <= 1.05)")
    print(f"added RSS, worst rank: own share + {worst_rss / MiB:.0f} MiB (target <= + 256 MiB)")
    print(f"save blocks training: sync {sync_t:.2f} s, async {async_t:.2f} s = "
          f"{async_t / sync_t:.0%} of sync (target <= 25%); async total "
          f"{max(r['async']['total'] for r in saves):.2f} s")
    loads = run_distributed(_load_rank, args.dp, args, timeout=3600)
    print(f"\nreshard load (tp={args.load_tp}): per rank read / needed")
    for rank, r in enumerate(loads):
        print(f"{rank:>4} read {r['read'] / MiB:>8.1f} MiB  needed {r['need'] / MiB:>8.1f} MiB  "
              f"= {r['read'] / r['need']:.3f} x (target <= 1.5)")
    if args.versus_dcp_size:
        shutil.rmtree(args.dir, ignore_errors=True)
        n = args.versus_dcp_size
        print(f"\nversus torch.distributed.checkpoint: a [{n}, {n}] fp32 weight saved as "
              f"{args.dp} row blocks, read as column halves (tp=2): bytes read per rank")
        for rank, r in enumerate(run_distributed(_versus_dcp_rank, args.dp, args, timeout=3600)):
            print(f"{rank:>4} needed {r['need'] / MiB:>7.1f} MiB  DCP {r['dcp'] / MiB:>7.1f} MiB "
                  f"= {r['dcp'] / r['need']:.2f} x   ours {r['own'] / MiB:>7.1f} MiB = "
                  f"{r['own'] / r['need']:.2f} x")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
