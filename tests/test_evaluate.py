"""tools/evaluate.py: the validation loss of a checkpoint, equal to a direct computation on the same
samples, in one process and under (tp, pp) = (2, 2)."""
import math
import os

import numpy as np
import pytest
import torch

from slimtron.data import IndexedDatasetBuilder, build_train_valid_test_datasets
from tests.distributed import run_distributed
from tests.test_hf_conversion import llama_config, reference_model, save_reference_checkpoint, tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, MBS, GBS, ITERS, SPLIT = 16, 2, 4, 2, "6,4,0"


evaluate_tool = tool("evaluate", "tools")


def model_config():
    cfg = llama_config()
    cfg.seq_length = SEQ
    return cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 40-document corpus (random ids ending in eod) and a tiny Llama checkpoint."""
    root = tmp_path_factory.mktemp("evaluate")
    prefix, ckpt = str(root / "corpus"), str(root / "ckpt")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    for _ in range(40):
        builder.add_document(np.append(rng.integers(3, 8000, rng.integers(10, 40)), 2)
                             .astype(np.uint16))
    builder.finalize()
    save_reference_checkpoint(ckpt, model_config(), iteration=7)
    return prefix, ckpt, str(root / "cache")


def argv(files, tp=1, pp=1):
    prefix, ckpt, cache = files
    return ["--load", ckpt, "--data-path", prefix, "--split", SPLIT, "--eval-iters", str(ITERS),
            "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
            "--data-cache-path", cache, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp)]


@torch.no_grad()
def direct_loss(files) -> float:
    """Mean over the batches of the masked mean token loss, on validation samples 0 .. n-1."""
    prefix, _, cache = files
    model = reference_model(model_config())
    n = ITERS * GBS
    valid = build_train_valid_test_datasets([prefix], SPLIT, SEQ, 1234, (0, n, n),
                                            cache_dir=cache, eod_id=2)[1]
    losses = []
    for start in range(0, n, GBS):
        samples = [valid[i] for i in range(start, start + GBS)]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
        per_token = model(batch["tokens"], position_ids=batch["position_ids"],
                          labels=batch["labels"])
        mask = batch["loss_mask"].float()
        losses.append(float((per_token * mask).sum() / mask.sum()))
    return sum(losses) / len(losses)


def _evaluate_on_ranks(rank, world, args):
    return evaluate_tool.run(evaluate_tool.parse_args(args))


def test_loss_equals_direct_computation_in_any_layout(files, capsys):
    loss = evaluate_tool.run(evaluate_tool.parse_args(argv(files)))
    printed = capsys.readouterr().out
    expected = direct_loss(files)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert f"lm loss {loss:.6E} | lm loss PPL {math.exp(loss):.6E}" in printed
    assert f"over {ITERS} batches ({ITERS * GBS * SEQ} tokens)" in printed
    on_ranks = run_distributed(_evaluate_on_ranks, 4, argv(files, tp=2, pp=2))
    assert on_ranks == pytest.approx([expected] * 4, rel=1e-5)


def test_errors_are_one_line(files, tmp_path, capsys):
    prefix, ckpt, cache = files
    empty_test_split = argv(files) + ["--eval-split", "test"]
    assert evaluate_tool.main(empty_test_split) == 1
    assert "the test split of --data-path is empty" in capsys.readouterr().err
    assert evaluate_tool.main(argv(files)[:2] + ["--data-path", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
