"""Activation memory as autograd really keeps it, against the closed form of slimtron.memory."""
import dataclasses
import json
import pathlib

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


KERNELS = ("flash", "unfused")  # --attention-backend, each measured


def spec_for(tp, sp, recompute, dtype=torch.bfloat16, attention="flash") -> memory.ActivationSpec:
    return memory.ActivationSpec(LLAMA.seq_length, MICRO_BATCH, tp=tp, sequence_parallel=sp,
                                 recompute=recompute, element_size=torch.finfo(dtype).bits // 8,
                                 attention=attention)


def measured_layer_bytes(pstate, sp, recompute, dtype=torch.bfloat16, attention="flash") -> float:
    """Bytes saved per layer by a decoder chunk of LLAMA.num_layers layers for one micro-batch
    (parameters and the chunk's shared rotary tables not counted)."""
    torch.manual_seed(0)
    config = dataclasses.replace(LLAMA, attention_backend=attention)
    model = GPTModel(config, pstate, pre_process=False, post_process=False, sequence_parallel=sp,
                     params_dtype=dtype, recompute=recompute)
    s = LLAMA.seq_length // (pstate.tp.size if sp else 1)
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
    return {(case, kernel): measured_layer_bytes(pstate, case[1], case[2], attention=kernel)
            for case in CASES if case[0] == 2 for kernel in KERNELS}


@pytest.fixture(scope="module")
def measured():
    results = {(case, kernel): measured_layer_bytes(ParallelState.single(), case[1], case[2],
                                                    attention=kernel)
               for case in CASES if case[0] == 1 for kernel in KERNELS}
    tp2 = run_distributed(_tp2_cases, 2)
    assert tp2[0] == tp2[1]  # both TP ranks keep the same
    results.update(tp2[0])
    return results


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=["no-tp", "tp2", "tp2-sp", "tp2-sp-selective",
                                             "full-recompute"])
def test_layer_activations_match_the_closed_form(measured, case, kernel):
    tp, sp, recompute = case
    spec = spec_for(*case, attention=kernel)
    if recompute == "full":
        predicted = memory.chunk_layer_bytes(LLAMA, spec, LLAMA.num_layers)[0] / LLAMA.num_layers
        # What the paper calls 2sbh: the layer input, 16-bit.
        assert predicted == memory.paper_layer_activation_bytes(LLAMA, spec)
    else:
        predicted = memory.layer_activation_bytes(LLAMA, spec)
    assert measured[case, kernel] == pytest.approx(predicted, rel=0.05)


def test_sequence_parallel_keeps_only_the_local_slice(measured):
    """SP divides every term by t: what TP alone leaves replicated (norms and the column-parallel
    inputs, the paper's 10sbh) is split too, so TP+SP keeps half of no-TP at t=2 (within the
    logsumexp and int rounding)."""
    no_tp, tp2, tp2_sp = (measured[case, "flash"] for case in CASES[:3])
    assert tp2_sp == pytest.approx(no_tp / 2, rel=1e-9)
    s, b, h = LLAMA.seq_length, MICRO_BATCH, LLAMA.hidden_size
    replicated = 2 * (2 * s * b * h + 4 * s * b) + 2 * 2 * s * b * h  # norms + QKV/fc1 inputs, bf16
    assert tp2 - tp2_sp == pytest.approx(replicated / 2, rel=1e-9)


def test_fp32_doubles_the_tensors_but_not_the_statistics():
    for kernel in KERNELS:
        spec = spec_for(1, False, None, torch.float32, attention=kernel)
        measured = measured_layer_bytes(ParallelState.single(), False, None, torch.float32, kernel)
        assert measured == pytest.approx(memory.layer_activation_bytes(LLAMA, spec), rel=0.05)


def test_unfused_attention_keeps_about_half_the_scores():
    """The unfused kernel's probabilities: its query blocks skip the upper triangle (s = 512:
    4 blocks keep 10/16 of s x s), and with attention dropout one mask byte each."""
    model = dataclasses.replace(LLAMA, seq_length=512, attention_dropout=0.1)
    flash = memory.ActivationSpec(512, 1, attention="flash")
    unfused = dataclasses.replace(flash, attention="unfused")
    a = model.num_attention_heads
    probabilities = a * 512 * 512 * 10 // 16
    extra = memory.attention_core_bytes(model, unfused) - memory.attention_core_bytes(model, flash)
    rope_copies_and_logsumexp = 512 * (a + model.num_query_groups) * model.kv_channels * 2 + 4 * 512 * a
    assert extra == probabilities * 3 - rope_copies_and_logsumexp


def test_saved_activations_counts_each_storage_once():
    x = torch.randn(8, 4, requires_grad=True)
    with memory.SavedActivations() as saved:
        y = x * 2  # saves nothing of size (2 is a scalar)
        z = y.sin() * y.cos()  # sin and cos both save y: one storage; the product saves both
    assert saved.total == 3 * 8 * 4 * 4  # y, sin(y), cos(y)
    assert saved.peak == saved.live == saved.total
    z.sum().backward()
    assert saved.live == 0 and saved.peak == saved.total


# ---- the dry run's prediction against a real step, per rank -----------------------------------

from slimtron.config import (Config, DataConfig, OptimizerConfig, ParallelConfig,  # noqa: E402
                             TrainingConfig)
from slimtron.dry_run import build_rank, dry_run, meta_microbatch  # noqa: E402

WORLD = 4
# name: (tp, pp, layers per virtual stage, SP, distributed optimizer, recompute, method, layers)
LAYOUTS = {
    "tp2-pp2-sp": (2, 2, None, True, False, None, None, None),
    "tp2-dp2-sp-distopt-selective": (2, 1, None, True, True, "selective", None, None),
    "pp2-dp2-distopt-full-uniform": (1, 2, None, False, True, "full", "uniform", 2),
    "pp4-interleaved": (1, 4, 1, False, False, None, None, None),
    "dp4-distopt": (1, 1, None, False, True, None, None, None),
    "tp2-pp2-interleaved-sp-full-block": (2, 2, 2, True, False, "full", "block", 1),
    "tp2-pp2-sp-document-mask": (2, 2, None, True, False, None, None, None),
    "tp2-dp2-sp-unfused": (2, 1, None, True, False, None, None, None),
}


def layout_config(name: str) -> Config:
    tp, pp, per_virtual, sp, dist_opt, recompute, method, n = LAYOUTS[name]
    # A planned job runs flash ("auto" on a GPU); one layout runs the unfused kernel explicitly.
    model = dataclasses.replace(LLAMA, num_layers=8, seq_length=128, max_position_embeddings=128,
                                hidden_size=64,
                                ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                                attention_backend="unfused" if "unfused" in name else "flash")
    dp = WORLD // (tp * pp)
    return Config(model=model, data=DataConfig(reset_attention_mask=name.endswith("document-mask")),
                  parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp,
                                          num_layers_per_virtual_pipeline_stage=per_virtual,
                                          sequence_parallel=sp, use_distributed_optimizer=dist_opt),
                  optim=OptimizerConfig(bf16=True, lr_decay_style="constant"),
                  training=TrainingConfig(micro_batch_size=2, global_batch_size=2 * dp * 4,
                                          recompute_granularity=recompute,
                                          recompute_method=method, recompute_num_layers=n))


def _measure_layouts(rank, world):
    """(weights, grads, optimizer, activation peak) of this rank after one real step per layout."""
    from slimtron.arguments import validate
    from slimtron.training.loop import train_step

    results = {}
    for name in LAYOUTS:
        config = validate(layout_config(name), world, check_files=False)
        engine = build_rank(config, torch.device("cpu"))
        pstate = engine.pstate
        reads_data = pstate.is_first_stage or pstate.is_last_stage
        batches = [meta_microbatch(config, torch.device("cpu")) if reads_data else None
                   for _ in range(engine.num_microbatches)]
        params = [p for chunk in engine.model_chunks for p in chunk.parameters()]
        with memory.SavedActivations(exclude=params) as saved:
            _, ok, _ = train_step(engine, batches)
        assert ok and saved.live == 0
        state = memory.measured_state_bytes(engine.model_chunks, engine.grads, engine.optimizer)
        results[name] = (*state, saved.peak)
    return results


@pytest.fixture(scope="module")
def layouts_measured():
    return run_distributed(_measure_layouts, WORLD)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dry_run_predicts_every_rank_of_a_real_step(layouts_measured, name):
    config = layout_config(name)
    for rank in range(WORLD):
        (predicted,) = dry_run(layout_config(name), WORLD, rank)
        weights, grads, optimizer, activations = layouts_measured[rank][name]
        assert (predicted.weights, predicted.grads) == (weights, grads)
        assert predicted.optimizer == optimizer
        assert predicted.saved_activations == pytest.approx(activations, rel=0.05), f"rank {rank}"
        saved_peak = predicted.peak - predicted.activations + predicted.saved_activations
        assert saved_peak == pytest.approx(weights + grads + optimizer + activations, rel=0.05)
    assert config.parallel.tp * config.parallel.pp <= WORLD


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_closed_form_predicts_every_rank_of_a_real_step(layouts_measured, name):
    """The planner's model (no model built) against the same real steps."""
    from slimtron.arguments import validate

    config = validate(layout_config(name), WORLD, check_files=False)
    ranks_per_stage = WORLD // config.parallel.pp
    for rank in range(WORLD):
        stage = rank // ranks_per_stage
        planned = memory.plan_stage(config, stage, memory.num_microbatches(config))
        weights, grads, optimizer, activations = layouts_measured[rank][name]
        assert planned.saved_activations == pytest.approx(activations, rel=0.05), f"rank {rank}"
        saved_peak = planned.peak - planned.activations + planned.saved_activations
        assert saved_peak == pytest.approx(weights + grads + optimizer + activations, rel=0.05)


# ---- the dry run's command line ------------------------------------------------------------------

def test_dry_run_of_llama2_70b_at_512_ranks_as_json(capsys):
    from slimtron.dry_run import main

    argv = ["--preset", "llama2-70b", "--tensor-model-parallel-size", "8",
            "--pipeline-model-parallel-size", "4", "--sequence-parallel",
            "--use-distributed-optimizer", "--bf16", "--micro-batch-size", "1",
            "--global-batch-size", "1024", "--dry-run", "--dry-run-world-size", "512", "--json"]
    report = json.loads(main(argv))
    assert capsys.readouterr().out.strip() == json.dumps(report)
    assert report["attention_kernel"] == "flash"  # auto plans the GPU's kernel
    stages = report["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2, 3]
    assert [s["rank"] for s in stages] == [0, 128, 256, 384]
    assert [s["in_flight"] for s in stages] == [4, 3, 2, 1]  # 1F1B: pp - stage
    for s in stages:
        assert s["peak"] == s["weights"] + s["grads"] + s["optimizer"] + s["activations"]
    # 20 layers of TP+SP activations per micro-batch, as the closed form has them.
    spec = memory.ActivationSpec(4096, 1, tp=8, sequence_parallel=True)
    from slimtron.config import model_preset
    layer = memory.layer_activation_bytes(model_preset("llama2-70b"), spec)
    assert stages[1]["activations"] == pytest.approx(3 * 20 * layer, rel=0.01)
    # One rank only, interleaved: Megatron's count of chunk-forwards in flight on stage 0.
    argv[argv.index("--json")] = "--dry-run-rank"
    (stage,) = json.loads(main(argv + ["0", "--json", "--num-layers-per-virtual-pipeline-stage",
                                       "5"]))["stages"]
    assert stage["in_flight"] == memory.megatron_in_flight(4, 0, 64, 4) == 19


def test_dry_run_refuses_an_impossible_layout_in_one_line():
    import subprocess
    import sys as _sys

    root = pathlib.Path(__file__).parents[1]
    run = subprocess.run([_sys.executable, str(root / "pretrain_gpt.py"), "--preset",
                          "llama2-70b", "--tensor-model-parallel-size", "3", "--dry-run",
                          "--dry-run-world-size", "512"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "error: world size 512 is not divisible by --tensor-model-parallel-size 3 x "
        "--pipeline-model-parallel-size 1 = 3"]


def test_gpt2_family_dry_run_equals_the_closed_form():
    """LayerNorm, learned positions, GeLU, biases, tied embeddings over two stages, dropout (its
    masks; attention counted as the fused kernel, which needs none)."""
    from slimtron.arguments import parse_args, validate

    argv = ["--preset", "gpt2-124m", "--bf16", "--micro-batch-size", "2", "--global-batch-size",
            "16", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--sequence-parallel"]
    config = validate(parse_args(argv), 8, check_files=False)
    for built in dry_run(parse_args(argv), 8):
        planned = memory.plan_stage(config, built.stage, memory.num_microbatches(config))
        assert built.parameters == planned.parameters
        assert built.activations == pytest.approx(planned.activations, rel=1e-6)
        assert built.peak == pytest.approx(planned.peak, rel=1e-3)
