#!/usr/bin/env python3
"""Pipeline benchmark: measured bubble fraction of the 1F1B and interleaved schedules.

Each stage runs on its own forked gloo rank (tests/distributed.py) through
``slimtron.parallel.pipeline.forward_backward``. Compute is a fixed cost per (micro-batch, chunk):
a sleep of --forward-ms in the forward and --backward-ms in the backward, divided by v when the
stage holds v interleaved chunks so the work per stage stays the same. Sleeping ranks do not compete
for the CPU, so the measurement shows the schedule (and the p2p latency), not core contention.

Bubble of a run = mean over stages of 1 - (time in compute) / (makespan of all stages), the median
of --repeats runs. Printed next to the theory, (p-1)/(v*m + p-1), and to the schedule simulator's
figure for the same costs, with free communication and with the measured latency of one batched
p2p exchange (interleaving halves the compute between transfers, so latency weighs twice as much).

Usage: python bench/pipeline.py [--sizes 2,4] [--microbatches 2,4,8,16] [--forward-ms 10]
                                [--backward-ms 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.comm_bytes import p2p_bytes_section  # noqa: E402
from slimtron.parallel.p2p import Direction, StageLink  # noqa: E402
from slimtron.parallel.pipeline import forward_backward  # noqa: E402
from slimtron.parallel.pipeline_schedules import (  # noqa: E402
    build_schedule, expected_bubble_fraction, simulate)
from slimtron.parallel.state import ParallelState  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

SHAPE = (4, 2, 8)  # [s, b, h] of the activations passed between stages


class BusyClock:
    """Sums the time this rank spends in (simulated) compute."""

    def __init__(self):
        self.busy = 0.0

    def spend(self, seconds: float) -> None:
        start = time.monotonic()
        time.sleep(seconds)
        self.busy += time.monotonic() - start


class FixedCost(torch.autograd.Function):
    """Identity whose forward and backward each take a fixed time."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s, clock):
        ctx.backward_s, ctx.clock = backward_s, clock
        clock.spend(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.spend(ctx.backward_s)
        return grad, None, None, None


class Chunk(torch.nn.Module):
    def __init__(self, forward_s: float, backward_s: float, clock: BusyClock):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.forward_s, self.backward_s, self.clock = forward_s, backward_s, clock

    def forward(self, x):
        return FixedCost.apply(x * self.scale, self.forward_s, self.backward_s, self.clock)


@dataclass(frozen=True)
class Case:
    pp: int
    v: int
    m: int


def time_case(pstate, case: Case, forward_s: float, backward_s: float, repeats: int):
    """(start, end, busy) of this rank for each repeat of one case (after one untimed warm-up)."""
    clock = BusyClock()
    chunks = [Chunk(forward_s / case.v, backward_s / case.v, clock) for _ in range(case.v)]
    microbatches = [{"x": torch.ones(SHAPE)} for _ in range(case.m)]

    def forward_step(c, mb, input_tensor):
        out = chunks[c](mb["x"] if pstate.is_first_stage and c == 0 else input_tensor)
        return out.sum() / case.m if pstate.is_last_stage and c == case.v - 1 else out

    runs = []
    for repeat in range(repeats + 1):
        clock.busy = 0.0
        dist.barrier()
        start = time.monotonic()
        forward_backward(chunks, forward_step, microbatches, pstate, SHAPE, torch.float32)
        if repeat:
            runs.append((start, time.monotonic(), clock.busy))
    return runs


def exchange_latency(pstate, rounds: int = 50) -> float:
    """Seconds per batched p2p exchange (every stage sends to the next and receives from the
    previous at once, as in a pipeline step), the median of ``rounds``."""
    link = StageLink(pstate, SHAPE, torch.float32)
    activation = torch.ones(SHAPE)
    times = []
    for _ in range(rounds + 1):
        start = time.monotonic()
        link.exchange([(Direction.FORWARD, activation)], [Direction.FORWARD])
        times.append(time.monotonic() - start)
    return statistics.median(times[1:])


def bench_ranks(rank, world, cases, forward_s, backward_s, repeats):
    pstate = ParallelState.build(pp=world)
    timed = {case: time_case(pstate, case, forward_s, backward_s, repeats) for case in cases}
    dist.barrier()
    return timed, exchange_latency(pstate)


def measured_bubble(runs_per_rank) -> float:
    """Median over repeats of the stages' mean idle share of the common makespan."""
    bubbles = []
    for runs in zip(*runs_per_rank):
        makespan = max(end for _, end, _ in runs) - min(start for start, _, _ in runs)
        bubbles.append(sum(1 - busy / makespan for _, _, busy in runs) / len(runs))
    return statistics.median(bubbles)


def simulated_bubble(case: Case, forward_s: float, backward_s: float,
                     transfer_s: float = 0.0) -> float:
    schedules = [build_schedule(case.pp, s, case.m, case.v) for s in range(case.pp)]
    return simulate(schedules, case.v, forward_s / case.v, backward_s / case.v,
                    transfer_s).bubble_fraction()


def bubble_section(args) -> str:
    forward_s, backward_s = args.forward_ms / 1000, args.backward_ms / 1000
    lines = [f"Pipeline bubble (fixed cost per micro-batch: forward {args.forward_ms} ms, "
             f"backward {args.backward_ms} ms, split over v chunks; median of {args.repeats} runs)",
             f"{'p':>3} {'v':>3} {'m':>4} {'theory':>7} {'sim':>6} {'sim+lat':>8} {'measured':>9} "
             f"{'makespan s':>11}"]
    latencies = []
    for pp in args.sizes:
        cases = [Case(pp, v, m) for m in args.microbatches for v in (1, 2)
                 if v == 1 or m % pp == 0]
        per_rank = run_distributed(bench_ranks, pp, cases, forward_s, backward_s, args.repeats,
                                   timeout=1800)
        latency = statistics.median(lat for _, lat in per_rank)
        latencies.append(f"p={pp}: {latency * 1e3:.2f} ms")
        for case in cases:
            runs = [timed[case] for timed, _ in per_rank]
            makespan = statistics.median(max(e for _, e, _ in rs) - min(s for s, _, _ in rs)
                                         for rs in zip(*runs))
            lines.append(f"{case.pp:>3} {case.v:>3} {case.m:>4} "
                         f"{expected_bubble_fraction(case.pp, case.m, case.v):>7.3f} "
                         f"{simulated_bubble(case, forward_s, backward_s):>6.3f} "
                         f"{simulated_bubble(case, forward_s, backward_s, latency):>8.3f} "
                         f"{measured_bubble(runs):>9.3f} {makespan:>11.3f}")
    lines += ["theory = (p-1)/(v*m + p-1); sim = schedule simulator with free communication;",
              "sim+lat = simulator with the measured p2p latency per batch "
              f"({', '.join(latencies)});",
              "measured = forked gloo ranks through forward_backward"]
    return "\n".join(lines)


# Each section takes the parsed arguments and returns its printed table. p2p_bytes_section:
# bytes each stage sends per batch, analytic next to StageLink.bytes_sent and the wire.
SECTIONS = [bubble_section, p2p_bytes_section]


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=ints, default=[2, 4], help="pipeline sizes p")
    parser.add_argument("--microbatches", type=ints, default=[2, 4, 8, 16], help="values of m")
    parser.add_argument("--forward-ms", type=float, default=10.0)
    parser.add_argument("--backward-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if max(args.sizes) > 8:
        parser.error("--sizes: at most 8 ranks")
    return args


def main(argv=None):
    args = parse_args(argv)
    for section in SECTIONS:
        print(section(args))
        print()


if __name__ == "__main__":
    main()
