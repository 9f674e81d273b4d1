"""tools/plan_layout.py: what fits, the step-time model's pieces, published layouts near the top."""
import json

import pytest

from slimtron import memory
from slimtron.config import ConfigError
from tests.test_hf_conversion import tool


plan_layout = tool("plan_layout", "tools")
GIB = 2 ** 30
FIELDS = {"tp", "pp", "vpp", "dp", "micro_batch_size", "recompute", "sequence_parallel",
          "distributed_optimizer", "peak_bytes", "step_time_s"}


def _plan(argv):
    return json.loads(plan_layout.main(argv + ["--json", "--top", "100000"]))


def _rank_of(layouts, **published) -> int:
    return next(i for i, l in enumerate(layouts, 1)
                if all(l[k] == v for k, v in published.items()))


def test_llama2_70b_on_512_h100s(capsys):
    argv = ["--preset", "llama2-70b", "--gpus", "512", "--gpu", "h100-80gb", "--seq-length",
            "4096", "--global-batch-size", "1024"]
    layouts = _plan(argv)
    assert FIELDS <= set(layouts[0])
    usable = 80 * GIB * 0.9 - 2 * GIB
    assert all(l["peak_bytes"] <= usable for l in layouts)
    times = [l["step_time_s"] for l in layouts]
    assert times == sorted(times)
    # NeMo's Llama-2-70B recipe (TP4 PP4 VP5, SP, distributed optimizer, mbs 1) is in the top 10.
    assert _rank_of(layouts, tp=4, pp=4, vpp=5, sequence_parallel=True,
                    distributed_optimizer=True, micro_batch_size=1, recompute=None) <= 10
    for l in layouts[:10]:
        assert l["bubble"] == pytest.approx((l["pp"] - 1) / (l["vpp"] * 1024 // l["dp"]))
    # The memory figure is the memory model's: rebuild the top layout's config and ask it.
    top = plan_layout.Layout(**{k: layouts[0][k] for k in (
        "tp", "pp", "vpp", "dp", "micro_batch_size", "recompute", "sequence_parallel",
        "distributed_optimizer")})
    base = plan_layout.config_from_namespace(plan_layout.build_plan_parser().parse_args(argv))
    base.optim.bf16 = True
    config = plan_layout.layout_config(base, top)
    assert layouts[0]["peak_bytes"] == max(
        memory.plan_stage(config, s, memory.num_microbatches(config)).peak
        for s in range(config.parallel.pp))
    capsys.readouterr()
    text = plan_layout.main(argv)  # the table, and why whole families do not fit
    assert "tp1 pp1: needs at least" in text and "> 70.0 GiB usable" in text


def test_llama2_7b_on_8_h100s_and_overrides():
    argv = ["--preset", "llama2-7b", "--gpus", "8", "--seq-length", "4096",
            "--global-batch-size", "1024"]
    layouts = _plan(argv)
    # Megatron-Bridge's and torchtitan's 8-GPU recipes: no TP, no PP, sharded optimizer.
    assert _rank_of(layouts, tp=1, pp=1, distributed_optimizer=True) == 1
    # Less memory: the one-GPU-per-replica layouts no longer fit, and faster links cost less.
    small = _plan(argv + ["--memory-gib", "40"])
    assert all(l["peak_bytes"] <= 40 * GIB * 0.9 - 2 * GIB for l in small)
    assert not any(l["tp"] == 1 and l["pp"] == 1 for l in small)
    fast = _plan(argv + ["--nvlink-gbps", "4500"])
    tp8 = dict(tp=8, pp=1, micro_batch_size=1, recompute=None, sequence_parallel=True,
               distributed_optimizer=False)
    slow_time = layouts[_rank_of(layouts, **tp8) - 1]["step_time_s"]
    assert fast[_rank_of(fast, **tp8) - 1]["step_time_s"] < slow_time


def test_step_time_pieces():
    argv = ["--preset", "llama2-7b", "--gpus", "16", "--seq-length", "4096",
            "--global-batch-size", "64"]
    base = plan_layout.config_from_namespace(plan_layout.build_plan_parser().parse_args(argv))
    base.optim.bf16 = True
    device = plan_layout.DEVICES["h100-80gb"]
    layout = plan_layout.Layout(1, 1, 1, 16, 1, None, False, True)
    config = plan_layout.layout_config(base, layout)
    plan_layout.step_time(config, layout, device, gpus_per_node=8, efficiency=0.5)
    flops = plan_layout.flops_per_token(config.model, 4096) * 64 * 4096
    compute = flops / (16 * device.peak_flops * 0.5)
    params = memory.plan_stage(config, 0, 4).parameters
    dp = params * 15 / 16 * 6 / device.ib_bytes_per_s  # reduce-scatter fp32 + all-gather bf16
    assert layout.compute_s == pytest.approx(compute)
    assert layout.step_time_s == pytest.approx(compute + dp)
    assert layout.comm_share == pytest.approx(dp / (compute + dp))


def test_refusals():
    with pytest.raises(ConfigError, match="needs --global-batch-size"):
        plan_layout.main(["--preset", "llama2-7b", "--gpus", "8"])
    with pytest.raises(ConfigError, match="not a whole number of nodes"):
        plan_layout.main(["--preset", "llama2-7b", "--gpus", "12", "--global-batch-size", "96"])
    layouts, rejected = plan_layout.plan(
        plan_layout.config_from_namespace(plan_layout.build_plan_parser().parse_args(
            ["--preset", "llama2-70b", "--gpus", "8", "--global-batch-size", "8", "--bf16"])),
        8, plan_layout.DEVICES["a100-40gb"])
    assert layouts == [] and all("GiB usable" in why for why in rejected.values())
