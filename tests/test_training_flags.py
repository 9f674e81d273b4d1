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
