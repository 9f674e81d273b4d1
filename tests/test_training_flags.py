"""Issue 12's training-side Megatron flags, each doing what it does in Megatron."""
import gzip
import json
import math
import os
import pickle
import re
import signal
import sys

import numpy as np
import pytest
import torch

from slimtron.config import ConfigError
from slimtron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from slimtron.training.batch_schedule import BatchSchedule, parse_count, parse_step_schedule
from tests.distributed import run_distributed
from tests.launch_utils import (LOADED_LINE, TINY_ARGS, Job, losses_by_iteration, run_job,
                                torchrun_single_node)
from tests.test_context_parallel import UnevenLossMask
from tests.test_training_parity import assert_close_params, full_params, tiny_config


# ---- --no-mmap-bin-files ---------------------------------------------------------------------

def test_no_mmap_reads_the_same_tokens(tmp_path):
    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 60000, size=n) for n in (5, 1, 17, 9)]
    for tokens in documents:
        builder.add_document(tokens)
    builder.finalize()
    mapped, read = IndexedDataset(prefix), IndexedDataset(prefix, mmap=False)
    assert read._bin_map.size == 0  # nothing mapped
    for i, tokens in enumerate(documents):
        assert np.array_equal(read[i], tokens) and np.array_equal(read[i], mapped[i])
        if len(tokens) > 4:
            assert np.array_equal(read.get(i, 1, 3), tokens[1:4])
    assert pickle.loads(pickle.dumps(read)).mmap is False


# ---- batch-size schedules (pure) ---------------------------------------------------------------


def test_step_schedule_thresholds_are_tokens_with_suffixes():
    # Megatron's GPT-3 example, at its --seq-length 2048.
    schedule = parse_step_schedule("0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536", 2048)
    assert schedule[:2] == [(0, 16), (2_400_000_000 // 2048, 320)] and schedule[-1][1] == 1536
    batch = BatchSchedule(1536, 1, 16, steps=schedule)
    assert batch.num_microbatches(0) == 1 and batch.global_batch_size(1171874) == 16
    assert batch.global_batch_size(1171875) == 320 and batch.num_microbatches(1171875) == 20
    assert parse_count("1.5K", "x") == 1500 and parse_count("7", "x") == 7
    for text, message in [("16:8", "first threshold must be 0"), ("0:8 x:16", "not a number"),
                          ("0:8 10", "THRESHOLD:BATCH_SIZE"), ("0:8 0:16", "must increase")]:
        with pytest.raises(ConfigError, match=message):
            parse_step_schedule(text, 1)


def test_rampup_grows_in_equal_sample_intervals():
    # Megatron's example: start 16, increment 8, 300000 samples to reach 1024 (126 increments).
    batch = BatchSchedule(1024, 1, 8, rampup=[16, 8, 300000])
    per_increment = 300000 / 126
    assert batch.global_batch_size(0) == 16
    assert batch.global_batch_size(int(per_increment) + 1) == 24
    assert batch.global_batch_size(300000) == 1024 - 8 * (126 - int(300000 / per_increment))
    assert batch.global_batch_size(300001) == 1024
    with pytest.raises(ConfigError, match="not divisible by --micro-batch-size x data-parallel"):
        BatchSchedule(64, 1, 16, rampup=[8, 8, 100]).num_microbatches(0)
    with pytest.raises(ConfigError, match="multiple of the increment"):
        BatchSchedule(30, 1, 1, rampup=[8, 8, 100])


def test_train_samples_to_iterations_as_megatron():
    assert BatchSchedule(8, 1, 1).iterations_for(100) == 12  # the partial last batch is dropped
    ramp = BatchSchedule(8, 1, 1, rampup=[2, 2, 20])
    sizes, consumed = [], 0
    while consumed <= 20:
        sizes.append(ramp.global_batch_size(consumed))
        consumed += sizes[-1]
    assert sizes == [2, 2, 2, 2, 4, 4, 6] and consumed == 22
    assert ramp.iterations_for(100) == len(sizes) + (100 - 22) // 8
    steps = BatchSchedule(8, 1, 1, steps=[(0, 4), (10, 8)])
    assert steps.iterations_for(30) == 6  # 4 4 4 8 8 8: the last step starts at 28 < 30
    assert steps.samples_after(5) == 28


# ---- through the real training step: per-token loss, ramp-up, decoupled lr --------------------


LR = 3e-3


def flags_config(name: str, dist_opt: bool = False):
    """The parity model (fp32, no dropout) under one of the flags."""
    config = tiny_config(dist_opt=dist_opt)
    t, o = config.training, config.optim
    if name == "per-token":
        t.micro_batch_size, t.global_batch_size = 1, 4
        t.calculate_per_token_loss = True
    elif name == "one-micro-batch":  # per-token's reference: one micro-batch holds every token
        t.micro_batch_size, t.global_batch_size = 4, 4
    elif name == "rampup":
        t.micro_batch_size, t.global_batch_size = 1, 4
        t.train_iters, t.train_samples, t.rampup_batch_size = None, 20, [2, 2, 8]
        o.lr_warmup_iters, o.lr_warmup_samples, o.lr_decay_style = 0, 4, "cosine"
    elif name in ("decoupled", "decoupled-bf16-grads"):
        o.decoupled_lr, o.decoupled_min_lr = 2 * LR, 1e-4
        config.parallel.grad_reduce_in_bf16 = name == "decoupled-bf16-grads"
    elif name == "decoupled-one-step":  # Adam's first update moves each element by exactly lr
        t.train_iters = 1
        o.lr_warmup_iters, o.lr_decay_style, o.weight_decay, o.clip_grad = 0, "constant", 0.0, 0.0
        o.decoupled_lr = 5 * LR
    return config


def _train_each(rank, world, names, dist_opt):
    from slimtron.training import setup, train
    from tests.test_training_parity import local_shards
    out = {}
    for name in names:
        engine = setup(flags_config(name, dist_opt), world)
        train_set, *rest = engine.datasets
        engine.datasets = (None if train_set is None else UnevenLossMask(train_set), *rest)
        before = {p.global_name: p.detach().clone() for c in engine.model_chunks
                  for p in c.parameters()}
        steps = []
        train(engine, on_iteration=lambda it, loss, norm: steps.append(
            (loss, norm, engine.optimizer.get_lr(), engine.state.consumed_train_samples)))
        shards = local_shards(engine)
        moved = {name: (p.detach() - before[name]).abs().max().item()
                 for name, p in ((p.global_name, p) for c in engine.model_chunks
                                 for p in c.parameters())}
        grad_dtypes = {buffer.grad_data.dtype for buffer in engine.grads.buffers}
        out[name] = (engine.pstate.tp.rank, steps, shards, moved, grad_dtypes)
    return out


@pytest.fixture(scope="module")
def single_runs():
    names = ["one-micro-batch", "rampup", "decoupled", "decoupled-one-step"]
    return run_distributed(_train_each, 1, names, False, timeout=900)[0]


@pytest.fixture(scope="module")
def dp2_runs():
    names = ["per-token", "rampup", "decoupled", "decoupled-bf16-grads"]
    return run_distributed(_train_each, 2, names, True, timeout=900)


def _same_training(results, reference):
    steps = results[-1][1]
    ref_steps = reference[1]
    assert len(steps) == len(ref_steps)
    for i, ((loss, norm, *_), (ref_loss, ref_norm, *_)) in enumerate(zip(steps, ref_steps), 1):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {i}"
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"grad norm at step {i}"
    assert_close_params(full_params([r[:3] for r in results]), full_params([reference[:3]]))


def test_per_token_loss_weighs_every_token_of_the_global_batch(single_runs, dp2_runs):
    # dp=2 x 2 micro-batches of uneven token counts, summed and divided by the global count,
    # equals one process whose single micro-batch is the whole global batch.
    _same_training([run["per-token"] for run in dp2_runs], single_runs["one-micro-batch"])


def test_rampup_changes_micro_batches_sampler_and_lr_with_consumed_samples(single_runs, dp2_runs):
    _same_training([run["rampup"] for run in dp2_runs], single_runs["rampup"])
    steps = single_runs["rampup"][1]
    # --train-samples 20, --rampup-batch-size 2 2 8, --global-batch-size 4: batches of 2 until 8
    # samples are consumed, then 4 (Megatron's iteration count: 5 ramp steps + 2).
    consumed = [c for *_, c in steps]
    assert consumed == [2, 4, 6, 8, 12, 16, 20]
    # The lr counts samples: linear warm-up over 4, cosine decay to 20 (lr of the update made).
    before = [0] + consumed[:-1]
    expected = [LR * n / 4 if n <= 4 else 3e-4 + (LR - 3e-4) * 0.5 * (1 + math.cos(
        math.pi * (n - 4) / 16)) for n in before]
    assert [lr for _, _, lr, _ in steps] == pytest.approx(expected, rel=1e-9)


def test_decoupled_lr_drives_the_embedding_and_output_layer_only(single_runs, dp2_runs):
    _same_training([run["decoupled"] for run in dp2_runs], single_runs["decoupled"])
    moved = single_runs["decoupled-one-step"][3]
    for name, step in moved.items():
        expected = 5 * LR if name in ("embedding.word_embeddings.weight",
                                      "output_layer.weight") else LR
        assert step == pytest.approx(expected, rel=1e-3), name


# ---- the program: SIGTERM, profiler, start-up report, refusals ---------------------------------


DP2 = [*TINY_ARGS, "--global-batch-size", "4", "--train-iters", "8"]
GUARD_S = 300  # a hang guard only


def test_sigterm_saves_and_exits_zero_and_the_rerun_resumes_exactly(tmp_path):
    # The uninterrupted run, which also profiles steps [2, 4) and reports flags without effect.
    tb = tmp_path / "tb"
    reference = [*DP2, "--profile", "--profile-step-start", "2", "--profile-step-end", "4",
                 "--tensorboard-dir", str(tb), "--overlap-param-gather",
                 "--use-mcore-models", "--log-throughput"]
    code, output = run_job(torchrun_single_node(2, reference), GUARD_S)
    assert code == 0, output[-3000:]
    expected = losses_by_iteration(output)
    assert sorted(expected) == list(range(1, 9))
    assert output.count("no effect on this device: --overlap-param-gather\n") == 1
    assert "throughput per GPU (TFLOP/s/GPU)" in output
    trace = json.load(gzip.open(tmp_path / "torch_profile" / "rank-0.json.gz"))
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep")}
    assert len(steps) == 2, steps  # --profile-step-end - --profile-step-start steps recorded
    assert not (tmp_path / "torch_profile" / "rank-1.json.gz").exists()  # --profile-ranks 0

    # SIGTERM to one rank: every rank finishes the step, they save together, exit code 0.
    ckpt = str(tmp_path / "ckpt")
    with Job(torchrun_single_node(2, [*DP2, "--exit-signal-handler", "--save", ckpt,
                                      "--save-interval", "100"])) as job:
        job.wait_for(r"\] iteration +3/", GUARD_S)
        os.kill(job.workers()[1], signal.SIGTERM)
        code = job.wait(GUARD_S)
        stopped = job.output
    assert code == 0, stopped[-3000:]
    exited = re.search(r"exiting at iteration (\d+): received SIGTERM", stopped)
    assert exited, stopped[-3000:]
    last = int(exited.group(1))
    assert 3 <= last < 8 and f"saved checkpoint at iteration {last:7d}" in stopped
    assert "validation loss" not in stopped.split("received SIGTERM")[1]  # no test evaluation

    code, resumed = run_job(torchrun_single_node(2, [*DP2, "--load", ckpt]), GUARD_S)
    assert code == 0, resumed[-3000:]
    assert LOADED_LINE.search(resumed).groups() == (ckpt, str(last))
    after = losses_by_iteration(resumed)
    assert sorted(after) == list(range(last + 1, 9))
    assert all(after[i] == expected[i] for i in after), (after, expected)


def test_exit_duration_and_manual_gc_decisions():
    import gc

    from slimtron.config import Config
    from slimtron.parallel.state import ParallelState
    from slimtron.training.run_control import RunControl
    config = Config()
    config.training.exit_duration_in_mins = 1e-6
    config.training.manual_gc = True
    control = RunControl(config, ParallelState.single())
    try:
        assert not gc.isenabled()  # collections only where the loop asks for them
        assert "--exit-duration-in-mins" in control.exit_reason()
    finally:
        control.close()
    assert gc.isenabled()
    config.training.exit_duration_in_mins, config.training.manual_gc = 60.0, False
    control = RunControl(config, ParallelState.single())
    assert control.exit_reason() is None
    control.close()


def test_megatron_flags_accepted_reported_or_refused():
    from slimtron.arguments import parse_args
    base = ["--preset", "tiny-llama", "--mock-data"]
    cfg = parse_args([*base, "--use-mcore-models", "--no-create-attention-mask-in-dataloader",
                      "--cross-entropy-loss-fusion", "--overlap-param-gather",
                      "--attention-backend", "fused", "--split", "'99,1,0'"])
    assert cfg.training.no_effect_flags == ["--overlap-param-gather"]
    assert cfg.model.attention_backend == "fused"
    from slimtron.data.gpt_dataset import parse_split
    assert parse_split(cfg.data.split) == pytest.approx([0.99, 0.01, 0.0])
    with pytest.raises(ConfigError, match=r"^unsupported flags: --moe-router-topk --foo "):
        parse_args([*base, "--moe-router-topk", "2", "--foo=1"])
    with pytest.raises(ConfigError, match="--fp8-format hybrid: .* train in --bf16 instead"):
        parse_args([*base, "--fp8-format", "hybrid"]).validate(1, check_files=False)
    for extra, message in [
        (["--train-samples", "100", "--train-iters", "5"], "--train-iters and --train-samples"),
        (["--lr-decay-samples", "10"], "--lr-decay-samples needs sample-based training"),
        (["--rampup-batch-size", "2", "2", "8"], "--rampup-batch-size needs sample-based"),
        (["--train-samples", "100", "--lr-warmup-iters", "2"], "--lr-warmup-iters is iteration"),
        (["--step-batch-size-schedule", "0:2 1K:4", "--global-batch-size", "8"],
         "differs from the last batch size 4"),
        (["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr needs --decoupled-lr"),
        (["--wandb-exp-name", "x"], "need --wandb-project"),
        (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"], "--profile needs"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_args([*base, *extra]).validate(2, check_files=False)
    # Megatron's GPT-3 example passes --global-batch-size equal to the schedule's last batch.
    gpt3 = parse_args([*base, "--step-batch-size-schedule", "0:2 1K:4", "--global-batch-size",
                       "4", "--seq-length", "64"]).validate(2, check_files=False)
    assert gpt3.training.global_batch_size == 4


def test_wandb_missing_is_one_line(monkeypatch):
    from slimtron.arguments import parse_args
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without it
    with pytest.raises(ConfigError, match=r"--wandb-project: the wandb package is not installed"):
        parse_args(["--mock-data", "--wandb-project", "p", "--wandb-exp-name", "e"]).validate(
            1, check_files=False)


def _train_with_wandb(rank, world, directory):
    os.environ["WANDB_MODE"] = "offline"  # no network, no account
    from slimtron.training import setup, train
    config = tiny_config()
    config.training.train_iters, config.training.log_interval = 2, 1
    config.training.wandb_project, config.training.wandb_exp_name = "slimtron-test", "tiny"
    config.training.wandb_save_dir = directory
    losses = []
    train(setup(config, world), on_iteration=lambda it, loss, norm: losses.append(loss))
    return losses


def test_wandb_logs_offline(tmp_path):
    pytest.importorskip("wandb")
    losses = run_distributed(_train_with_wandb, 1, str(tmp_path), timeout=600)[0]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The run file holds each logged scalar as its JSON text (protobuf records, uncompressed).
    data = runs[0].read_bytes()
    assert b"lm loss" in data and b"learning rate" in data
    for loss in losses:
        assert json.dumps(loss).encode() in data, loss


def test_grad_reduce_in_bf16_reduces_bf16_buffers(single_runs, dp2_runs):
    fp32, bf16 = single_runs["decoupled"], dp2_runs[0]["decoupled-bf16-grads"]
    assert fp32[4] == {torch.float32} and bf16[4] == {torch.bfloat16}
    # The same first loss (before any update); then bf16-rounded gradients, close but not equal.
    losses, ref = [step[0] for step in bf16[1]], [step[0] for step in fp32[1]]
    assert losses[0] == pytest.approx(ref[0], rel=1e-6)
    assert losses == pytest.approx(ref, rel=1e-2) and losses != pytest.approx(ref, rel=1e-7)


def test_lr_lengths_as_megatron():
    from slimtron.config import Config
    from slimtron.training.setup import build_lr_scheduler
    config = Config()
    config.optim.lr, config.optim.lr_warmup_fraction, config.optim.lr_decay_iters = 1.0, 0.25, 10
    config.validate(1, check_files=False)
    batch = BatchSchedule.from_config(config.training, 1, config.model.seq_length)
    iterations = build_lr_scheduler(config, batch)  # a fraction of the decay, not rounded
    assert (iterations.unit, iterations.warmup_iters, iterations.lr_at(1)) == \
        ("iterations", 2.5, pytest.approx(0.4))
    config.training.train_iters, config.training.train_samples = None, 64
    config.optim.lr_decay_iters, config.optim.lr_decay_samples = None, 40
    config.training.global_batch_size = 4
    config.validate(1, check_files=False)
    assert config.training.train_iters == 16
    samples = build_lr_scheduler(config, BatchSchedule.from_config(config.training, 1, 64))
    assert (samples.unit, samples.warmup_iters, samples.decay_iters) == ("samples", 10.0, 40)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_prefetcher_follows_the_batch_schedule(num_workers):
    from slimtron.data.mock_dataset import MockGPTDataset
    from slimtron.parallel.state import ParallelState
    from slimtron.training.data import MicroBatchPrefetcher, microbatches_for
    config = flags_config("rampup")
    config.data.num_workers = num_workers
    config.validate(1, check_files=False)
    batch = BatchSchedule.from_config(config.training, 1, config.model.seq_length)
    dataset = MockGPTDataset(20, config.model.seq_length, config.model.vocab_size, seed=3)
    pstate = ParallelState.single()
    prefetcher = MicroBatchPrefetcher(dataset, config, pstate, batch.num_microbatches(0), batch)
    try:
        first, counts = 0, []
        while first < 20:  # batches of 2 until 8 samples, then 4: each step's are the next
            got = prefetcher.get(first)
            expected = microbatches_for(dataset, first, config, pstate, batch.num_microbatches(first))
            counts.append(len(got))
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert all(torch.equal(a[k], b[k]) for k in b)
            first += batch.global_batch_size(first)
        assert counts == [2, 2, 2, 2, 4, 4, 4]
    finally:
        prefetcher.close()
