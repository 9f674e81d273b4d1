"""Per-step overhead and start-up that do not grow with scale.

- Initialisation draws only a rank's own shard, and every TP layout gets the single-process values;
  a model a checkpoint will fill is built on the meta device and only given storage.
- One training step: device->host synchronisations (Tensor.item / tolist / cpu on the step's
  tensors) at most two and constant in the number of micro-batches and of parameter tensors;
  optimizer-side dispatched ops (TorchDispatchMode) constant in the number of parameter tensors.
"""
from __future__ import annotations

import collections
import contextlib
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slimtron.config import ModelConfig, OptimizerConfig, ParallelConfig
from slimtron.model import init
from slimtron.optim import build_optimizer
from slimtron.parallel.data_parallel import DataParallelGrads
from slimtron.parallel.sharding import shard
from slimtron.parallel.state import ParallelState


# ---- counting -----------------------------------------------------------------------------------
SYNC_OPS = {"aten._local_scalar_dense.default"}  # what Tensor.item / float() / bool() dispatch


class StepCounter(TorchDispatchMode):
    """Dispatched ops by name, and synchronisations: scalar reads (aten._local_scalar_dense, the op
    behind item(), float(), bool()) plus Python-level tolist() and cpu()/to("cpu") calls, which
    read a tensor's data without dispatching such an op. ``dispatch=False`` counts only the
    Python-level reads (item, float, int, bool too), on the main thread: much faster."""

    PYTHON_READS = ("tolist", "cpu")
    SCALAR_READS = ("item", "__float__", "__int__", "__bool__")

    def __init__(self, dispatch: bool = True):
        super().__init__()
        self.dispatch = dispatch
        self.ops = collections.Counter()
        self.python_syncs = collections.Counter()
        self._thread = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(self.ops[op] for op in SYNC_OPS) + sum(self.python_syncs.values())

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @contextlib.contextmanager
    def watching(self, monkeypatch):
        names = self.PYTHON_READS + (() if self.dispatch else self.SCALAR_READS)
        for name in names:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._recording(name, real))
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                self._record("to(cpu)")
            return real_to(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", to)
        try:
            with self if self.dispatch else contextlib.nullcontext():
                yield self
        finally:
            monkeypatch.undo()

    def _record(self, name: str) -> None:
        if threading.get_ident() == self._thread:
            self.python_syncs[name] += 1

    def _recording(self, name, real):
        def method(tensor, *args, **kwargs):
            self._record(name)
            return real(tensor, *args, **kwargs)
        return method


# ---- optimizer side -----------------------------------------------------------------------------
class ManyTensors(torch.nn.Module):
    """``count`` parameter tensors: matrices and vectors alternating (decay and no-decay groups)."""

    def __init__(self, count: int, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(count)
        self.weights = torch.nn.ParameterList()
        for i in range(count):
            shape = (4, 4) if i % 2 == 0 else (4,)
            param = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
            param.global_name, param.tensor_model_parallel = f"p{i}", False
            self.weights.append(param)

    def forward(self, x):
        for w in self.weights:
            x = torch.tanh(x @ w) if w.ndim == 2 else x * w
        return x


def _optimizer_step_counts(monkeypatch, count: int, precision: str, dist_opt: bool):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = ManyTensors(count, dtype)
    grads = DataParallelGrads([model], ParallelState.single(), bucket_size=64,
                              use_distributed_optimizer=dist_opt)
    config = OptimizerConfig(lr=1e-3, clip_grad=1.0, weight_decay=0.1, lr_decay_style="constant",
                             bf16=precision == "bf16", fp16=precision == "fp16",
                             initial_loss_scale=1024.0)
    opt = build_optimizer([model], config, ParallelConfig(use_distributed_optimizer=dist_opt),
                          ParallelState.single(), grads, train_iters=10)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    counts = []
    for _ in range(2):  # the first step creates Adam's state; the second is a steady step
        opt.zero_grad()
        opt.scale_loss(model(x).float().pow(2).mean()).backward()
        grads.finish_grad_sync()
        counter = StepCounter()
        with counter.watching(monkeypatch):
            ok, norm, _ = opt.step()
        assert ok and torch.isfinite(norm)
        counts.append(counter)
    return counts[-1]


@pytest.mark.parametrize("precision,dist_opt", [("fp32", False), ("bf16", True), ("fp16", False)])
def test_optimizer_step_ops_and_syncs_do_not_grow_with_parameter_tensors(monkeypatch, precision,
                                                                          dist_opt):
    few, many = (_optimizer_step_counts(monkeypatch, n, precision, dist_opt) for n in (10, 100))
    assert few.ops == many.ops, (few.ops, many.ops)
    # bf16 checks nothing (as Megatron); fp16 and fp32 read one overflow flag.
    assert few.syncs == many.syncs == (0 if precision == "bf16" else 1), many.ops


# ---- initialisation -----------------------------------------------------------------------------
def _config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=300,
                make_vocab_size_divisible_by=128)
    base.update(overrides)
    return ModelConfig(**base)


class _CountDraws:
    """Counts the normal values drawn by init (its one drawing function, wrapped)."""

    def __init__(self, monkeypatch):
        self.values = 0
        real = init._normal

        def counted(shape, std, generator):
            out = real(shape, std, generator)
            self.values += out.numel()
            return out
        monkeypatch.setattr(init, "_normal", counted)


CASES = [  # (name, full shape, partition dim, chunks)
    ("decoder.layers.0.mlp.linear_fc1.weight", (256, 64), 0, 2),  # SwiGLU [gate; up]
    ("decoder.layers.0.mlp.linear_fc2.weight", (64, 128), 1, 1),  # row-parallel
    ("decoder.layers.1.self_attention.linear_qkv.weight", (192, 64), 0, 1),
]


@pytest.mark.parametrize("name,full_shape,dim,chunks", CASES)
def test_each_rank_draws_only_its_shard_of_the_single_process_value(monkeypatch, name, full_shape,
                                                                     dim, chunks):
    cfg = _config()
    full = init.initial_shard(name, full_shape, cfg, seed=5, dim=dim, chunks=chunks)
    assert full.shape == full_shape and abs(full.std().item() - 0.02) < 0.01 * 2
    draws = _CountDraws(monkeypatch)
    for tp in (2, 4, 8):
        for rank in range(tp):
            draws.values = 0
            part = init.initial_shard(name, full_shape, cfg, seed=5, dim=dim, chunks=chunks,
                                      tp_size=tp, tp_rank=rank)
            assert torch.equal(part, shard(full, dim, tp, rank, chunks)), (tp, rank)
            assert draws.values == full.numel() // tp  # its own blocks, nothing more


def test_vocabulary_rows_do_not_depend_on_padding_or_its_setting(monkeypatch):
    name = "embedding.word_embeddings.weight"
    cfg = _config(vocab_size=300)
    unpadded = init.initial_shard(name, (300, 64), _config(make_vocab_size_divisible_by=1), 5)
    draws = _CountDraws(monkeypatch)
    for tp in (1, 2, 4):
        padded = cfg.padded_vocab_size(tp)  # 384, 512, 512
        shards = []
        for rank in range(tp):
            draws.values = 0
            shards.append(init.initial_shard(name, (padded, 64), cfg, 5, tp_size=tp, tp_rank=rank))
            real_rows = max(0, min(300, (rank + 1) * padded // tp) - rank * padded // tp)
            # Whole 128-row blocks: a shard holding padding only draws nothing.
            assert draws.values == -(-real_rows // 128) * 128 * 64
        full = torch.cat(shards)
        assert torch.equal(full[:300], unpadded) and full[300:].abs().sum() == 0


# ---- whole training iterations ------------------------------------------------------------------
def _tiny_config(num_layers: int, microbatches: int, precision: str):
    from tests.test_training_parity import tiny_config
    config = tiny_config()
    config.model.num_layers = num_layers
    config.training.global_batch_size = microbatches * config.training.micro_batch_size
    config.training.train_iters = 3
    config.optim.bf16 = precision == "bf16"
    return config


def _syncs_per_iteration(monkeypatch, num_layers: int, microbatches: int, precision: str):
    """Syncs of iterations 2 and 3 (the first builds Adam's state), and the parameter count."""
    from slimtron.training import setup, train
    engine = setup(_tiny_config(num_layers, microbatches, precision), 1)
    num_tensors = sum(1 for chunk in engine.model_chunks for _ in chunk.parameters())
    seen = []
    counter = StepCounter(dispatch=False)  # the model's ops need no counting here: faster
    with counter.watching(monkeypatch):
        train(engine, on_iteration=lambda it, loss, norm: seen.append(counter.syncs))
    return [b - a for a, b in zip(seen, seen[1:])], num_tensors


@pytest.mark.parametrize("precision,expected,runs", [
    ("fp32", 2, ((1, 2), (1, 16), (16, 2))),  # (layers, micro-batches): 9 or 99 tensors
    ("bf16", 1, ((1, 2),)),
])
def test_training_iteration_syncs_at_most_two_whatever_micro_batches_and_tensors(
        monkeypatch, precision, expected, runs):
    """fp32 reads the overflow flag; both read (loss, grad norm) once for the NaN accounting."""
    for num_layers, microbatches in runs:
        syncs, tensors = _syncs_per_iteration(monkeypatch, num_layers, microbatches, precision)
        assert tensors == (9 if num_layers == 1 else 99)
        assert syncs == [expected] * 2, (num_layers, microbatches, syncs)


# ---- data prefetch ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_prefetched_micro_batches_are_the_same_samples(num_workers):
    from slimtron.data.mock_dataset import MockGPTDataset
    from slimtron.training.data import MicroBatchPrefetcher, microbatches_for
    config = _tiny_config(1, 3, "fp32")
    config.data.num_workers = num_workers
    gbs = config.training.global_batch_size
    dataset = MockGPTDataset(10 * gbs, config.model.seq_length, config.model.vocab_size, seed=3)
    pstate = ParallelState.single()
    prefetcher = MicroBatchPrefetcher(dataset, config, pstate, 3)
    try:
        # In order, then a jump (a resumed run), then on from there to the last sample.
        for first in [0, gbs, 2 * gbs, 6 * gbs, 7 * gbs, 8 * gbs, 9 * gbs]:
            got = prefetcher.get(first)
            expected = microbatches_for(dataset, first, config, pstate, 3)
            assert len(got) == len(expected) == 3
            for a, b in zip(got, expected):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with pytest.raises(Exception, match="the dataset has 60 samples"):
            prefetcher.get(10 * gbs)
    finally:
        prefetcher.close()


# ---- the one-GPU check, run here at tiny sizes on the CPU --------------------------------------
def test_gpu_check_script_runs_with_cpu():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--cpu"], cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for expected in ("ok   model grads", "ok   kernel causal_attention", "ok   optimizer fp32",
                     "ok   loss scaler fp16", "slimtron / HF tokens/s", "0 parity failure(s)"):
        assert expected in out.stdout, (expected, out.stdout[-3000:])


# ---- a model a checkpoint will fill ---------------------------------------------------------------
class _OpsOffMeta(TorchDispatchMode):
    """Names of the ops that produce a tensor off the meta device."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(t.device.type != "meta" for t in torch.utils._pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor)):
            self.ops[str(func)] += 1
        return out


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_model_without_initialisation_is_built_on_meta_then_given_storage(arch):
    """--load (not --finetune): the model is built on the meta device; materialising allocates
    each parameter once and writes nothing; the tags the checkpoint code reads are kept; a load
    then gives exactly the initialised model."""
    from slimtron.model import GPTModel
    from tests.test_model import batch, tiny
    cfg = tiny(arch)
    pstate = ParallelState.single()
    reference = GPTModel(cfg, pstate, seed=3)
    with _OpsOffMeta() as ops:
        empty = GPTModel(cfg, pstate, seed=3, initialize=False)
    params = dict(empty.named_parameters())
    assert set(ops.ops) <= {"aten.empty_like.default", "aten.empty_strided.default"}, ops.ops
    assert sum(ops.ops.values()) == len(params)
    for name, param in reference.named_parameters():
        twin = params[name]
        assert twin.device == param.device and twin.dtype == param.dtype and twin.requires_grad
        assert {k: v for k, v in vars(twin).items()} == {k: v for k, v in vars(param).items()}
    empty.load_state_dict(reference.state_dict())
    tokens, labels = batch(cfg)
    assert torch.equal(empty(tokens, labels=labels), reference(tokens, labels=labels))
