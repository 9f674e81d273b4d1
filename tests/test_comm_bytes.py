"""bench/comm_bytes.py's analytic count of the bytes each rank sends per training step, against
the bytes gloo actually writes (``wchar`` of /proc/self/io) in a real training step.

Byte counts are deterministic (no timings). Two layouts cover every term: TP without SP with a
plain DP all-reduce (4 ranks), and TP+SP, PP and the distributed optimizer together (8 ranks). The
activations (64 KiB) and buffers are large enough that gloo's message headers stay under 1% (seen:
0.8%), while dropping any one TP, SP, PP or DP term would lower the count by 3% or more.
"""
import pytest

from bench.comm_bytes import (Layout, analytic_terms, bench_config, bytes_written,
                              measure_rank, totals, wire_factor)
from tests.distributed import run_distributed

HEADER_ALLOWANCE = 0.015


def check_layout(layout: Layout) -> None:
    config = bench_config(layout, layers=2, hidden=128, seq=64, micro_batch=2, microbatches=2)
    results = run_distributed(measure_rank, layout.world, config, timeout=300)
    for rank, result in enumerate(results):
        expected = totals(analytic_terms(config, rank))["gloo"]
        assert expected <= result["sent"] <= expected * (1 + HEADER_ALLOWANCE), \
            f"{layout.name} rank {rank}: sent {result['sent']} B, analytic {expected:.0f} B"


def test_tp_and_plain_data_parallel():
    check_layout(Layout("tp2-dp2", tp=2, dp=2))


def test_sequence_pipeline_and_distributed_optimizer():
    check_layout(Layout("tp2-sp-pp2-dp2-distopt", tp=2, pp=2, dp=2, sp=True, dist_opt=True))


def test_terms_of_each_role():
    """Which collectives each rank of a 3D layout takes part in (no processes needed)."""
    config = bench_config(Layout("x", tp=2, pp=2, dp=2, sp=True, dist_opt=True), layers=2,
                          hidden=128, seq=64, micro_batch=2, microbatches=2)
    first = {t.label: t for t in analytic_terms(config, 0)}
    last = {t.label: t for t in analytic_terms(config, 7)}
    assert "SP embedding reduce-scatter" in first and "SP embedding reduce-scatter" not in last
    assert "SP output-layer all-gather" in last and "SP output-layer all-gather" not in first
    assert first["PP activations to next stage"].nbytes == 64 // 2 * 2 * 128 * 4  # s/t under SP
    assert "PP grads to previous stage" not in first
    # 1 layer per stage, 2 micro-batches; backward gathers the QKV and fc1 input slices again.
    assert first["SP all-gather x6/layer"].calls == 6 * 1 * 2
    assert first["SP reduce-scatter x4/layer"].calls == 4 * 1 * 2
    assert last["SP output-layer all-gather"].calls == 2 * 2
    assert "loss broadcast from the last stage" in last


def test_wire_factors_and_counter():
    assert wire_factor("all_reduce", 4) == 1.5
    assert wire_factor("all_gather", 4) == 0.75
    assert wire_factor("reduce_scatter", 4, gloo=True) == 1.5
    assert wire_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError, match="unknown collective 'gather'"):
        wire_factor("gather", 2)
    before = bytes_written()
    with open("/dev/null", "w") as f:
        f.write("x" * 1000)
    assert bytes_written() - before >= 1000
