"""Issue 12's training-side Megatron flags, each doing what it does in Megatron."""
import numpy as np
import pytest

from slimtron.config import ConfigError
from slimtron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


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
    import pickle
    assert pickle.loads(pickle.dumps(read)).mmap is False


# ---- batch-size schedules (pure) ---------------------------------------------------------------

from slimtron.training.batch_schedule import BatchSchedule, parse_count, parse_step_schedule  # noqa: E402


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

import math  # noqa: E402

import torch  # noqa: E402

from tests.distributed import run_distributed  # noqa: E402
from tests.test_context_parallel import UnevenLossMask  # noqa: E402
from tests.test_training_parity import assert_close_params, full_params, tiny_config  # noqa: E402

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
    elif name == "decoupled":
        o.decoupled_lr, o.decoupled_min_lr = 2 * LR, 1e-4
    elif name == "decoupled-one-step":  # Adam's first update moves each element by exactly lr
        t.train_iters = 1
        o.lr_warmup_iters, o.lr_decay_style, o.weight_decay, o.clip_grad = 0, "constant", 0.0, 0.0
        o.decoupled_lr = 5 * LR
    return config


def _train_each(rank, world, names, dist_opt):
    from slimtron.training import setup, train
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
        shards = {}
        if engine.pstate.dp_cp.rank == 0:
            for chunk in engine.model_chunks:
                for p in chunk.parameters():
                    shards[p.global_name] = (p.detach().clone(), bool(p.tensor_model_parallel),
                                             p.partition_dim, getattr(p, "partition_chunks", 1))
        moved = {name: (p.detach() - before[name]).abs().max().item()
                 for name, p in ((p.global_name, p) for c in engine.model_chunks
                                 for p in c.parameters())}
        out[name] = (engine.pstate.tp.rank, steps, shards, moved)
    return out


@pytest.fixture(scope="module")
def single_runs():
    names = ["one-micro-batch", "rampup", "decoupled", "decoupled-one-step"]
    return run_distributed(_train_each, 1, names, False, timeout=900)[0]


@pytest.fixture(scope="module")
def dp2_runs():
    return run_distributed(_train_each, 2, ["per-token", "rampup", "decoupled"], True, timeout=900)


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
