"""Faults: a killed or stalled rank ends the job (no hang), a rerun resumes from the last complete
checkpoint, gloo collectives honour the timeout, and user mistakes end in one line."""
import datetime
import multiprocessing
import os
import queue
import re
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist

from slimtron import checkpointing
from slimtron.parallel.state import ParallelState, init_distributed
from tests.distributed import free_port
from tests.launch_utils import LOADED_LINE, Job, TINY_ARGS, is_running, losses_by_iteration, \
    run_job, torchrun_single_node

# Long enough never to end by itself before the test acts on it.
FOREVER = ["--train-iters", "1000"]
TP2 = [*TINY_ARGS, "--tensor-model-parallel-size", "2", "--global-batch-size", "4"]
GUARD_S = 180  # a hang guard only: a healthy job is far quicker


def wait_until_exited(pid: int, timeout: float):
    deadline = time.monotonic() + timeout
    while is_running(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still running after {timeout}s")
        time.sleep(0.1)


# ------------------------------------------------------------------- killed rank, then resume
def test_killed_rank_stops_the_job_and_rerun_resumes_from_last_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run = [*TP2, *FOREVER, "--save", ckpt, "--save-interval", "5"]
    with Job(torchrun_single_node(2, run)) as job:
        # Right after the save at 5: the next save (10) is several iterations away.
        job.wait_for(r"\] iteration +6/", GUARD_S)
        workers = job.workers()
        os.kill(workers[1], signal.SIGKILL)
        code = job.wait(GUARD_S)
        killed_output = job.output
    assert code != 0, killed_output[-3000:]
    assert not is_running(workers[0])  # torchrun took the surviving rank down with it
    last = checkpointing.latest_iteration(ckpt)
    assert last is not None and last >= 5 and last % 5 == 0, killed_output[-3000:]
    before = losses_by_iteration(killed_output)

    rerun = [*TP2, *FOREVER, "--load", ckpt, "--exit-interval", str(last + 2)]
    code, output = run_job(torchrun_single_node(2, rerun), GUARD_S)
    assert code == 0, output[-3000:]
    loaded = LOADED_LINE.search(output)
    assert loaded and loaded.groups() == (ckpt, str(last)), output[-3000:]
    after = losses_by_iteration(output)
    assert sorted(after) == [last + 1, last + 2], output[-3000:]
    # The iterations the killed run got through after its checkpoint come out the same again.
    common = sorted(set(before) & set(after))
    assert common, (sorted(before), sorted(after))
    assert [before[i] for i in common] == [after[i] for i in common]


# --------------------------------------------------------------------- stalled rank -> timeout
def test_stalled_rank_becomes_a_timeout_error_not_a_hang():
    """A rank that stops answering (SIGSTOP: alive, silent) is what only the timeout catches."""
    run = [*TP2, *FOREVER, "--distributed-timeout-minutes", "0.1"]
    with Job(torchrun_single_node(2, run)) as job:
        job.wait_for(r"\] iteration +3/", GUARD_S)
        workers = job.workers()
        os.kill(workers[1], signal.SIGSTOP)
        try:
            wait_until_exited(workers[0], GUARD_S)
        finally:
            # torchrun's SIGTERM to the stopped rank is delivered once it runs again.
            os.kill(workers[1], signal.SIGCONT)
        code = job.wait(GUARD_S)
        output = job.output
    assert code != 0, output[-3000:]
    assert re.search(r"Timed out waiting 6000ms", output), output[-3000:]


# ------------------------------------------------------------- gloo honours a short timeout
def _timeout_rank(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_minutes=0.05)
    pstate = ParallelState.build(tp=2, timeout=datetime.timedelta(seconds=3))
    if rank == 1:
        time.sleep(600)  # never joins; the parent kills it
        return
    outcomes = []
    for name, group in (("world", None), ("tensor-parallel group", pstate.tp.group)):
        try:
            dist.all_reduce(torch.ones(1), group=group)
            outcomes.append((name, None))
        except RuntimeError as error:
            outcomes.append((name, str(error)))
    results.put(outcomes)


def test_short_timeout_applies_to_gloo_collectives():
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_timeout_rank, args=(r, port, results), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = results.get(timeout=GUARD_S)
    except queue.Empty:
        pytest.fail("rank 0 hung in an all-reduce that rank 1 never joined")
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    for name, error in outcomes:
        assert error is not None and "Timed out waiting 3000ms" in error, (name, error)


# ------------------------------------------------------------------ user mistakes: one line
def test_config_error_under_torchrun_is_one_line():
    bad = ["--preset", "tiny-llama", "--mock-data", "--tensor-model-parallel-size", "3"]
    code, output = run_job(torchrun_single_node(2, bad), GUARD_S)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: world size 2 is not divisible by "
                                "--tensor-model-parallel-size 3"), errors
    # No traceback from the workers (torchrun still prints its own failure summary).
    assert "[rank" not in output and "pretrain_gpt.py\", line" not in output, output[-3000:]
    assert "slimtron/" not in output, output[-3000:]


@pytest.mark.parametrize("argv, message", [
    (["--tensor-model-parallel-size", "3"], "error: world size 1 is not divisible by "
                                            "--tensor-model-parallel-size 3"),
    (["--load", "{ckpt}"], "error: {ckpt}/latest_checkpointed_iteration.txt: tracker file is "
                           "damaged"),
])
def test_bad_setting_or_checkpoint_exits_2_with_one_line(tmp_path, monkeypatch, capsys, argv,
                                                         message):
    import pretrain_gpt
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / checkpointing.TRACKER).write_text("not a number\n")
    argv = [a.format(ckpt=ckpt) for a in argv]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--preset", "tiny-llama", "--mock-data",
                                      "--train-iters", "1", *argv])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert pretrain_gpt.main() == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(ckpt=ckpt)), err
