"""FLOPs per token, device peaks and MFU; the model summary's parameter count and memory split."""
import pytest
import torch

from slimtron import flops
from slimtron.config import ModelConfig, model_preset


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
