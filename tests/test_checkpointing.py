"""Checkpoints: exact resume, a save killed half-way, resharding across layouts, refusals."""
import os

import pytest

from slimtron import checkpointing
from slimtron.training import setup, train
from tests.distributed import run_distributed
from tests.test_training_parity import tiny_config

STEPS = 6


def _train(rank, world, config, kill_at_save=None):
    """Train per ``config``; return every step's (loss, grad norm). ``kill_at_save``: die (as a
    crashed node would) while writing the checkpoint of that iteration."""
    if kill_at_save is not None:
        real_write = checkpointing._write_atomic

        def dying_write(obj, path):
            if f"iter_{kill_at_save:07d}.tmp" in path and "rng_rank" in path:
                os._exit(17)
            real_write(obj, path)
        checkpointing._write_atomic = dying_write
    engine = setup(config, world)
    losses = []
    train(engine, on_iteration=lambda it, loss, norm: losses.append((it, loss, norm)))
    return losses


def run(config, world, **kw):
    return run_distributed(_train, world, config, kw.get("kill_at_save"), timeout=600)[0]


def configured(save=None, load=None, exit_interval=None, save_interval=None, **layout):
    c = tiny_config(**layout)
    c.training.train_iters = STEPS
    c.training.save, c.training.load = save, load
    c.training.save_interval, c.training.exit_interval = save_interval, exit_interval
    return c


def test_exact_resume_with_dropout(tmp_path):
    """Stopped at 3 and resumed to 6: the same losses, to the last digit, as one run (2,2,2)."""
    def cfg(**kw):
        c = configured(tp=2, pp=2, sp=True, dist_opt=True, **kw)
        c.model.hidden_dropout = c.model.attention_dropout = 0.1
        return c
    whole = run(cfg(), 8)
    ckpt = str(tmp_path / "ckpt")
    first = run(cfg(save=ckpt, save_interval=3, exit_interval=3), 8)
    assert [it for it, *_ in first] == [1, 2, 3]
    assert checkpointing.latest_iteration(ckpt) == 3
    resumed = run(cfg(save=ckpt, load=ckpt, save_interval=3), 8)
    assert [it for it, *_ in resumed] == [4, 5, 6]
    assert first + resumed == whole  # exact: same floats, not approximately
    assert checkpointing.latest_iteration(ckpt) == 6


def test_killed_save_is_never_loaded(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    whole = run(configured(), 1)
    with pytest.raises(AssertionError, match="did not report"):
        run(configured(save=ckpt, save_interval=2), 1, kill_at_save=4)
    assert checkpointing.latest_iteration(ckpt) == 2
    assert os.path.isdir(os.path.join(ckpt, "iter_0000004.tmp"))
    resumed = run(configured(save=ckpt, load=ckpt, save_interval=2), 1)
    assert resumed == whole[2:]


@pytest.mark.parametrize("src,dst", [
    ((8, dict(tp=2, pp=2, sp=True, dist_opt=True)), (1, dict())),
    ((1, dict()), (4, dict(tp=2, pp=2, dist_opt=True))),
    ((2, dict()), (2, dict(pp=2))),  # every DP rank holds the whole plain optimizer state
])
def test_reshard_continues_with_the_same_losses(tmp_path, src, dst):
    reference = run(configured(), 1)
    ckpt = str(tmp_path / "ckpt")
    (w1, l1), (w2, l2) = src, dst
    run(configured(save=ckpt, save_interval=3, exit_interval=3, **l1), w1)
    resumed = run(configured(load=ckpt, **l2), w2)
    assert [it for it, *_ in resumed] == [4, 5, 6]
    for (it, loss, norm), (_, ref_loss, ref_norm) in zip(resumed, reference[3:]):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at {it}"
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"grad norm at {it}"


def _load_only(rank, world, config):
    setup(config, world)


def test_refuses_other_model_and_damaged_files(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run(configured(save=ckpt, save_interval=1, exit_interval=1), 1)
    other = configured(load=ckpt)
    other.model.ffn_hidden_size = 96
    with pytest.raises(AssertionError, match="different model: ffn_hidden_size is 64 there and 96"):
        run_distributed(_load_only, 1, other)

    model_file = os.path.join(ckpt, "iter_0000001", checkpointing.model_file(0, 0))
    data = open(model_file, "rb").read()
    with open(model_file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(AssertionError, match=r"model_tp00_pp000.pt is damaged"):
        run_distributed(_load_only, 1, configured(load=ckpt))

    with open(os.path.join(ckpt, checkpointing.TRACKER), "w") as f:
        f.write("7\n")
    with pytest.raises(ValueError, match="names iteration 7 but"):
        checkpointing.latest_iteration(ckpt)


def test_finetune_and_no_load_optim(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    scratch = run(configured(), 1)
    run(configured(save=ckpt, save_interval=3, exit_interval=3), 1)

    tuned = configured(load=ckpt)
    tuned.training.finetune = True
    finetuned = run(tuned, 1)
    assert [it for it, *_ in finetuned] == [1, 2, 3, 4, 5, 6]  # weights only: a new run
    assert finetuned[0][1] < scratch[0][1] - 0.05  # ... from trained weights, on the same batch

    fresh_optim = configured(load=ckpt)
    fresh_optim.training.no_load_optim = True
    continued = run(fresh_optim, 1)
    assert [it for it, *_ in continued] == [4, 5, 6]  # iteration and data position are kept
    assert continued[0][1] == pytest.approx(scratch[3][1], rel=1e-5)  # same weights, same batch
    assert continued[1][1] != pytest.approx(scratch[4][1], rel=1e-6)  # but Adam starts afresh
