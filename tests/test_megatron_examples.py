"""Megatron-LM's own example scripts (examples/megatron/, copied unchanged) run end to end on CPU
with only the program changed: slimtron's pretrain_gpt.py sits where they look for it.

Each script is shrunk with ``sed`` on its sizes only (layers, widths, sequence, batch, iterations,
parallel sizes, ranks per node, intervals); every flag stays as Megatron wrote it. The Llama-3 FP8
script is switched to bf16 through its own ``DTYPE`` variable. The GPT-3 script trains on a corpus
preprocessed with a GPT-2 vocab/merges pair (its ``--vocab-file``/``--merge-file``); the Llama
script runs its MOCK-data branch, is stopped half-way and resumed from its checkpoint, and the
resumed iterations must log the losses of an uninterrupted run.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.tokenizer_files import corpus_texts, write_gpt2_files

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "megatron"
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")

pytestmark = pytest.mark.slow


def shrink(script: Path, out: Path, expressions: list[str]) -> Path:
    """``sed`` the sizes of a copy of ``script``; each expression must change something."""
    text = script.read_text()
    for expression in expressions:
        changed = subprocess.run(["sed", "-e", expression], input=text, capture_output=True,
                                 text=True, check=True).stdout
        assert changed != text, f"sed {expression!r} changed nothing in {script.name}"
        text = changed
    out.write_text(text)
    out.chmod(0o755)
    return out


def run_script(script: Path, cwd: Path, *args, timeout=900) -> subprocess.CompletedProcess:
    """Runs the script from a directory holding slimtron's pretrain_gpt.py, as Megatron's
    scripts expect to be run from Megatron-LM's root (the Llama script reads MASTER_PORT from
    the environment)."""
    shutil.copy(REPO / "pretrain_gpt.py", cwd / "pretrain_gpt.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    # The Llama script ends with `set +x`, which exits 0 whatever torchrun did.
    failed = proc.returncode != 0 or "pretrain_gpt.py FAILED" in proc.stderr
    assert not failed, f"{script.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(output: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in LOSS.findall(output)}


def test_gpt3_175b_script_runs_on_cpu(tmp_path):
    vocab, merges = write_gpt2_files(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(300)))
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                    str(corpus), "--output-prefix", str(tmp_path / "gpt"), "--vocab-file", vocab,
                    "--merge-file", merges, "--append-eod", "--workers", "1"],
                   check=True, capture_output=True, timeout=300)
    script = shrink(EXAMPLES / "train_gpt3_175b_distributed.sh", tmp_path / "gpt3.sh", [
        "s/^GPUS_PER_NODE=8/GPUS_PER_NODE=4/",
        f"s/^MASTER_PORT=29500/MASTER_PORT={free_port()}/",
        "s/--num-layers 96/--num-layers 4/",
        "s/--hidden-size 12288/--hidden-size 64/",
        "s/--num-attention-heads 96/--num-attention-heads 4/",
        "s/--seq-length 2048/--seq-length 64/",
        "s/--max-position-embeddings 2048/--max-position-embeddings 64/",
        "s/--global-batch-size 1536/--global-batch-size 8/",
        's/"0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"/"0:4 512:8"/',
        "s/--train-iters 500000/--train-iters 4/",
        "s/--lr-decay-iters 430000/--lr-decay-iters 4/",
        "s/--tensor-model-parallel-size 8/--tensor-model-parallel-size 2/",
        "s/--pipeline-model-parallel-size 16/--pipeline-model-parallel-size 2/",
        "s/--log-interval 100/--log-interval 1/",
        "s/--save-interval 10000/--save-interval 2/",
        "s/--eval-interval 1000/--eval-interval 2/",
        "s/--eval-iters 10/--eval-iters 1/",
    ])
    proc = run_script(script, tmp_path, tmp_path / "ckpt", tmp_path / "tb", vocab, merges,
                      tmp_path / "gpt_text_document")
    out = proc.stdout + proc.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4], out[-3000:]
    assert "validation loss at iteration 2" in out
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists() or \
        any((tmp_path / "ckpt").iterdir())
    assert any((tmp_path / "tb").iterdir())


LLAMA_SIZES = [
    "s/^GPUS_PER_NODE=8/GPUS_PER_NODE=2/",
    "s/^NUM_LAYERS=32/NUM_LAYERS=2/",
    's/^DTYPE="fp8"/DTYPE="bf16"/',
    "s/^SEQ_LENGTH=8192/SEQ_LENGTH=64/",
    "s/^MAX_POSITION_EMBEDDINGS=8192/MAX_POSITION_EMBEDDINGS=64/",
    "s/^GLOBAL_BATCH_SIZE=128/GLOBAL_BATCH_SIZE=4/",
    "s/--hidden-size 4096/--hidden-size 64/",
    "s/--ffn-hidden-size 14336/--ffn-hidden-size 128/",
    "s/--num-attention-heads 32/--num-attention-heads 4/",
    "s/--num-query-groups 8/--num-query-groups 2/",
    "s/--kv-channels 128/--kv-channels 16/",
    "s/--lr-decay-samples 1949218748/--lr-decay-samples 16/",
    "s/--lr-warmup-samples 3906252/--lr-warmup-samples 4/",
    's/"--vocab-size 128256"/"--vocab-size 512"/',
    "s/--eval-iters 32/--eval-iters 1/",
    "s/--eval-interval 100/--eval-interval 2/",
    "s/--save-interval 1000/--save-interval 2/",
    "s/--profile-step-start 4/--profile-step-start 1/",
    "s/--profile-step-end 6/--profile-step-end 2/",
]


def llama_script(tmp_path: Path, name: str, train_samples: int) -> Path:
    expressions = LLAMA_SIZES + [f"s/--train-samples 1953125000/--train-samples {train_samples}/"]
    return shrink(EXAMPLES / "train_llama3_8b_h100_fp8.sh", tmp_path / name, expressions)


def test_llama3_8b_fp8_script_runs_in_bf16_and_resumes(tmp_path):
    whole = llama_script(tmp_path, "llama16.sh", 16)
    (tmp_path / "a").mkdir()
    uninterrupted = losses(run_script(whole, tmp_path / "a", tmp_path / "a" / "ckpt",
                                      tmp_path / "a" / "tb").stdout)
    assert sorted(uninterrupted) == [1, 2, 3, 4]

    (tmp_path / "b").mkdir()
    half = llama_script(tmp_path, "llama8.sh", 8)
    first = run_script(half, tmp_path / "b", tmp_path / "b" / "ckpt", tmp_path / "b" / "tb")
    assert sorted(losses(first.stdout)) == [1, 2]
    resumed = run_script(llama_script(tmp_path, "llama16b.sh", 16), tmp_path / "b",
                         tmp_path / "b" / "ckpt", tmp_path / "b" / "tb")
    after = losses(resumed.stdout)
    assert sorted(after) == [3, 4], resumed.stdout[-3000:]
    for it in (3, 4):
        assert after[it] == pytest.approx(uninterrupted[it], rel=1e-5)
    traces = [p for p in (tmp_path / "a").rglob("*") if ".json" in p.name and "ckpt" not in str(p)]
    assert traces, "--profile wrote no torch profiler trace"
