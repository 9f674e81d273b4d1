#!/usr/bin/env python3
"""Bytes each rank sends in one training step, measured on the wire, next to the analytic count.

Measurement: the growth of ``wchar`` in ``/proc/self/io`` over one training step (after a warm-up
step) on each forked gloo rank (tests/distributed.py). gloo's TCP transport writes its sockets with
write-family system calls, which ``wchar`` counts for every thread of the process, and nothing else
writes during a step, so the figure is payload plus gloo's message headers. A calibration table
first runs each collective once on a 1 MiB tensor and shows the bytes per rank as a multiple of
its size: that the method sees gloo's sends, and which algorithm gloo uses.

Analytic count (Korthikanti et al. 2022 / Megatron), per rank, with s, b, h the sequence,
micro-batch and hidden size, A = s*b*h*bytes, m micro-batches, L/p layers on the stage, and ring
algorithms (an all-reduce sends 2(n-1)/n of the tensor, an all-gather or reduce-scatter (n-1)/n of
the full tensor, a p2p send the tensor):
- TP without SP: 4 all-reduces of A per layer and micro-batch (2 forward, 2 backward), plus the
  embedding's forward all-reduce (first stage) and the output layer's backward all-reduce of its
  input grad (last stage); 3 all-reduces of s*b fp32 in the vocab-parallel cross entropy.
- TP with SP: 4 all-gathers + 4 reduce-scatters of A per layer and micro-batch (the same bytes as
  the 4 all-reduces), a reduce-scatter forward + all-gather backward at the embedding and an
  all-gather forward + reduce-scatter backward at the output layer; once per step, the all-reduce
  of the norm weights' grads over TP.
- PP: A (A/t under SP) per micro-batch forward to the next stage and backward to the previous one.
- DP: all-reduce of the fp32 gradient buffer (local parameters x 4 bytes); with the distributed
  optimizer a reduce-scatter of it plus an all-gather of the parameter buffer.
- small: the overflow-flag all-reduce over the world, the grad-norm all-reduce over the model-
  parallel group (and DP with the distributed optimizer), the loss all-reduce over DP and the loss
  broadcast from the last pipeline stage.
The "gloo model" column is the same count with the reduce-scatter factor of an all-reduce of the
full tensor, 2(n-1)/n, which is what the calibration measures for gloo's reduce-scatter.

``p2p_bytes_section`` (a section of bench/pipeline.py) checks StageLink's byte counts and the wire
against the analytic p2p count for 1F1B and interleaved schedules.

Usage: python bench/comm_bytes.py [--layouts tp2,tp2-sp,pp2,dp2,dp2-distopt,tp4] [--layers 4]
                                  [--hidden 256] [--seq 128] [--micro-batch 2] [--microbatches 4]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimtron.config import (Config, DataConfig, ModelConfig, OptimizerConfig,  # noqa: E402
                             ParallelConfig, TrainingConfig)
from slimtron.parallel.comm import all_gather_single, reduce_scatter_single  # noqa: E402
from slimtron.parallel.p2p import StageLink  # noqa: E402
from slimtron.parallel.pipeline import forward_backward  # noqa: E402
from slimtron.parallel.state import ParallelState  # noqa: E402
from slimtron.training import DTYPES, setup, train  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

MB = 1e6
CALIBRATION_NUMEL = 1 << 18  # 1 MiB of fp32


def bytes_written() -> int:
    """Bytes this process (all its threads) has written by write-family calls, sockets included."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line: wire bytes need Linux I/O accounting")


# ------------------------------------------------------------------------------ wire factors
def wire_factor(op: str, n: int, gloo: bool = False) -> float:
    """Bytes one rank of an n-rank group sends per byte of the (full) tensor."""
    if n == 1:
        return 0.0
    if op == "all_reduce" or (op == "reduce_scatter" and gloo):
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    if op == "p2p":
        return 1.0
    if op == "broadcast_root":  # the root sends the tensor to each other rank (at most)
        return n - 1
    raise ValueError(f"wire_factor: unknown collective {op!r}")


# -------------------------------------------------------------------------------- calibration
def _calibration_ops(x: torch.Tensor, world: int, rank: int) -> dict:
    peer = (rank + 1) % world

    def exchange():
        ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, torch.empty_like(x),
                                                            (rank - 1) % world)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    return {
        "all_reduce": lambda: dist.all_reduce(x),
        "all_gather": lambda: all_gather_single(torch.empty_like(x), x[:x.numel() // world]),
        "reduce_scatter": lambda: reduce_scatter_single(torch.empty(x.numel() // world), x),
        "p2p": exchange,
    }


def calibrate_rank(rank, world, numel):
    """Bytes this rank writes for each collective on a ``numel`` fp32 tensor (after a warm-up)."""
    x = torch.ones(numel)
    sent = {}
    for name, run in _calibration_ops(x, world, rank).items():
        run()
        dist.barrier()
        before = bytes_written()
        run()
        sent[name] = bytes_written() - before
        dist.barrier()
    return sent


def calibration_section(sizes) -> str:
    size = CALIBRATION_NUMEL * 4
    lines = [f"Calibration: bytes written per rank (wchar of /proc/self/io) for one gloo call on a "
             f"{size / 2**20:.0f} MiB fp32 tensor, as a multiple of its size",
             f"{'collective':<15} {'n':>2} {'model':>10} {'measured':>9} "
             f"{'measured - model B':>19} {'matches':>22}"]
    for n in sizes:
        sent = run_distributed(calibrate_rank, n, CALIBRATION_NUMEL)
        for op in sent[0]:
            measured = max(s[op] for s in sent)
            ideal = wire_factor(op, n) * size
            lines.append(f"{op:<15} {n:>2} {ideal / size:>10.3f} {measured / size:>9.3f} "
                         f"{measured - ideal:>19.0f} {closest_model(op, n, measured / size):>22}")
    lines.append("model: ring for collectives, the tensor for p2p; matches: the algorithm whose "
                 "bytes per rank are within 1% of the measurement")
    return "\n".join(lines)


def closest_model(op: str, n: int, measured_factor: float) -> str:
    models = {"model": wire_factor(op, n),
              "all-reduce of full": wire_factor("all_reduce", n)}
    for name, factor in models.items():
        if abs(measured_factor / factor - 1) < 0.01:
            return name
    return "neither"


# ----------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: bool = False
    dist_opt: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


LAYOUTS = {layout.name: layout for layout in (
    Layout("tp2", tp=2), Layout("tp2-sp", tp=2, sp=True), Layout("pp2", pp=2),
    Layout("dp2", dp=2), Layout("dp2-distopt", dp=2, dist_opt=True),
    Layout("tp4", tp=4), Layout("tp4-sp", tp=4, sp=True),
    Layout("tp2-sp-pp2-dp2-distopt", tp=2, pp=2, dp=2, sp=True, dist_opt=True))}
DEFAULT_LAYOUTS = ["tp2", "tp2-sp", "pp2", "dp2", "dp2-distopt", "tp4"]


def bench_config(layout: Layout, layers: int, hidden: int, seq: int, micro_batch: int,
                 microbatches: int, vocab: int = 1000) -> Config:
    """A Llama-ish fp32 model (RMSNorm, RoPE, SwiGLU, GQA, untied output, no dropout, no biases)
    trained for two steps on mock data: a warm-up step and the measured one."""
    ffn = hidden * 8 // 3 // 16 * 16  # Llama's 8h/3, rounded to a multiple of 16
    model = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                        num_attention_heads=8, num_query_groups=4, seq_length=seq,
                        vocab_size=vocab, normalization="RMSNorm", position_embedding_type="rope",
                        swiglu=True, add_bias_linear=False,
                        untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                        attention_dropout=0.0)
    return Config(
        model=model,
        parallel=ParallelConfig(tensor_model_parallel_size=layout.tp,
                                pipeline_model_parallel_size=layout.pp,
                                data_parallel_size=layout.dp, sequence_parallel=layout.sp,
                                use_distributed_optimizer=layout.dist_opt),
        optim=OptimizerConfig(lr=1e-4, lr_decay_style="constant"),
        data=DataConfig(mock_data=True),
        training=TrainingConfig(micro_batch_size=micro_batch,
                                global_batch_size=micro_batch * layout.dp * microbatches,
                                train_iters=2, log_interval=1000))


# ------------------------------------------------------------------------------- measurement
def measure_rank(rank, world, config):
    """Bytes this rank wrote during the second training step, and its (pp, dp, tp) coordinates."""
    engine = setup(config, world)
    marks = []
    train(engine, on_iteration=lambda iteration, loss, norm: marks.append(bytes_written()))
    s = engine.pstate
    return {"sent": marks[1] - marks[0], "coords": (s.pp.rank, s.dp.rank, s.tp.rank)}


# ---------------------------------------------------------------------------------- analytic
@dataclass(frozen=True)
class Term:
    """``calls`` collectives ``op`` over an ``n``-rank group on a tensor of ``nbytes`` (full)."""
    label: str
    op: str
    nbytes: float
    n: int
    calls: int = 1
    small: bool = False

    def wire(self, gloo: bool = False) -> float:
        return self.calls * self.nbytes * wire_factor(self.op, self.n, gloo)


def local_parameters(config: Config, rank: int) -> int:
    """Parameters this rank holds (slimtron.memory's count, equal to the built model's)."""
    from slimtron import memory

    p = config.parallel
    return memory.stage_parameters(config, rank // (p.tp * p.cp * p.data_parallel_size))


def activation_bytes(config: Config) -> int:
    """Bytes of one micro-batch's [s, b, h] activations (s/t under sequence parallelism: the
    tensor the pipeline passes; TP collectives move the full one, t times that)."""
    p = config.parallel
    s = config.model.seq_length // (p.tp if p.sequence_parallel else 1)
    itemsize = DTYPES[config.optim.params_dtype_name].itemsize
    return s * config.training.micro_batch_size * config.model.hidden_size * itemsize


def tensor_parallel_terms(config: Config, first: bool, last: bool, layers: int,
                          microbatches: int) -> list:
    t, m = config.parallel.tp, microbatches
    act = activation_bytes(config) * (t if config.parallel.sequence_parallel else 1)
    terms = []
    if config.parallel.sequence_parallel:
        # All-gathers per layer: the QKV and fc1 inputs forward, the row-parallel outputs' grads
        # backward, and the QKV and fc1 inputs again backward (only their slices are kept).
        for op, per_layer in (("all_gather", 6), ("reduce_scatter", 4)):
            name = op.replace("_", "-")
            terms.append(Term(f"SP {name} x{per_layer}/layer", op, act, t, per_layer * layers * m))
            if first:
                terms.append(Term(f"SP embedding {name}", op, act, t, m))
            if last:
                again = 2 if op == "all_gather" else 1  # the output layer's input, gathered twice
                terms.append(Term(f"SP output-layer {name}", op, act, t, again * m))
        norms = 2 * layers + int(last)
        terms.append(Term("SP norm-weight grads all-reduce", "all_reduce",
                          norms * config.model.hidden_size * 4, t))
    else:
        terms.append(Term("TP all-reduce x4/layer", "all_reduce", act, t, 4 * layers * m))
        if first:
            terms.append(Term("TP embedding all-reduce", "all_reduce", act, t, m))
        if last:
            terms.append(Term("TP output-layer input-grad all-reduce", "all_reduce", act, t, m))
    if last:
        tokens = config.model.seq_length * config.training.micro_batch_size
        terms.append(Term("vocab-parallel cross entropy: 3 all-reduces of s*b fp32",
                          "all_reduce", tokens * 4, t, 3 * m))
    return terms


def pipeline_terms(act: int, first: bool, last: bool, microbatches: int, chunks: int = 1) -> list:
    """Activations to the next stage and grads to the previous one, ``act`` bytes each; with
    ``chunks`` interleaved model chunks a stage sends at every chunk boundary (the last chunk of
    the last stage and the first chunk of the first stage have no neighbour)."""
    return [Term("PP activations to next stage", "p2p", act, 2,
                 microbatches * (chunks - int(last))),
            Term("PP grads to previous stage", "p2p", act, 2,
                 microbatches * (chunks - int(first)))]


def data_parallel_terms(config: Config, local_params: int) -> list:
    d = config.parallel.data_parallel_size
    grads = local_params * 4  # the fp32 gradient buffer
    if not config.parallel.use_distributed_optimizer:
        return [Term("DP grad-buffer all-reduce", "all_reduce", grads, d)]
    padded = math.ceil(local_params / d) * d
    param_bytes = padded * DTYPES[config.optim.params_dtype_name].itemsize
    return [Term("DP grad-buffer reduce-scatter", "reduce_scatter", padded * 4, d),
            Term("DP param-buffer all-gather", "all_gather", param_bytes, d)]


def small_terms(config: Config, last: bool) -> list:
    p = config.parallel
    tp, pp, dp = p.tp, p.pp, p.data_parallel_size
    terms = [Term("overflow-flag all-reduce (world)", "all_reduce", 4, tp * pp * dp, small=True),
             Term("grad-norm all-reduce (model parallel)", "all_reduce", 4, tp * pp, small=True)]
    if p.use_distributed_optimizer:
        terms.append(Term("grad-norm all-reduce (DP)", "all_reduce", 4, dp, small=True))
    if last:
        terms.append(Term("loss all-reduce (DP)", "all_reduce", 4, dp, small=True))
        terms.append(Term("loss broadcast from the last stage", "broadcast_root", 8, pp,
                          small=True))
    return [term for term in terms if term.n > 1]


def analytic_terms(config: Config, rank: int) -> list:
    """Every collective and p2p transfer ``rank`` takes part in during one training step."""
    p = config.parallel
    pstate = ParallelState.for_planning(p.tp, p.pp, p.data_parallel_size, rank)
    first, last = pstate.is_first_stage, pstate.is_last_stage
    t = config.training
    m = t.global_batch_size // (t.micro_batch_size * p.data_parallel_size)
    layers = config.model.num_layers // p.pp
    terms = []
    if p.tp > 1:
        terms += tensor_parallel_terms(config, first, last, layers, m)
    if p.pp > 1:
        terms += pipeline_terms(activation_bytes(config), first, last, m)
    if p.data_parallel_size > 1:
        terms += data_parallel_terms(config, local_parameters(config, rank))
    return [term for term in terms if term.calls > 0] + small_terms(config, last)


def totals(terms: list) -> dict:
    return {"analytic": sum(t.wire() for t in terms if not t.small),
            "small": sum(t.wire() for t in terms if t.small),
            "gloo": sum(t.wire(gloo=True) for t in terms)}


# ------------------------------------------------------------------------------------ tables
def step_section(args) -> str:
    header = (f"Bytes sent per rank in one training step (after a warm-up step): Llama-ish fp32, "
              f"{args.layers} layers, h={args.hidden}, s={args.seq}, b={args.micro_batch}, "
              f"{args.microbatches} micro-batches per DP rank, vocab 1000 untied")
    lines = [header,
             "measured = growth of wchar in /proc/self/io over the step (gloo's socket writes, "
             "headers included)",
             f"{'layout':<22} {'rank':>4} {'(pp,dp,tp)':>10} {'measured MB':>12} "
             f"{'analytic MB':>12} {'small B':>8} {'gloo model MB':>14} {'meas/analytic':>14} "
             f"{'meas/gloo':>10}"]
    breakdowns = []
    for name in args.layouts:
        layout = LAYOUTS[name]
        config = bench_config(layout, args.layers, args.hidden, args.seq, args.micro_batch,
                              args.microbatches)
        results = run_distributed(measure_rank, layout.world, config, timeout=600)
        shown = set()
        for rank, result in enumerate(results):
            terms = analytic_terms(config, rank)
            total = totals(terms)
            ring = total["analytic"] + total["small"]
            lines.append(f"{name:<22} {rank:>4} {str(result['coords']):>10} "
                         f"{result['sent'] / MB:>12.3f} {total['analytic'] / MB:>12.3f} "
                         f"{total['small']:>8.0f} {total['gloo'] / MB:>14.3f} "
                         f"{result['sent'] / ring:>14.3f} {result['sent'] / total['gloo']:>10.3f}")
            labels = tuple(t.label for t in terms)
            if labels not in shown:
                shown.add(labels)
                breakdowns.append(format_terms(name, rank, terms))
    lines += ["meas/analytic = measured / (analytic + small), ring algorithms; meas/gloo = "
              "measured / the same count with gloo's reduce-scatter factor 2(n-1)/n", "",
              "Analytic terms (first rank of each distinct role):"] + breakdowns
    return "\n".join(lines)


def format_terms(layout: str, rank: int, terms: list) -> str:
    rows = [f"  {layout} rank {rank}:"]
    for t in terms:
        rows.append(f"    {t.label:<56} {t.op:<15} n={t.n} {t.calls:>4} x {t.nbytes:>9.0f} B "
                    f"-> {t.wire():>11.0f} B{' (small)' if t.small else ''}")
    return "\n".join(rows)


# ------------------------------------------------------------ pipeline p2p (bench/pipeline.py)
P2P_SHAPE = (128, 2, 256)  # [s, b, h] fp32 = 256 KiB: large enough that gloo's headers vanish


class ScaleChunk(torch.nn.Module):
    """A model chunk that costs nothing: multiplies by one learnable scalar."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def p2p_rank(rank, world, cases):
    """Per case (m, v): (StageLink.bytes_sent, bytes written) of this stage for one batch."""
    pstate = ParallelState.build(pp=world)
    out = {}
    for m, v in cases:
        chunks = [ScaleChunk() for _ in range(v)]
        microbatches = [{"x": torch.ones(P2P_SHAPE)} for _ in range(m)]

        def forward_step(c, mb, input_tensor):
            out = chunks[c](mb["x"] if pstate.is_first_stage and c == 0 else input_tensor)
            return out.sum() / m if pstate.is_last_stage and c == v - 1 else out

        forward_backward(chunks, forward_step, microbatches, pstate, P2P_SHAPE, torch.float32)
        dist.barrier()
        link = StageLink(pstate, P2P_SHAPE, torch.float32)
        before = bytes_written()
        forward_backward(chunks, forward_step, microbatches, pstate, P2P_SHAPE, torch.float32,
                         link=link)
        out[(m, v)] = (link.bytes_sent, bytes_written() - before)
        dist.barrier()
    return out


def p2p_bytes_section(args) -> str:
    """Per-stage p2p bytes of one batch: analytic, StageLink's count, and the wire (wchar)."""
    nbytes = math.prod(P2P_SHAPE) * 4
    lines = [f"Pipeline p2p bytes sent per stage in one batch ([s, b, h] = {P2P_SHAPE} fp32, "
             f"{nbytes // 1024} KiB per transfer; analytic = m x (v chunks - ends) transfers each "
             "way)",
             f"{'p':>3} {'v':>3} {'m':>4} {'analytic KiB per stage':>28} {'StageLink ok':>13} "
             f"{'wire / analytic per stage':>30}"]
    for pp in args.sizes:
        cases = [(m, v) for m in args.microbatches for v in (1, 2) if v == 1 or m % pp == 0]
        per_rank = run_distributed(p2p_rank, pp, cases, timeout=600)
        for m, v in cases:
            analytic = [sum(t.wire() for t in pipeline_terms(nbytes, s == 0, s == pp - 1, m, v))
                        for s in range(pp)]
            counted = [r[(m, v)][0] for r in per_rank]
            wire = [r[(m, v)][1] for r in per_rank]
            lines.append(f"{pp:>3} {v:>3} {m:>4} "
                         f"{' '.join(f'{a / 1024:.0f}' for a in analytic):>28} "
                         f"{'yes' if counted == analytic else 'NO':>13} "
                         f"{' '.join(f'{w / a:.4f}' for w, a in zip(wire, analytic)):>30}")
    lines.append("StageLink ok = StageLink.bytes_sent equals the analytic count on every stage; "
                 "wire = wchar growth of /proc/self/io")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=DEFAULT_LAYOUTS,
                        help=f"comma-separated, from: {', '.join(LAYOUTS)}")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4, help="per data-parallel rank")
    args = parser.parse_args(argv)
    unknown = [name for name in args.layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {', '.join(unknown)}; known: {', '.join(LAYOUTS)}")
    if max(LAYOUTS[name].world for name in args.layouts) > 8:
        parser.error("--layouts: at most 8 ranks")
    return args


def main(argv=None):
    args = parse_args(argv)
    sizes = sorted({2} | {LAYOUTS[name].tp for name in args.layouts if LAYOUTS[name].tp > 2})
    print(calibration_section(sizes))
    print()
    print(step_section(args))


if __name__ == "__main__":
    main()
