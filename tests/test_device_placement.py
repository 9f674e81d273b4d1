"""Device placement: every tensor handed to torch.distributed lives on the rank's device.

NCCL only moves tensors that sit on the rank's GPU, but every other test runs on CPU with gloo,
where a tensor created without ``device=`` (torch's default, the CPU) is just as good as one on the
model's device. Here the forked ranks make that mistake visible on CPU: torch's default device is set to
``meta`` while the engine runs on the CPU, so a tensor that took the default device instead of
``pstate.device`` is a meta tensor, and the wrapped torch.distributed functions refuse any tensor
that is not on the device the engine picked (``default_device_and_backend``). Code that keeps
tensors on the host on purpose (initial values, data samples, checkpoint files) names the CPU.

The ranks run short trainings with checkpoint save, resume and validation (data parallel with the
distributed optimizer, tensor + sequence parallel, interleaved pipeline with tied embeddings,
context parallel with its ring) and TP generation, and report which collectives they used, so that the check is known to have seen
each kind.
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist

from slimtron.checkpointing import load_common, open_checkpoint, rng_state, set_rng_state
from slimtron.generation import generate
from slimtron.model import build_model_chunks
from slimtron.parallel.random import RNGStatesTracker
from slimtron.parallel.state import ParallelState, default_device_and_backend
from slimtron.training import evaluate, setup, train
from tests.distributed import run_distributed
from tests.test_training_parity import tiny_config

COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "all_gather_single", "reduce_scatter", "reduce_scatter_tensor",
               "reduce_scatter_single", "all_to_all", "all_to_all_single", "gather", "scatter",
               "send", "recv")


class DevicePlacementError(AssertionError):
    pass


def _check(name: str, tensors, expected: torch.device) -> None:
    for t in tensors:
        if t.device != expected:
            raise DevicePlacementError(f"torch.distributed.{name} was given a {tuple(t.shape)} "
                                       f"{t.dtype} tensor on {t.device}, not on the rank's "
                                       f"device {expected}")


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else [value]
        yield from (t for t in items if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def checked_collectives(expected: torch.device, used: dict):
    """Wrap the torch.distributed functions (and slimtron's module-level aliases of them) so that
    each checks its tensors' device, counts its calls in ``used`` and calls through."""
    originals = {id(getattr(dist, name)): name for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(fn, name):
        def checked(*args, **kwargs):
            _check(name, _tensors(args, kwargs), expected)
            used[name] = used.get(name, 0) + 1
            return fn(*args, **kwargs)
        return checked

    def checked_batch(ops):
        _check("batch_isend_irecv", [op.tensor for op in ops], expected)
        used["batch_isend_irecv"] = used.get("batch_isend_irecv", 0) + 1
        return real_batch(ops)

    real_batch = dist.batch_isend_irecv
    patched = [(dist, "batch_isend_irecv", real_batch)]
    dist.batch_isend_irecv = checked_batch
    modules = [dist] + [m for n, m in list(sys.modules.items())
                        if n.startswith("slimtron") and m is not None]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if id(value) in originals:
                patched.append((module, attr, value))
                setattr(module, attr, wrap(value, originals[id(value)]))
    try:
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)


@contextlib.contextmanager
def default_device_trap():
    """Tensors created without a device land on ``meta``, where they can hold no data."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _on_rank(rank, world, phases, root):
    """Run ``phases`` (names of the functions below) with checked collectives; return, per phase,
    which collectives it used (and whatever the phase returns)."""
    expected = default_device_and_backend()[0]
    report = {}
    for phase in phases:
        used = {}
        with checked_collectives(expected, used), default_device_trap():
            result = PHASES[phase](rank, world, os.path.join(root, phase))
        report[phase] = (used, result)
    return report


def _config(iters, save=None, load=None, **layout):
    c = tiny_config(**layout)
    c.training.train_iters, c.training.save, c.training.load = iters, save, load
    c.training.save_interval = 2 if save else None
    return c


def _data_parallel(rank, world, root):
    """dp=2, distributed optimizer, overlapped reduction, dropout: save at 2, resume to 3."""
    def config(iters, **kw):
        c = _config(iters, dist_opt=True, overlap=True, **kw)
        c.model.hidden_dropout = c.model.attention_dropout = 0.1
        return c
    train(setup(config(2, save=root), world))
    engine = setup(config(3, load=root), world)
    train(engine)
    return engine.state.iteration


def _plain_optimizer_checkpoint(rank, world, root):
    """dp=2 without the distributed optimizer: every rank holds all of the optimizer state."""
    train(setup(_config(2, save=root), world))
    saved = open_checkpoint(*load_common(root))
    return sorted(name for name in saved.names()
                  if not torch.equal(saved.full(name, "main_param"), saved.full(name)))


def _tensor_parallel(rank, world, root):
    """tp=2 with sequence parallelism, GPT-2 (tied embeddings), dropout, validation; then
    sampled generation under TP."""
    c = _config(2, tp=2, sp=True, arch="gpt2")
    c.model.hidden_dropout = c.model.attention_dropout = 0.1
    c.training.eval_interval, c.training.eval_iters = 2, 1
    train(setup(c, world))
    pstate = ParallelState.build(tp=2, device=default_device_and_backend()[0])
    model = build_model_chunks(c.model, pstate, device=pstate.device)[0]
    prompt = torch.arange(5, device=pstate.device).view(1, 5)
    return generate(model, prompt, 4, temperature=0.9, top_k=20, seed=3).tolist()


def _pipeline(rank, world, root):
    """pp=2 interleaved (two chunks a stage), GPT-2 tied embeddings, forward-only evaluation."""
    engine = setup(_config(2, pp=2, vp_layers=2, arch="gpt2"), world)
    train(engine)
    return evaluate(engine, engine.datasets[0], 1)


def _context_parallel(rank, world, root):
    """cp=2 (ring attention: K/V around the ring), distributed optimizer over dp x cp, validation:
    save at 2, resume to 3."""
    def config(iters, **kw):
        c = _config(iters, dist_opt=True, **kw)
        c.parallel.context_parallel_size = 2
        c.training.eval_interval, c.training.eval_iters = 3, 1
        return c
    train(setup(config(2, save=root), world))
    engine = setup(config(3, load=root), world)
    train(engine)
    return engine.state.iteration


PHASES = {f.__name__.lstrip("_"): f for f in (_data_parallel, _plain_optimizer_checkpoint,
                                               _tensor_parallel, _pipeline, _context_parallel)}


def test_dp_checkpoint_and_resume_keep_collectives_on_the_device(tmp_path):
    ranks = run_distributed(_on_rank, 2, ["data_parallel", "plain_optimizer_checkpoint"],
                            str(tmp_path))
    for report in ranks:
        used, iteration = report["data_parallel"]
        assert iteration == 3
        # Grad reduce-scatter and parameter all-gather (a save gathers no optimizer state).
        assert {"reduce_scatter_single", "all_gather_single", "all_reduce"} <= set(used)
        used, main_differs_from_param = report["plain_optimizer_checkpoint"]
        assert "all_reduce" in used
        # The saved fp32 main parameters are the parameters themselves, not a sum over DP ranks.
        assert main_differs_from_param == []


def test_tp_pp_cp_and_generation_keep_collectives_on_the_device(tmp_path):
    ranks = run_distributed(_on_rank, 2, ["tensor_parallel", "pipeline", "context_parallel"],
                            str(tmp_path))
    (tp_used, tokens0), (_, tokens1) = ranks[0]["tensor_parallel"], ranks[1]["tensor_parallel"]
    assert {"all_reduce", "all_gather_single", "reduce_scatter_single", "broadcast"} <= set(tp_used)
    assert tokens0 == tokens1 and len(tokens0[0]) == 9
    for report in ranks:
        used, loss = report["pipeline"]
        assert {"batch_isend_irecv", "broadcast", "all_reduce"} <= set(used)
        assert 0 < loss < 10
        used, iteration = report["context_parallel"]
        assert iteration == 3
        assert {"batch_isend_irecv", "reduce_scatter_single", "all_gather_single"} <= set(used)


def test_generator_states_of_another_kind_of_device_are_not_restored():
    """A checkpoint written on GPUs and resumed on the CPU (or back): CUDA generator states (16
    bytes) do not fit the CPU generator (5056 bytes), so only the host generators are restored and
    the tracker keeps streams its device can use."""
    cpu = torch.device("cpu")
    outside = rng_state(cpu)
    try:
        tracker = RNGStatesTracker.for_rank(5, ParallelState.single())
        state = rng_state(cpu, tracker)
        draw = torch.rand(3)
        assert set_rng_state(state, cpu, tracker)
        assert torch.equal(torch.rand(3), draw)

        cuda_state = torch.zeros(16, dtype=torch.uint8)
        foreign = dict(state, device="cuda", cuda=cuda_state,
                       tracker={name: cuda_state for name in state["tracker"]})
        assert not set_rng_state(foreign, cpu, tracker)
        assert torch.equal(torch.rand(3), draw)  # the host generators are restored all the same
        assert all(torch.equal(s, state["tracker"][name])
                   for name, s in tracker.get_states().items())
        with tracker.fork():  # still a state of this device's generator
            torch.rand(1)
    finally:
        set_rng_state(outside, cpu)
