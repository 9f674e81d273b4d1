"""The program users run: log lines, validation, TensorBoard, NaN handling."""
import glob
import re
import subprocess
import sys


import slimtron.training.loop as loop
from slimtron.training import setup, train
from tests.distributed import run_distributed
from tests.test_training_parity import tiny_config

LINE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| "
    r"elapsed time per iteration \(ms\): [\d.]+ \| throughput per GPU \(TFLOP/s/GPU\): [\d.]+ \| "
    r"learning rate: \d\.\d{6}E[+-]\d\d \| global batch size: +(\d+) \| lm loss: (\d\.\d{6}E[+-]\d\d) \| "
    r"loss scale: [\d.]+ \| grad norm: [\d.]+ \| number of skipped iterations: +0 \| "
    r"number of nan iterations: +0 \| tokens per second: [\d.]+ \| MFU: [\d.]+% \(peak: .+\) \|$")


def test_cli_run_logs_megatron_lines_validation_and_tensorboard(tmp_path):
    tb = tmp_path / "tb"
    out = subprocess.run(
        [sys.executable, "pretrain_gpt.py", "--preset", "tiny-llama", "--mock-data",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
         "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "2", "--eval-interval", "3",
         "--eval-iters", "1", "--tensorboard-dir", str(tb), "--log-throughput"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [m for m in map(LINE.match, out.stdout.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [2, 4, 6]
    assert all(int(m.group(2)) == 6 and int(m.group(4)) == 4 for m in lines)
    assert [int(m.group(3)) for m in lines] == [8, 16, 24]
    assert float(lines[-1].group(5)) < float(lines[0].group(5))  # the loss falls
    assert out.stdout.count("validation loss at iteration") == 2
    assert re.search(r"lm loss PPL: \d\.\d{6}E\+\d\d", out.stdout)
    assert glob.glob(str(tb / "events.out.tfevents.*"))


def _train_with_nan_loss(rank, world, config):
    real = loop.make_forward_step

    def poisoned(engine, loss_scale, *rest):
        step = real(engine, loss_scale, *rest)
        return lambda chunk, batch, x: step(chunk, batch, x) * float("nan")
    loop.make_forward_step = poisoned
    engine = setup(config, world)
    seen = []
    try:
        train(engine, on_iteration=lambda it, loss, norm: seen.append(it))
    except RuntimeError as e:
        return str(e), seen, engine.state.skipped_iterations
    return None, seen, engine.state.skipped_iterations


def test_nan_losses_in_a_row_stop_the_run():
    config = tiny_config(pp=2)
    config.training.train_iters = 10
    config.optim.max_consecutive_nan_iters = 3
    message, seen, skipped = run_distributed(_train_with_nan_loss, 2, config)[0]
    assert message is not None and "NaN or inf in 3 iterations in a row" in message
    assert seen == [1, 2]  # the third NaN stops the run
    assert skipped == 3  # NaN grads: every step was skipped, no parameter moved
