#!/usr/bin/env python3
"""metadata.json of a format-2 checkpoint (``--ckpt-format torch_dist``) at the scale users run:
its size, what rank 0 gathers and builds, and what every rank parses at load.

A format-2 save gathers every rank's ``dist_format.plan`` entries and chunk records into rank 0
(``dist.gather_object``), which joins them with ``dist_format.metadata`` and writes one JSON file;
every rank ``json.load``s it at load. This bench computes that file for a real model and layout
without memory or files: for EVERY rank of the layout it joins torch's fake process group as that
rank, builds what training builds there on the meta device (``dry_run.build_rank``: model chunks,
gradient buffers, the distributed optimizer) and runs the real ``dist_format.plan`` and
``chunk_records``; rank 0's part is the real ``dist_format.metadata`` and ``json.dumps``.

``plan`` is collective over dp x cp when an optimizer is given: ``_shares`` all-gathers every
rank's optimizer ranges (``{name: (start, end)}``), and under the fake process group a collective
returns no data. So the layout is built twice: the first pass records, for every rank, the ranges
object that rank hands to ``all_gather_object`` (and stops its plan there); the second pass runs
``plan`` again with ``all_gather_object`` answering, in axis order, the objects the first pass
recorded for the ranks of that rank's dp x cp group: exactly what the real collective returns.

Per layout it prints: ranks; entries and chunk records; metadata.json bytes (total and per rank);
the time rank 0 takes to unpickle the gathered objects, build the metadata and ``json.dumps`` it;
the time of ``json.loads`` (every rank, at load); the gather volume into rank 0 (pickled payloads;
``gather_object`` pads each to the largest, so the wire carries ranks x largest); next to ideals:
a compact binary encoding of the same records (per chunk: entry id, file id, byte offset, offsets
and sizes as int64; each entry name, shape and dtype once) and the JSON zlib-compressed; and the
checkpoint's total bytes for scale. Figures above 100 MB or 5 s to parse are flagged.

Usage: python bench/checkpoint_metadata.py [--layouts tp8.pp8.dp8,tp8.pp8.dp16,tp8.pp16.dp8]
           [-- pretrain_gpt.py flags (default: --preset llama2-70b, bf16,
           sequence parallel, distributed optimizer, micro-batch 1, global batch 1024)]
A layout is dot-separated sizes: tp, pp, cp and dp (dp is required; the others default to 1).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import pickle
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron.checkpointing import dist_format  # noqa: E402
from slimtron.checkpointing.common import layout_of  # noqa: E402
from slimtron.config import Config  # noqa: E402
from slimtron.dry_run import META, build_rank  # noqa: E402
from slimtron.training.setup import build_tokenizer_for  # noqa: E402

DEFAULT_FLAGS = ["--preset", "llama2-70b", "--bf16", "--sequence-parallel",
                 "--use-distributed-optimizer", "--micro-batch-size", "1",
                 "--global-batch-size", "1024"]
DEFAULT_LAYOUTS = "tp8.pp8.dp8,tp8.pp8.dp16,tp8.pp16.dp8"
MB = 1e6
TOO_BIG, TOO_SLOW = 100 * MB, 5.0


# ------------------------------------------------------------------------- one layout, every rank
class _Stop(Exception):
    """Raised by the first pass's stand-in collective once it has the rank's ranges."""


class _GatherStandIn:
    """Stands in for ``torch.distributed`` inside ``dist_format`` while a plan runs on the fake
    process group: ``all_gather_object`` either records this rank's object and stops the plan
    (``answer`` None), or fills the output with ``answer`` (the objects recorded for the group's
    ranks, in axis order; None for a rank whose plan never gathered, an error if asked for).
    Everything else is torch.distributed's own."""

    def __init__(self, group, answer=None):
        self.group, self.answer, self.recorded = group, answer, None

    def all_gather_object(self, out, obj, group=None):
        if group is not self.group:
            raise RuntimeError("plan gathered over a group other than dp x cp")
        if self.answer is None:
            self.recorded = copy.deepcopy(obj)
            raise _Stop
        if len(out) != len(self.answer) or any(o is None for o in self.answer):
            raise RuntimeError(f"plan gathered {len(out)} objects; the first pass recorded "
                               f"{sum(o is not None for o in self.answer)} for this group")
        out[:] = copy.deepcopy(self.answer)

    def __getattr__(self, name):
        return getattr(dist, name)


@contextlib.contextmanager
def _collectives_of_dist_format(stand_in):
    real = dist_format.dist
    dist_format.dist = stand_in
    try:
        yield stand_in
    finally:
        dist_format.dist = real


@contextlib.contextmanager
def fake_rank(rank: int, world: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def layout_config(flags: list, layout: dict) -> tuple:
    """(Config, world size) for pretrain_gpt.py ``flags`` under ``layout`` ({"tp", "pp", "cp",
    "dp"}), validated as the dry run does."""
    from slimtron.arguments import parse_args, validate
    world = layout["tp"] * layout["pp"] * layout["cp"] * layout["dp"]
    config = parse_args(list(flags) + [
        "--tensor-model-parallel-size", str(layout["tp"]),
        "--pipeline-model-parallel-size", str(layout["pp"]),
        "--context-parallel-size", str(layout["cp"])])
    build_tokenizer_for(config)
    validate(config, world, check_files=False)
    return config, world


def _plan_rank(config: Config, rank: int, world: int, answer_for=None):
    """(engine's pstate, entries, chunks) of ``rank``, or (pstate, recorded ranges object, None)
    in the first pass (``answer_for`` None) when the plan gathers."""
    with fake_rank(rank, world):
        engine = build_rank(config, META)
        pstate, axis = engine.pstate, engine.pstate.dp_cp
        answer = answer_for(pstate) if answer_for is not None else None
        stand_in = _GatherStandIn(axis.group, answer)
        with _collectives_of_dist_format(stand_in):
            try:
                entries, chunks = dist_format.plan(engine.model_chunks, engine.optimizer, pstate,
                                                   config.model.vocab_size)
            except _Stop:
                return pstate, stand_in.recorded, None
        return pstate, entries, chunks


def gathered_payloads(config: Config, world: int, progress=None) -> tuple:
    """(every rank's pickled (entries, records), as rank 0 receives them through
    ``gather_object``; the layout dict of common.pt). Builds every rank twice (see the module
    doc)."""
    # Pass 1: what each rank hands to all_gather_object in _shares (None: no gather on it).
    recorded, axis_ranks = {}, {}
    for rank in range(world):
        pstate, obj, chunks = _plan_rank(config, rank, world)
        recorded[rank] = obj if chunks is None else None
        axis_ranks[rank] = list(pstate.dp_cp.ranks)
        if progress:
            progress(rank, world, 1)

    def answer_for(pstate):
        return [recorded[r] for r in axis_ranks[pstate.rank]]

    # Pass 2: the real plan with the real gathered ranges.
    payloads, common_layout = [], None
    for rank in range(world):
        pstate, entries, chunks = _plan_rank(config, rank, world, answer_for)
        if chunks is None:
            raise RuntimeError(f"rank {rank}: plan stopped in the second pass")
        records = dist_format.chunk_records(chunks)
        payloads.append(pickle.dumps((entries, records)))
        if rank == 0:
            common_layout = layout_of(pstate)
        if progress:
            progress(rank, world, 2)
    return payloads, common_layout


def metadata_from_payloads(payloads: list, common_layout: dict) -> dict:
    """Rank 0's work after the gather: unpickle each rank's object, join them."""
    gathered = [pickle.loads(p) for p in payloads]
    return dist_format.metadata([e for e, _ in gathered], [r for _, r in gathered], common_layout)


def layout_metadata(config: Config, world: int) -> dict:
    """The metadata.json (as a dict) a format-2 save of ``config`` on ``world`` ranks writes."""
    payloads, common_layout = gathered_payloads(config, world)
    return metadata_from_payloads(payloads, common_layout)


# ---------------------------------------------------------------------------------- figures
def compact_bytes(meta: dict) -> int:
    """Bytes of the same information in a plain binary encoding: each entry once (name, dtype
    byte, ndim byte, shape and block as int64), each chunk as int32 entry id, int32 file id,
    int64 byte offset, int64 offsets and sizes; each file name and size once."""
    total = 0
    for key, entry in meta["entries"].items():
        total += len(key.encode()) + 1 + 2 + 8 * len(entry["shape"]) + (24 if "block" in entry else 0)
        for _file, _at, offsets, sizes in entry["chunks"]:
            total += 4 + 4 + 8 + 8 * (len(offsets) + len(sizes))
    total += sum(len(name) + 8 for name in meta["files"])
    return total


def measure(config: Config, world: int, label: str) -> dict:
    started = time.perf_counter()
    last = [started]

    def progress(rank, n, pass_no):
        now = time.perf_counter()
        if now - last[0] > 30:
            print(f"  {label}: pass {pass_no}, rank {rank + 1}/{n}", flush=True)
            last[0] = now

    payloads, common_layout = gathered_payloads(config, world, progress)
    built_all = time.perf_counter() - started
    sizes = [len(p) for p in payloads]

    gc.collect()
    unpickle_s, gathered = best_of(lambda: [pickle.loads(p) for p in payloads])
    del payloads
    metadata_s, meta = best_of(lambda: dist_format.metadata(
        [e for e, _ in gathered], [r for _, r in gathered], common_layout))
    del gathered
    dumps_s, text = best_of(lambda: json.dumps(meta))
    raw = text.encode()
    entries = meta["entries"]
    row = {
        "label": label, "ranks": world,
        "entries": len(entries),
        "chunks": sum(len(e["chunks"]) for e in entries.values()),
        "json_bytes": len(raw),
        "compact_bytes": compact_bytes(meta), "zlib_bytes": len(zlib.compress(raw, 1)),
        "gather_bytes": sum(sizes), "gather_wire_bytes": world * max(sizes),
        "gather_max": max(sizes),
        "unpickle_s": unpickle_s, "metadata_s": metadata_s, "dumps_s": dumps_s,
        "checkpoint_bytes": sum(meta["files"].values()),
        "planning_s": built_all,
    }
    del meta, entries, raw
    row.update(load_figures(text))
    return row


_LOAD_SCRIPT = """
import json, sys, time, tracemalloc
text = open(sys.argv[1]).read()
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter()
    parsed = json.loads(text)
    best = min(best, time.perf_counter() - t0)
    del parsed
tracemalloc.start()
parsed = json.loads(text)
print(json.dumps({"loads_s": best, "parsed_bytes": tracemalloc.get_traced_memory()[0]}))
"""


def load_figures(text: str) -> dict:
    """``json.loads`` as a loading rank runs it, in a fresh interpreter (the bench's own heap
    would make the garbage collector's passes dominate): the best of 3 wall times, and the bytes
    of the Python objects it makes (tracemalloc), held by every rank while it loads."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(text)
        f.flush()
        out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, f.name], check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out)


def best_of(fn, repeats: int = 3) -> tuple:
    """(least wall time of ``repeats`` calls, the last result): the machine may be shared."""
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def report(rows: list, model_text: str) -> str:
    lines = [f"metadata.json of a format-2 checkpoint: {model_text}",
             "every rank built on the meta device and planned by dist_format.plan; rank 0's "
             "metadata() and json.dumps as in save_checkpoint",
             f"{'layout':<18}{'ranks':>6}{'entries':>8}{'chunks':>9}{'json MB':>9}{'/rank kB':>9}"
             f"{'compact MB':>11}{'zlib MB':>8}{'gather MB':>10}{'wire MB':>8}"
             f"{'build s':>8}{'loads s':>8}{'parsed MB':>10}{'ckpt GB':>9}"]
    for r in rows:
        build = r["unpickle_s"] + r["metadata_s"] + r["dumps_s"]
        lines.append(
            f"{r['label']:<18}{r['ranks']:>6}{r['entries']:>8}{r['chunks']:>9}"
            f"{r['json_bytes'] / MB:>9.1f}{r['json_bytes'] / r['ranks'] / 1e3:>9.1f}"
            f"{r['compact_bytes'] / MB:>11.1f}{r['zlib_bytes'] / MB:>8.1f}"
            f"{r['gather_bytes'] / MB:>10.1f}{r['gather_wire_bytes'] / MB:>8.1f}"
            f"{build:>8.2f}{r['loads_s']:>8.2f}{r['parsed_bytes'] / MB:>10.1f}"
            f"{r['checkpoint_bytes'] / 1e9:>9.1f}")
    lines.append("build s: rank 0 unpickles the gathered objects, runs metadata() and json.dumps "
                 "(best of 3); loads s: json.loads, which every rank runs at load (fresh interpreter, "
                 "best of 3); "
                 "parsed MB: the Python objects it makes (tracemalloc), held by every rank while "
                 "it loads")
    lines.append("compact: the same records in a plain binary encoding (ideal); zlib: the JSON at "
                 "level 1; gather: pickled payloads summed; wire: ranks x the largest payload "
                 "(gather_object pads every payload to the largest)")
    for r in rows:
        flags = []
        if r["json_bytes"] > TOO_BIG:
            flags.append(f"metadata.json {r['json_bytes'] / MB:.0f} MB > {TOO_BIG / MB:.0f} MB")
        if r["loads_s"] > TOO_SLOW:
            flags.append(f"json.loads {r['loads_s']:.1f} s > {TOO_SLOW:.0f} s")
        per_rank = r["json_bytes"] / r["ranks"]
        lines.append(f"{r['label']}: " + ("; ".join(flags) if flags else
                                          f"within {TOO_BIG / MB:.0f} MB and {TOO_SLOW:.0f} s "
                                          f"to parse") +
                     f" (json {r['json_bytes'] / r['compact_bytes']:.1f}x the compact encoding, "
                     f"{r['json_bytes'] / r['checkpoint_bytes'] * 1e6:.0f} ppm of the "
                     f"checkpoint; {TOO_BIG / MB:.0f} MB at ~{TOO_BIG / per_rank:,.0f} ranks of "
                     f"this tp x pp; planning every rank twice took {r['planning_s']:.0f} s)")
        if flags:
            lines.append("  fix: chunk records that follow from the saving layout (each rank's "
                         "weight share and optimizer ranges) need not be listed: store the layout "
                         "and bucket plan once, or one small index per rank read only by the "
                         "ranks that overlap it, and gather tuples, not dicts")
    return "\n".join(lines)


_LAYOUT = re.compile(r"(tp|pp|cp|dp)(\d+)")


def parse_layout(text: str) -> dict:
    layout = {"tp": 1, "pp": 1, "cp": 1}
    for part in text.split("."):
        m = _LAYOUT.fullmatch(part)
        if m is None:
            raise SystemExit(f"--layouts: {part!r} is not tpN, ppN, cpN or dpN")
        layout[m.group(1)] = int(m.group(2))
    if "dp" not in layout:
        raise SystemExit(f"--layouts: {text!r} names no dpN")
    return layout


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = DEFAULT_FLAGS
    if "--" in argv:
        at = argv.index("--")
        argv, flags = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    model_text = " ".join(flags)
    for text in args.layouts.split(","):
        layout = parse_layout(text)
        config, world = layout_config(flags, layout)
        row = measure(config, world, text)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(report(rows, model_text))


if __name__ == "__main__":
    main()
