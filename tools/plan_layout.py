#!/usr/bin/env python
"""Rank the parallel layouts of a model on a cluster: what fits, and what should be fastest.

    python tools/plan_layout.py --preset llama2-70b --gpus 512 --gpu h100-80gb \\
        --seq-length 4096 --global-batch-size 1024 [--json] [--top 10]

It enumerates (tp, pp, vpp, dp, micro-batch size, recompute, sequence parallel, distributed
optimizer), keeps the layouts whose most loaded pipeline stage fits (``slimtron.memory``, the
model behind the dry run and model_summary, plus an allocator margin), and ranks them by an
estimated step time:

* compute: the step's FLOPs (6N + 12Lhs per token, plus the forward again under full
  recomputation, the attention core under selective) over the GPUs' dense peak at
  ``--efficiency``;
* tensor-parallel collectives: per layer and micro-batch 2 all-reduces forward and 2 backward
  (ring: 2(t-1)/t of [s, b, h] each), or under sequence parallelism 2 all-gathers + 2
  reduce-scatters forward and 6 of them backward ((t-1)/t each; the inputs are gathered again),
  over NVLink, not overlapped; full recomputation repeats the forward's;
* data parallel: fp32 gradients all-reduced (2(d-1)/d x 4 bytes per parameter), or with the
  distributed optimizer reduce-scattered and the bf16 weights all-gathered ((d-1)/d x 6), over
  InfiniBand once the group leaves a node, not overlapped; pipeline sends over InfiniBand;
* the pipeline bubble: compute x (p-1)/(v m).

Device and network figures come from DEVICES / the flags; they are the vendors' figures, not
measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from slimtron import memory  # noqa: E402
from slimtron.arguments import build_parser, config_from_namespace, validate  # noqa: E402
from slimtron.cli import run_tool  # noqa: E402
from slimtron.config import Config, ConfigError  # noqa: E402
from slimtron.flops import attention_flops_per_token, flops_per_token, table_peak  # noqa: E402

GIB = 2 ** 30


@dataclass(frozen=True)
class Device:
    """Dense bf16 peak, memory, NVLink bandwidth per GPU and direction, and InfiniBand per GPU."""
    name: str
    peak_flops: float
    memory_bytes: float
    nvlink_bytes_per_s: float
    ib_bytes_per_s: float


DEVICES = {
    # NVLink: 18 links x 25 GB/s per direction (H100/H200), 12 x 25 (A100), 18 x 50 (B200).
    # InfiniBand: one 400 Gb/s NDR (H100/H200/B200) or 200 Gb/s HDR (A100) adapter per GPU.
    "h100-80gb": Device("H100 SXM 80GB", table_peak("H100", "bf16"), 80 * GIB, 450e9, 50e9),
    "h200-141gb": Device("H200 SXM 141GB", table_peak("H200", "bf16"), 141e9, 450e9, 50e9),
    "a100-80gb": Device("A100 SXM 80GB", table_peak("A100", "bf16"), 80 * GIB, 300e9, 25e9),
    "a100-40gb": Device("A100 SXM 40GB", table_peak("A100", "bf16"), 40 * GIB, 300e9, 25e9),
    "b200-192gb": Device("B200 192GB", 2250e12, 192e9, 900e9, 50e9),
}


@dataclass
class Layout:
    tp: int
    pp: int
    vpp: int
    dp: int
    micro_batch_size: int
    recompute: Optional[str]
    sequence_parallel: bool
    distributed_optimizer: bool
    peak_bytes: float = 0.0
    step_time_s: float = 0.0
    compute_s: float = 0.0
    bubble: float = 0.0
    comm_share: float = 0.0
    mfu: float = 0.0

    def as_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        parts = [f"tp{self.tp} pp{self.pp}" + (f" vpp{self.vpp}" if self.vpp > 1 else ""),
                 f"dp{self.dp}", f"mbs{self.micro_batch_size}"]
        parts += ["sp"] if self.sequence_parallel else []
        parts += ["dist-opt"] if self.distributed_optimizer else []
        parts += [f"recompute-{self.recompute}"] if self.recompute else []
        return " ".join(parts)


# ---- the layouts -------------------------------------------------------------------------------

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model, gpus: int, gpus_per_node: int, global_batch: int):
    """Every (tp, pp, vpp, dp, mbs, recompute, sp, dist-opt); TP stays inside a node."""
    for tp in divisors(gpus_per_node):
        for pp in divisors(model.num_layers):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for mbs in (1, 2, 4, 8):
                if global_batch % (mbs * dp):
                    continue
                m = global_batch // (mbs * dp)
                vpps = [1] + [v for v in divisors(model.num_layers // pp)[1:]
                              if pp > 1 and m % pp == 0]
                for vpp, recompute, sp, dist_opt in itertools.product(
                        vpps, (None, "selective", "full"), (False, True), (False, True)):
                    if (sp and tp == 1) or (dist_opt and dp == 1):
                        continue
                    yield Layout(tp, pp, vpp, dp, mbs, recompute, sp, dist_opt)


def layout_config(base: Config, layout: Layout) -> Config:
    config = dataclasses.replace(
        base,
        parallel=dataclasses.replace(
            base.parallel, tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp, data_parallel_size=layout.dp,
            num_layers_per_virtual_pipeline_stage=(base.model.num_layers // (layout.pp * layout.vpp)
                                                   if layout.vpp > 1 else None),
            sequence_parallel=layout.sequence_parallel,
            use_distributed_optimizer=layout.distributed_optimizer),
        training=dataclasses.replace(
            base.training, micro_batch_size=layout.micro_batch_size,
            recompute_granularity=layout.recompute,
            recompute_method="uniform" if layout.recompute == "full" else None,
            recompute_num_layers=1 if layout.recompute == "full" else None))
    return validate(config, layout.tp * layout.pp * layout.dp, check_files=False)


def peak_bytes(config: Config) -> float:
    """The most loaded stage: the first keeps the most micro-batches, the last the loss."""
    m = memory.num_microbatches(config)
    stages = {0, config.parallel.pp - 1}
    return max(memory.plan_stage(config, stage, m).peak for stage in stages)


# ---- the step time -----------------------------------------------------------------------------

def step_time(config: Config, layout: Layout, device: Device, gpus_per_node: int,
              efficiency: float) -> Layout:
    model, t = config.model, config.training
    s, e = model.seq_length, 2
    tokens = t.global_batch_size * s
    model_flops = flops_per_token(model, s) * tokens
    executed = model_flops
    if layout.recompute == "full":
        executed += model_flops / 3  # the forward once more
    elif layout.recompute == "selective":
        executed += attention_flops_per_token(model, s) * tokens / 3
    gpus = layout.tp * layout.pp * layout.dp
    compute = executed / (gpus * device.peak_flops * efficiency)
    m = memory.num_microbatches(config)
    bubble = (layout.pp - 1) / (layout.vpp * m)

    x = s * layout.micro_batch_size * model.hidden_size * e  # one [s, b, h] activation
    layers = model.num_layers // layout.pp
    tp_volume = 0.0
    if layout.tp > 1:
        ring = (layout.tp - 1) / layout.tp
        forward = 4 * ring * x  # SP: 2 all-gathers + 2 reduce-scatters; else 2 all-reduces
        backward = 6 * ring * x if layout.sequence_parallel else forward
        recomputed = forward if layout.recompute == "full" else 0.0
        tp_volume = (forward + backward + recomputed) * layers * m
    tp_time = tp_volume / device.nvlink_bytes_per_s

    params = memory.plan_stage(config, 0, m).parameters
    d = layout.dp
    dp_bytes = params * (d - 1) / d * (6 if layout.distributed_optimizer else 8)
    within_node = layout.tp * d <= gpus_per_node
    dp_bandwidth = device.nvlink_bytes_per_s if within_node else device.ib_bytes_per_s
    dp_time = dp_bytes / dp_bandwidth if d > 1 else 0.0
    pp_bytes = 2 * m * layout.vpp * x / (layout.tp if layout.sequence_parallel else 1)
    pp_time = pp_bytes / device.ib_bytes_per_s if layout.pp > 1 else 0.0

    busy = compute + tp_time
    total = busy * (1 + bubble) + dp_time + pp_time
    layout.step_time_s = total
    layout.compute_s = compute
    layout.bubble = bubble
    layout.comm_share = (tp_time + dp_time + pp_time) / total
    layout.mfu = model_flops / (gpus * device.peak_flops * total)
    return layout


# ---- planning ----------------------------------------------------------------------------------

def plan(base: Config, gpus: int, device: Device, *, gpus_per_node: int = 8,
         efficiency: float = 0.6, margin: float = 0.10, reserved_gib: float = 2.0):
    """(layouts that fit, fastest first; {(tp, pp): why no layout of that family fits})."""
    usable = device.memory_bytes * (1 - margin) - reserved_gib * GIB
    fits, rejected, best_peak = [], {}, {}
    for layout in candidates(base.model, gpus, gpus_per_node, base.training.global_batch_size):
        family = (layout.tp, layout.pp)
        try:
            config = layout_config(base, layout)
        except ConfigError as error:
            rejected.setdefault(family, str(error))
            continue
        layout.peak_bytes = peak_bytes(config)
        if layout.peak_bytes > usable:
            if layout.peak_bytes < best_peak.get(family, float("inf")):
                best_peak[family] = layout.peak_bytes
                rejected[family] = (f"needs at least {layout.peak_bytes / GIB:.1f} GiB "
                                    f"({layout.describe()}) > {usable / GIB:.1f} GiB usable")
            continue
        fits.append(step_time(config, layout, device, gpus_per_node, efficiency))
    fitting_families = {(l.tp, l.pp) for l in fits}
    rejected = {f: why for f, why in rejected.items() if f not in fitting_families}
    fits.sort(key=lambda l: l.step_time_s)
    return fits, rejected


def build_plan_parser() -> argparse.ArgumentParser:
    parser = build_parser(prog="plan_layout.py")
    parser.description = "Rank the parallel layouts of a model that fit on a cluster."
    group = parser.add_argument_group("cluster")
    group.add_argument("--gpus", type=int, required=True)
    group.add_argument("--gpu", choices=sorted(DEVICES), default="h100-80gb")
    group.add_argument("--gpus-per-node", type=int, default=8)
    group.add_argument("--efficiency", type=float, default=0.6,
                       help="fraction of the dense peak a GEMM-bound step reaches (default 0.6)")
    group.add_argument("--memory-gib", type=float, help="override the device memory")
    group.add_argument("--peak-tflops", type=float, help="override the dense bf16 peak")
    group.add_argument("--nvlink-gbps", type=float, help="override NVLink GB/s per direction")
    group.add_argument("--ib-gbps", type=float, help="override InfiniBand GB/s per GPU")
    group.add_argument("--allocator-margin", type=float, default=0.10,
                       help="fraction of memory kept for fragmentation and temporaries (0.10)")
    group.add_argument("--reserved-gib", type=float, default=2.0,
                       help="memory taken by the CUDA context and communicator buffers (2)")
    group.add_argument("--top", type=int, default=10)
    group.add_argument("--json", action="store_true", help="print the ranked list as JSON")
    return parser


def device_from(ns) -> Device:
    device = DEVICES[ns.gpu]
    overrides = {"memory_bytes": ns.memory_gib and ns.memory_gib * GIB,
                 "peak_flops": ns.peak_tflops and ns.peak_tflops * 1e12,
                 "nvlink_bytes_per_s": ns.nvlink_gbps and ns.nvlink_gbps * 1e9,
                 "ib_bytes_per_s": ns.ib_gbps and ns.ib_gbps * 1e9}
    return dataclasses.replace(device, **{k: v for k, v in overrides.items() if v})


def report(fits, rejected, device: Device, gpus: int, top: int) -> str:
    lines = [f"{gpus} x {device.name}: {device.peak_flops / 1e12:.0f} TFLOP/s dense bf16, "
             f"{device.memory_bytes / GIB:.0f} GiB, NVLink {device.nvlink_bytes_per_s / 1e9:.0f} "
             f"GB/s, IB {device.ib_bytes_per_s / 1e9:.0f} GB/s per GPU; {len(fits)} layouts fit",
             f"{'#':>3} {'layout':<50} {'peak GiB':>8} {'step s':>8} {'bubble':>7} "
             f"{'comm':>6} {'MFU':>6}"]
    for i, l in enumerate(fits[:top], 1):
        lines.append(f"{i:>3} {l.describe():<50} {l.peak_bytes / GIB:8.1f} {l.step_time_s:8.2f} "
                     f"{l.bubble:7.3f} {l.comm_share:6.1%} {l.mfu:6.1%}")
    if rejected:
        lines.append("rejected (tp, pp) families:")
        lines += [f"  tp{tp} pp{pp}: {why}" for (tp, pp), why in sorted(rejected.items())]
    return "\n".join(lines)


def main(argv=None) -> str:
    ns = build_plan_parser().parse_args(argv)
    base = config_from_namespace(ns)
    if not (base.optim.bf16 or base.optim.fp16):
        base.optim.bf16 = True  # the planner plans 16-bit training
    if base.training.global_batch_size is None:
        raise ConfigError("plan_layout.py needs --global-batch-size")
    if ns.gpus < 1 or ns.gpus % ns.gpus_per_node and ns.gpus > ns.gpus_per_node:
        raise ConfigError(f"--gpus {ns.gpus} is not a whole number of nodes of "
                          f"--gpus-per-node {ns.gpus_per_node}")
    device = device_from(ns)
    fits, rejected = plan(base, ns.gpus, device, gpus_per_node=min(ns.gpus_per_node, ns.gpus),
                          efficiency=ns.efficiency, margin=ns.allocator_margin,
                          reserved_gib=ns.reserved_gib)
    text = (json.dumps([l.as_json() for l in fits[:ns.top]]) if ns.json
            else report(fits, rejected, device, ns.gpus, ns.top))
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(run_tool("plan_layout.py", main))
