#!/usr/bin/env python
"""Describe a slimtron checkpoint: iteration, format, layout, model config and bytes per file;
with --verify, check that every shard is present, complete and readable.

    python tools/checkpoint/inspect_checkpoint.py CKPT_DIR [--iteration N] [--verify]

(Not named inspect.py: a script's folder comes first on sys.path, and a file called inspect.py
there would replace the standard library's ``inspect`` for every script in the folder.)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from slimtron.checkpointing import common as ckpt_common
from slimtron.checkpointing import dist_format, v1
from slimtron.checkpointing.layout import Box
from slimtron.cli import run_tool

READ_BLOCK = 16 << 20


def checkpoint_dir(root: str, iteration: Optional[int]) -> str:
    if iteration is None:
        iteration = ckpt_common.latest_iteration(root)
        if iteration is None:
            raise ValueError(f"{root}: no {ckpt_common.TRACKER}: not a checkpoint directory")
    path = ckpt_common.iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise ValueError(f"{root}: no iteration {iteration} ({path} does not exist)")
    return path


def describe(ckpt_dir: str, common: dict) -> list:
    """The report's lines."""
    version = common.get("format_version")
    name = {dist_format.FORMAT_VERSION: "torch_dist", v1.FORMAT_VERSION: "torch"}.get(version, "?")
    layout = common.get("layout", {})
    model = common["config"]["model"]
    lines = [f"checkpoint       {ckpt_dir}",
             f"iteration        {common['iteration']} "
             f"({common['consumed_samples']} samples consumed)",
             f"format           {version} (--ckpt-format {name})",
             "layout           " + " ".join(f"{k}={v}" for k, v in layout.items()),
             f"optimizer state  {'yes' if common.get('optimizer') is not None else 'no'}",
             "model            " + ", ".join(f"{k}={model[k]}"
                                            for k in ckpt_common.MODEL_SHAPE_FIELDS if k in model)]
    sizes = {f: os.path.getsize(os.path.join(ckpt_dir, f)) for f in sorted(os.listdir(ckpt_dir))}
    lines.append(f"files            {len(sizes)}, {sum(sizes.values()):,} bytes")
    lines += [f"  {size:>16,}  {f}" for f, size in sizes.items()]
    return lines


def verify(ckpt_dir: str, common: dict) -> list:
    """Problems found (empty when the checkpoint is whole). Raises nothing for a damaged file:
    each is one line."""
    problems = []
    world = common.get("layout", {}).get("world", 0) if ckpt_common.has_rng_states(common) else 0
    for rank in range(world):
        problems += _check_loadable(os.path.join(ckpt_dir, ckpt_common.rng_file(rank)))
    if common.get("format_version") == v1.FORMAT_VERSION:
        layout = common["layout"]
        for pp in range(layout["pp"]):
            for tp in range(layout["tp"]):
                problems += _check_loadable(os.path.join(ckpt_dir, v1.model_file(tp, pp)))
        return problems
    try:
        reader = dist_format.Reader(ckpt_dir)
        reader.check_files()
    except ValueError as e:
        return problems + [str(e)]
    problems += _check_coverage(reader)
    for name in reader.meta["files"]:
        problems += _read_through(os.path.join(ckpt_dir, name))
    return problems


def _check_loadable(path: str) -> list:
    try:
        ckpt_common.load_file(path)
    except ValueError as e:
        return [str(e)]
    return []


def _check_coverage(reader) -> list:
    """Every entry's chunks lie inside it, do not overlap, and cover all of it."""
    problems = []
    for key, entry in reader.entries.items():
        shape = tuple(entry["shape"])
        whole = Box((0,) * len(shape), shape)
        boxes = [Box(tuple(o), tuple(s)) for _, _, o, s in entry["chunks"]]
        if any(whole.intersect(b) != b for b in boxes):
            problems.append(f"{key}: a chunk lies outside its shape {shape}")
        overlap = any(a.intersect(b) is not None
                      for i, a in enumerate(boxes) for b in boxes[i + 1:])
        if overlap:
            problems.append(f"{key}: chunks overlap")
        covered = sum(b.numel for b in boxes)
        if covered != whole.numel and not overlap:
            problems.append(f"{key}: chunks cover {covered} of {whole.numel} elements")
    return problems


def _read_through(path: str) -> list:
    try:
        with open(path, "rb") as f:
            while f.read(READ_BLOCK):
                pass
    except OSError as e:
        return [f"{path}: unreadable: {e}"]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (the one holding the tracker)")
    p.add_argument("--iteration", type=int, default=None, help="default: the newest")
    p.add_argument("--verify", action="store_true",
                   help="check every shard is present, complete and readable")
    args = p.parse_args(argv)
    status = {"problems": []}

    def work():
        ckpt_dir = checkpoint_dir(args.checkpoint, args.iteration)
        common = ckpt_common.load_file(os.path.join(ckpt_dir, ckpt_common.COMMON_FILE))
        print("\n".join(describe(ckpt_dir, common)))
        if args.verify:
            status["problems"] = verify(ckpt_dir, common)
            for line in status["problems"]:
                print(f"inspect_checkpoint: error: {line}", file=sys.stderr)
            print(f"verify           {'FAILED' if status['problems'] else 'ok'}")

    code = run_tool("inspect_checkpoint", work)
    return code or (1 if status["problems"] else 0)


if __name__ == "__main__":
    sys.exit(main())
