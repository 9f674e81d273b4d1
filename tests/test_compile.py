"""--compile-layers: each transformer layer under torch.compile gives eager's numbers (fp32, 1e-5
relative) through the real training step (fp32 grad buffer, distributed optimizer, clipping,
AdamW) with recomputation none/full/selective, with documents, for GPT-2, at tp=2 with sequence
parallelism and at cp=2; dropout masks replay under recomputation; pretrain_gpt.py logs eager's
losses; the flag parses, and the dry run (meta tensors, eager's memory model) refuses it in one
line. Every case runs by default: with a cold inductor cache the file takes about 2 minutes on
2 CPU cores, most of it g++ building the generated kernels. Identical layers share one compiled
graph and every case uses tiny()'s shapes, so later cases reuse earlier graphs where they can."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtron.arguments import parse_args, to_argv
from slimtron.config import ConfigError, OptimizerConfig, ParallelConfig
from slimtron.model import GPTModel
from slimtron.optim import build_optimizer
from slimtron.parallel.data_parallel import DataParallelGrads
from slimtron.parallel.finalize_grads import allreduce_sequence_parallel_grads
from slimtron.parallel.state import ParallelState
from tests.distributed import run_distributed
from tests.test_model import batch, tiny


@pytest.fixture(scope="module", autouse=True)
def _inductor_for_tests():
    """Inductor compiles in this process, without a compile worker pool: a rank forked by
    run_distributed would otherwise hand its C++ builds to the parent's pool and wait forever.
    Training's default (a pool) is unchanged outside this module."""
    with torch._inductor.config.patch(compile_threads=1):
        yield


def _assert_rel_close(got, expected, what):
    err = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    assert err <= 1e-5, f"{what}: relative error {err:.2e}"


def _train(cfg, compile_layers, recompute=None, steps=2, segment_ids=None):
    """The losses of ``steps`` real optimizer steps on one process, the first step's gradients
    (fp32 buffer, before the optimizer) and the final weights."""
    pstate = ParallelState.single()
    model = GPTModel(cfg, pstate, recompute=recompute, compile_layers=compile_layers, seed=7)
    grads = DataParallelGrads([model], pstate, use_distributed_optimizer=True)
    optimizer = build_optimizer([model], OptimizerConfig(lr=1e-2, clip_grad=1.0,
                                                         lr_decay_style="constant"),
                                ParallelConfig(use_distributed_optimizer=True), pstate, grads,
                                train_iters=steps)
    tokens, labels = batch(cfg)
    losses, first_grads = [], None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(tokens, labels=labels, segment_ids=segment_ids).mean()
        loss.backward()
        grads.finish_grad_sync()
        if first_grads is None:
            first_grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.detach())
    return (torch.stack(losses), first_grads,
            {n: p.detach().clone() for n, p in model.named_parameters()})


def _assert_same_training(compiled, eager, what):
    """Losses of every step (the later ones after the updates) and the first step's gradients.
    Not the weights after AdamW: its m / sqrt(v) turns 1e-7 differences of near-zero gradients
    into differences of the whole learning rate, in eager against eager as well."""
    _assert_rel_close(compiled[0], eager[0], f"{what}: losses")
    for name, grad in eager[1].items():
        _assert_rel_close(compiled[1][name], grad, f"{what}: gradient of {name}")


@pytest.mark.parametrize("recompute", [None, "full", "selective"])
def test_compiled_layers_train_as_eager(recompute):
    cfg = tiny("llama")
    eager, compiled = _train(cfg, False, recompute), _train(cfg, True, recompute)
    assert not torch.equal(eager[2]["decoder.layers.0.mlp.linear_fc1.weight"],
                           _init_weights(cfg)["decoder.layers.0.mlp.linear_fc1.weight"])
    _assert_same_training(compiled, eager, f"recompute {recompute}")


def test_compiled_layers_with_documents_and_gpt():
    segments = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    cfg = tiny("llama")
    _assert_same_training(_train(cfg, True, segment_ids=segments),
                          _train(cfg, False, segment_ids=segments), "segment_ids")
    cfg = tiny("gpt2")
    _assert_same_training(_train(cfg, True), _train(cfg, False), "gpt2 (LayerNorm, GeLU, biases)")


def test_compiled_dropout_replays_under_recompute():
    """Dropout masks under compile come from inductor's generator (not eager's masks), but the
    recomputed forward must redraw the same ones: recompute full == no recompute, bit for bit."""
    cfg = tiny("gpt2", hidden_dropout=0.2, attention_dropout=0.2)
    torch.manual_seed(0)
    plain = _train(cfg, True)
    torch.manual_seed(0)
    recomputed = _train(cfg, True, "full")
    assert torch.equal(plain[0], recomputed[0])
    for name, weight in plain[2].items():
        assert torch.equal(recomputed[2][name], weight), name


def _init_weights(cfg):
    model = GPTModel(cfg, ParallelState.single(), seed=7)
    return {n: p.detach() for n, p in model.named_parameters()}


def _parallel_steps(rank, world):
    """One forward/backward, eager and compiled, at tp=2 with sequence parallelism and at cp=2
    (ring attention; each rank its local half of the sequence)."""
    cfg = tiny("llama")
    tokens, labels = batch(cfg)
    half = slice(rank * cfg.seq_length // 2, (rank + 1) * cfg.seq_length // 2)
    cases = {"tp=2+sp": (ParallelState.build(tp=world), True, tokens, labels),
             "cp=2": (ParallelState.build(cp=world), False, tokens[:, half], labels[:, half])}
    out = {}
    for case, (pstate, sp, tokens, labels) in cases.items():
        for compiled in (False, True):
            model = GPTModel(cfg, pstate, sequence_parallel=sp, compile_layers=compiled, seed=7)
            loss = model(tokens, labels=labels)
            loss.mean().backward()
            if sp:
                allreduce_sequence_parallel_grads(model, pstate.tp.group)
            out[case, compiled] = (loss.detach(),
                                   {p.global_name: p.grad for p in model.parameters()})
    return out


def test_compiled_layers_tensor_and_context_parallel():
    # both ranks compile (under a minute cold on 2 cores); a hang fails within the timeout
    for rank, out in enumerate(run_distributed(_parallel_steps, 2, timeout=300)):
        for case in ("tp=2+sp", "cp=2"):
            (loss, grads), (eager_loss, eager_grads) = out[case, True], out[case, False]
            _assert_rel_close(loss, eager_loss, f"{case} rank {rank}: loss")
            for name, grad in eager_grads.items():
                _assert_rel_close(grads[name], grad, f"{case} rank {rank}: grad of {name}")


def test_flag_parses_and_round_trips():
    config = parse_args(["--compile-layers", "--mock-data"])
    assert config.training.compile_layers
    assert "--compile-layers" in to_argv(config)
    assert not parse_args(["--mock-data"]).training.compile_layers


def test_dry_run_refuses_compile_layers():
    from slimtron.training.setup import build_training_parts

    config = parse_args(["--compile-layers", "--mock-data", "--num-layers", "2",
                         "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length",
                         "16", "--max-position-embeddings", "16", "--vocab-size", "128",
                         "--micro-batch-size", "1"]).validate(1, check_files=False)
    with pytest.raises(ConfigError, match="--compile-layers"):
        build_training_parts(config, ParallelState.single(torch.device("meta")),
                             torch.device("meta"))


LOSSES = re.compile(r"(?:lm loss|lm loss value): ([0-9.E+-]+)")


def _cli_losses(*extra):
    # tiny("llama")'s layer shapes: the training graphs come from the on-disk inductor cache the
    # tests above filled (only evaluation's inference graph compiles here); one compile thread
    # as in this process, so the cache keys agree and no worker pool starts
    out = subprocess.run(
        [sys.executable, "pretrain_gpt.py", "--preset", "tiny-llama", "--mock-data",
         "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "88",
         "--num-attention-heads", "4", "--seq-length", "16", "--max-position-embeddings", "16",
         "--vocab-size", "200", "--make-vocab-size-divisible-by", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
         "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
         "--eval-iters", "1", *extra],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return [float(v) for v in LOSSES.findall(out.stdout)]


def test_cli_training_with_compile_layers_logs_eager_losses():
    """The whole pretrain path (setup, loop, evaluation) with --compile-layers: the logged
    training and validation losses are eager's."""
    eager, compiled = _cli_losses(), _cli_losses("--compile-layers")
    assert len(eager) >= 4 and compiled == pytest.approx(eager, rel=1e-5)
