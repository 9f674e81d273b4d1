"""Checkpoints: exact resume, resharding across layouts (both ways, with and without the
distributed optimizer), a killed save, async saves, format 1, refusals."""
import json
import os
import signal
import threading

import pytest
import torch

from slimtron import checkpointing
from slimtron.checkpointing import dist_format
from slimtron.training import setup, train
from tests.distributed import run_distributed
from tests.test_hf_conversion import tool
from tests.test_training_parity import tiny_config

STEPS = 6


def _train(rank, world, config, kill_at_save=None):
    """Train per ``config``; return every step's (iteration, loss, grad norm). ``kill_at_save``:
    die (as a crashed node would) half-way through writing that iteration's shard file."""
    if kill_at_save is not None:
        real_write = dist_format.write_chunks

        def dying_write(path, chunks):
            if f"iter_{kill_at_save:07d}.tmp" in path:
                real_write(path, chunks[:len(chunks) // 2])
                os._exit(17)
            return real_write(path, chunks)
        dist_format.write_chunks = dying_write
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


def assert_continues(resumed, reference, first_iteration, last_iteration=STEPS):
    assert [it for it, *_ in resumed] == list(range(first_iteration, last_iteration + 1))
    for (it, loss, norm), (_, ref_loss, ref_norm) in zip(resumed, reference[first_iteration - 1:]):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at {it}"
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"grad norm at {it}"


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


def test_reshard_both_ways_continues_with_the_same_losses(tmp_path):
    """Saved at (tp, pp, dp) = (2, 2, 2) with SP and the distributed optimizer, loaded at
    (1, 1, 1), (2, 1, 4) and (1, 2, 2) without the distributed optimizer; that last run saves
    again, and (2, 2, 2) loads it back."""
    reference = run(configured(), 1)
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    run(configured(save=big, save_interval=3, exit_interval=3, tp=2, pp=2, sp=True,
                   dist_opt=True), 8)
    assert_continues(run(configured(load=big), 1), reference, 4)
    assert_continues(run(configured(load=big, tp=2, dist_opt=True), 8), reference, 4)
    plain = run(configured(load=big, save=small, save_interval=4, exit_interval=4, pp=2), 4)
    assert_continues(plain, reference, 4, last_iteration=4)
    back = run(configured(load=small, tp=2, pp=2, sp=True, dist_opt=True), 8)
    assert_continues(back, reference, 5)


def test_context_parallel_checkpoint_loads_without_it(tmp_path):
    """cp=2 with the distributed optimizer (sharded over dp x cp; weights replicated over cp):
    loaded by one process, the run goes on with the same losses."""
    reference = run(configured(), 1)
    ckpt = str(tmp_path / "ckpt")
    saved = configured(save=ckpt, save_interval=3, exit_interval=3, dist_opt=True)
    saved.parallel.context_parallel_size = 2
    run(saved, 2)
    assert_continues(run(configured(load=ckpt), 1), reference, 4)


def test_tied_embedding_across_stages(tmp_path):
    """GPT-2 (tied embeddings: the last stage holds a copy, written once) saved at pp=2 with the
    distributed optimizer goes on at (1, 1, 1) with the same losses."""
    reference = run(configured(arch="gpt2"), 1)
    ckpt = str(tmp_path / "ckpt")
    run(configured(save=ckpt, save_interval=3, exit_interval=3, arch="gpt2", pp=2,
                   dist_opt=True), 2)
    assert_continues(run(configured(load=ckpt, arch="gpt2"), 1), reference, 4)


def test_killed_save_is_never_loaded(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    whole = run(configured(), 1)
    with pytest.raises(AssertionError, match="did not report"):
        run(configured(save=ckpt, save_interval=2), 1, kill_at_save=4)
    assert checkpointing.latest_iteration(ckpt) == 2
    assert os.path.isdir(os.path.join(ckpt, "iter_0000004.tmp"))
    resumed = run(configured(save=ckpt, load=ckpt, save_interval=2), 1)
    assert resumed == whole[2:]


# ------------------------------------------------------------------------------- async save
def _async_run(rank, world, config, mode):
    """``mode`` "held": the background write of iteration 2 waits until step 3 has run, which
    records whether iteration 2 was committed by then. "kill": SIGKILL half-way through the
    background write of iteration 4."""
    real_write = dist_format.write_chunks
    step3_done = threading.Event()
    seen = {}

    def held_write(path, chunks):
        if "iter_0000002.tmp" in path:
            assert step3_done.wait(timeout=120), "step 3 never ran while the save was written"
        return real_write(path, chunks)

    def killed_write(path, chunks):
        if "iter_0000004.tmp" in path:
            real_write(path, chunks[:len(chunks) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, chunks)

    dist_format.write_chunks = held_write if mode == "held" else killed_write

    def on_iteration(it, loss, norm):
        losses.append((it, loss, norm))
        if it == 3:
            seen["latest_during_step_3"] = checkpointing.latest_iteration(config.training.save)
            step3_done.set()

    engine = setup(config, world)
    losses = []
    train(engine, on_iteration=on_iteration)
    return losses, seen


def _files(ckpt_dir):
    """Bytes of every shard file, the metadata, and the loaded common (but its config) and RNG
    files."""
    out = {}
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name.endswith(".bin"):
            out[name] = open(path, "rb").read()
        elif name == dist_format.METADATA_FILE:
            out[name] = json.load(open(path))
        else:
            loaded = torch.load(path, weights_only=True)
            if name == "common.pt":
                loaded.pop("config")  # the runs differ in --save and --async-save
            out[name] = repr(loaded)
    return out


def test_async_save_format_1_and_a_kill_during_the_background_write(tmp_path):
    """dp=2 with the distributed optimizer, saves at 2, 4, 6. Async: training goes on while the
    write runs, and the files equal a synchronous save's. SIGKILL during the background write of
    4 leaves 2 newest, and resuming from it gives the same floats. A format-1 checkpoint (the
    --ckpt-format torch writer) resumes exactly too."""
    def cfg(ckpt, **kw):
        c = configured(save=str(tmp_path / ckpt), save_interval=2, dist_opt=True, **kw)
        return c
    sync = run(cfg("sync"), 2)
    async_cfg = cfg("async")
    async_cfg.training.async_save = True
    (losses, seen), _ = run_distributed(_async_run, 2, async_cfg, "held", timeout=600)
    assert losses == sync
    assert seen["latest_during_step_3"] is None  # iteration 2 was still being written
    for it in (2, 4, 6):
        name = f"iter_{it:07d}"
        assert _files(str(tmp_path / "async" / name)) == _files(str(tmp_path / "sync" / name))

    killed = cfg("killed")
    killed.training.async_save = True
    with pytest.raises(AssertionError, match="did not report"):
        run_distributed(_async_run, 2, killed, "kill", timeout=600)
    assert checkpointing.latest_iteration(str(tmp_path / "killed")) == 2
    resumed = run(cfg("killed", load=str(tmp_path / "killed")), 2)
    assert resumed == sync[2:]

    old = cfg("v1", exit_interval=2)
    old.training.ckpt_format = "torch"
    run(old, 2)
    ckpt_dir, common = checkpointing.load_common(str(tmp_path / "v1"))
    assert common["format_version"] == 1 and "model_tp00_pp000.pt" in os.listdir(ckpt_dir)
    assert run(cfg("v1", load=str(tmp_path / "v1")), 2) == sync[2:]


# ------------------------------------------------------------------------------- refusals
def _load_only(rank, world, config):
    setup(config, world)


def test_refuses_other_model_and_damaged_files(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    run(configured(save=ckpt, save_interval=1, exit_interval=1), 1)
    other = configured(load=ckpt)
    other.model.ffn_hidden_size = 96
    with pytest.raises(AssertionError, match="different model: ffn_hidden_size is 64 there and 96"):
        run_distributed(_load_only, 1, other)

    inspect = tool("inspect_checkpoint")
    assert inspect.main([ckpt, "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "iteration        1 (8 samples consumed)" in printed and "verify           ok" in printed
    assert "shard_00000.bin" in printed and "tp=1 pp=1 dp=1 cp=1 world=1" in printed

    ckpt_dir = os.path.join(ckpt, "iter_0000001")
    shard = os.path.join(ckpt_dir, dist_format.shard_file(0))
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    assert inspect.main([ckpt, "--verify"]) == 1
    assert "shard_00000.bin is damaged" in capsys.readouterr().err
    with pytest.raises(AssertionError, match=r"shard_00000.bin is damaged: \d+ bytes, "
                                             r"metadata.json says \d+"):
        run_distributed(_load_only, 1, configured(load=ckpt))
    os.remove(shard)
    with pytest.raises(AssertionError, match=r"shard_00000.bin is missing"):
        run_distributed(_load_only, 1, configured(load=ckpt))
    with open(os.path.join(ckpt_dir, dist_format.METADATA_FILE), "w") as f:
        f.write('{"entries": ')
    with pytest.raises(AssertionError, match=r"metadata.json is damaged"):
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
