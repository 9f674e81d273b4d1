"""Activation memory as autograd really keeps it, against the closed form of slimtron.memory."""
import dataclasses

import pytest
import torch

from slimtron import memory
from slimtron.config import ModelConfig
from slimtron.model.gpt import GPTModel
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed

# A Llama-shaped layer (RMSNorm, RoPE, SwiGLU, grouped-query attention, no dropout, no biases).
LLAMA = ModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=8,
                    num_query_groups=2, seq_length=64, vocab_size=512, normalization="RMSNorm",
                    position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                    untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                    attention_dropout=0.0)
MICRO_BATCH = 2
# (tp, sequence parallel, recompute): the five cases, in the paper's order.
CASES = [(1, False, None), (2, False, None), (2, True, None), (2, True, "selective"),
         (1, False, "full")]


def spec_for(tp, sp, recompute, dtype=torch.bfloat16) -> memory.ActivationSpec:
    return memory.ActivationSpec(LLAMA.seq_length, MICRO_BATCH, tp=tp, sequence_parallel=sp,
                                 recompute=recompute, element_size=torch.finfo(dtype).bits // 8)


def measured_layer_bytes(pstate, sp, recompute, dtype=torch.bfloat16) -> float:
    """Bytes saved per layer by a decoder chunk of LLAMA.num_layers layers for one micro-batch
    (parameters and the chunk's shared rotary tables not counted)."""
    torch.manual_seed(0)
    model = GPTModel(LLAMA, pstate, pre_process=False, post_process=False, sequence_parallel=sp,
                     params_dtype=dtype, recompute=recompute)
    s = LLAMA.seq_length // (pstate.tp_size if sp else 1)
    x = torch.randn(s, MICRO_BATCH, LLAMA.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(LLAMA.seq_length).unsqueeze(0).expand(MICRO_BATCH, -1)
    rotary = model.rotary(positions)
    with memory.SavedActivations(exclude=[*model.parameters(), *rotary]) as saved:
        out = model.decoder(x, rotary)
    after_forward = saved.live
    out.float().sum().backward()
    assert saved.live == 0  # everything saved was released by backward
    return after_forward / LLAMA.num_layers


def _tp2_cases(rank, world):
    pstate = ParallelState.build(tp=2)
    return {case: measured_layer_bytes(pstate, case[1], case[2]) for case in CASES if case[0] == 2}


@pytest.fixture(scope="module")
def measured():
    results = {case: measured_layer_bytes(ParallelState.single(), case[1], case[2])
               for case in CASES if case[0] == 1}
    tp2 = run_distributed(_tp2_cases, 2)
    assert tp2[0] == tp2[1]  # both TP ranks keep the same
    results.update(tp2[0])
    return results


@pytest.mark.parametrize("case", CASES, ids=["no-tp", "tp2", "tp2-sp", "tp2-sp-selective",
                                             "full-recompute"])
def test_layer_activations_match_the_closed_form(measured, case):
    tp, sp, recompute = case
    spec = spec_for(*case)
    if recompute == "full":
        predicted = memory.chunk_layer_bytes(LLAMA, spec, LLAMA.num_layers)[0] / LLAMA.num_layers
        # What the paper calls 2sbh: the layer input, 16-bit.
        assert predicted == memory.paper_layer_activation_bytes(LLAMA, spec)
    else:
        predicted = memory.layer_activation_bytes(LLAMA, spec)
    assert measured[case] == pytest.approx(predicted, rel=0.05)


def test_sequence_parallel_keeps_only_the_local_slice(measured):
    """SP divides every term by t: what TP alone leaves replicated (norms and the column-parallel
    inputs, the paper's 10sbh) is split too, so TP+SP keeps half of no-TP at t=2 (within the
    logsumexp and int rounding)."""
    no_tp, tp2, tp2_sp = measured[CASES[0]], measured[CASES[1]], measured[CASES[2]]
    assert tp2_sp == pytest.approx(no_tp / 2, rel=1e-9)
    s, b, h = LLAMA.seq_length, MICRO_BATCH, LLAMA.hidden_size
    replicated = 2 * (2 * s * b * h + 4 * s * b) + 2 * 2 * s * b * h  # norms + QKV/fc1 inputs, bf16
    assert tp2 - tp2_sp == pytest.approx(replicated / 2, rel=1e-9)


def test_fp32_doubles_the_tensors_but_not_the_statistics():
    spec = spec_for(1, False, None, torch.float32)
    measured = measured_layer_bytes(ParallelState.single(), False, None, torch.float32)
    assert measured == pytest.approx(memory.layer_activation_bytes(LLAMA, spec), rel=0.05)


def test_saved_activations_counts_each_storage_once():
    x = torch.randn(8, 4, requires_grad=True)
    with memory.SavedActivations() as saved:
        y = x * 2  # saves nothing of size (2 is a scalar)
        z = y.sin() * y.cos()  # sin and cos both save y: one storage; the product saves both
    assert saved.total == 3 * 8 * 4 * 4  # y, sin(y), cos(y)
    assert saved.peak == saved.live == saved.total
    z.sum().backward()
    assert saved.live == 0 and saved.peak == saved.total
