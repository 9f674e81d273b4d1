"""FLOPs per token, device peaks and MFU; the model summary's parameter count and memory split."""
import re

import pytest
import torch

from slimtron import flops
from slimtron.config import ConfigError, ModelConfig, model_preset
from tests.test_hf_conversion import tool


def _megatron_closed_form(m: ModelConfig, seq: int) -> float:
    """Megatron-LM's per-token training FLOPs, written as its paper-style closed form."""
    h, L = m.hidden_size, m.num_layers
    q_ratio = m.num_attention_heads * m.kv_channels / h
    gated = 1.5 if m.swiglu else 1.0
    attention = (1 + m.num_query_groups / m.num_attention_heads + seq / h) * q_ratio
    mlp = m.ffn_hidden_size / h * gated
    logits = m.padded_vocab_size() / (2 * L * h)
    return 12 * seq * L * h * h * (attention + mlp + logits) / seq


def test_flops_per_token_matches_design_formula_and_megatron():
    gpt = ModelConfig(num_layers=6, hidden_size=256, num_attention_heads=8, seq_length=512,
                      vocab_size=1000)
    n = 6 * 12 * 256 ** 2 + gpt.padded_vocab_size() * 256  # 12h^2 per layer + logits
    assert flops.flops_per_token(gpt) == 6 * n + 12 * 6 * 256 * 512  # 6N + 12 L h s
    for name in ("llama2-7b", "llama2-70b", "tiny-llama", "gpt2-124m"):
        m = model_preset(name)
        assert flops.flops_per_token(m) == pytest.approx(_megatron_closed_form(m, m.seq_length),
                                                         rel=1e-12)
    m = model_preset("llama2-7b")
    assert flops.flops_per_token(m, seq_length=1024) < flops.flops_per_token(m)
    # Padding grows with tp and the padded rows are computed.
    assert flops.matmul_params(m, 3) > flops.matmul_params(m, 1)


def test_peak_table_mfu_and_measured_peak():
    assert flops.table_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert flops.table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert flops.table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert flops.table_peak("NVIDIA A100-PCIE-40GB", "tf32") == 156e12
    assert flops.table_peak("Tesla V100-SXM2-16GB", "bf16") is None
    assert flops.table_peak("Some Future GPU", "bf16") is None
    assert flops.mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
    assert flops.mfu(1000.0, 6e9, flops.Peak(6e12, "test")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="peak FLOP/s must be positive"):
        flops.mfu(1.0, 1.0, 0.0)
    peak = flops.device_peak(torch.float32, torch.device("cpu"))
    assert peak.flops > 1e8 and "cpu fp32: measured matmul peak" in str(peak)
    # Cached per process: asking again does not re-measure.
    hits = flops.measured_matmul_peak.cache_info().hits
    assert flops.device_peak(torch.float32).flops == peak.flops
    assert flops.measured_matmul_peak.cache_info().hits == hits + 1
    with pytest.raises(ValueError, match="no peak FLOP/s for dtype torch.int32"):
        flops.device_peak(torch.int32)


# ---- tools/model_summary.py ----------------------------------------------------------------

model_summary = tool("model_summary", "tools")
GIB = 2 ** 30


def _gib(text: str, label: str) -> str:
    """The GiB figure printed on the line of ``label``."""
    return re.search(rf"^  {label} +([0-9.]+) GiB$", text, re.M).group(1)


def _llama_layer_bytes(s, b, h, a, g, f, t=1, sp=False) -> float:
    """Our model's per-layer activations in bf16 (slimtron/memory.py's derivation, by hand):
    sbh(14 + 6g/a + 6f/h) + sb(8 + 4a), all over t under TP+SP; TP alone leaves 8sbh + 8sb whole."""
    if sp or t == 1:
        return (s * b * h * (14 + 6 * g / a + 6 * f / h) + s * b * (8 + 4 * a)) / t
    return s * b * h * (8 + (6 + 6 * g / a + 6 * f / h) / t) + s * b * (8 + 4 * a / t)


def test_llama2_7b_count_and_single_rank_memory(capsys):
    text = model_summary.main(["--preset", "llama2-7b", "--bf16"])
    assert "total parameters: 6,738,415,616\n" in text
    assert capsys.readouterr().out.strip() == text
    n = 6_738_415_616
    s, h, a, L, f, v = 4096, 4096, 32, 32, 11008, 32000
    layers = L * _llama_layer_bytes(s, 1, h, a, a, f)
    rotary = 2 * 4 * s * 128
    # token ids; final norm, the output layer's input, the loss (bf16 exponentials, targets,
    # mask, two fp32 values per token, loss mask)
    ends = 8 * s + (2 * s * h + 4 * s) + 2 * s * h + s * (2 * v + 8 + 1 + 8 + 4)
    activations = layers + rotary + ends
    assert _gib(text, "weights") == f"{2 * n / GIB:.2f}"
    assert _gib(text, "gradients") == f"{4 * n / GIB:.2f}"
    assert _gib(text, "optimizer state") == f"{12 * n / GIB:.2f}"
    assert _gib(text, "activations") == f"{activations / GIB:.2f}"
    assert _gib(text, "total") == f"{(18 * n + activations) / GIB:.2f}"
    assert "fits in 80 GiB of GPU memory: no" in text


def test_per_stage_split_tp2_pp2_equals_the_dry_run():
    argv = ["--preset", "llama2-7b", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--data-parallel-size", "2", "--bf16",
            "--use-distributed-optimizer", "--sequence-parallel", "--micro-batch-size", "1",
            "--global-batch-size", "8"]
    parser = model_summary.build_summary_parser()
    config = model_summary.config_from_namespace(parser.parse_args(argv))
    model_summary.validate(config, 8, check_files=False)
    total, stages = model_summary.summarize(config, num_microbatches=4)
    assert total == 6_738_415_616
    h, f, v = 4096, 11008, 32000
    layer = (h * 3 * h + h * h + h * 2 * f + f * h) // 2 + 2 * h  # TP-split weights, two norms
    first = 16 * layer + v * h // 2
    last = 16 * layer + h + v * h // 2  # final norm, untied output layer
    assert [r.parameters for r in stages] == [first, last]
    r0, r1 = stages
    assert (r0.weights, r0.grads, r0.optimizer) == (2 * first, 4 * first, 12 / 2 * first)
    per_layer = _llama_layer_bytes(4096, 1, h, 32, 32, f, t=2, sp=True)
    rotary = 2 * 4 * 4096 * 128
    assert r0.in_flight == 2 and r1.in_flight == 1
    assert r0.activations == pytest.approx(2 * (16 * per_layer + rotary + 8 * 4096 + 4096))
    # One memory model: the dry run of the real model on the meta device says the same.
    from slimtron.dry_run import dry_run
    for planned, built in zip(stages, dry_run(config, 8)):
        assert (built.parameters, built.in_flight) == (planned.parameters, planned.in_flight)
        assert built.peak == pytest.approx(planned.peak, rel=1e-3)
    text = model_summary.report(config, total, stages, 80 * GIB)
    assert "most loaded stage: 0 (2 micro-batches in flight)" in text


def test_deep_pipeline_and_large_model_plan():
    text = model_summary.main(["--preset", "llama2-70b", "--tensor-model-parallel-size", "8",
                               "--pipeline-model-parallel-size", "4", "--data-parallel-size", "2",
                               "--bf16", "--use-distributed-optimizer", "--sequence-parallel"])
    assert "total parameters: 68,989,231,104 (vocabulary 32,000 padded to 32,768)" in text
    assert "stage 1: " in text and "stage 3: " in text
    with pytest.raises(ConfigError, match="--num-attention-heads 64 is not divisible"):
        model_summary.main(["--preset", "llama2-70b", "--tensor-model-parallel-size", "3"])
