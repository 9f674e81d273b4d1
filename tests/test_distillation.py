"""Distillation: the vocab-parallel KL and the KD loss against a direct PyTorch computation, and
TP=2 against TP=1 (loss and every student gradient), with a teacher loaded from a checkpoint that
is deeper and wider than the student; a teacher with another tokenizer is refused in one line."""
import pytest
import torch
import torch.nn.functional as F

from slimtron.checkpointing import save_checkpoint
from slimtron.config import Config, ConfigError, DataConfig, ModelConfig
from slimtron.model import build_model_chunks
from slimtron.parallel.cross_entropy import vocab_parallel_kl_divergence
from slimtron.parallel.sharding import unshard_like
from slimtron.parallel.state import ParallelState
from slimtron.post_training.distillation import (check_same_tokenizer, distillation_loss,
                                                load_teacher, teacher_logits)
from tests.distributed import run_distributed
from tests.test_hf_conversion import perturb

VOCAB = 300  # padded to 384 at tp=1 and 512 at tp=2: padding must not count
TEMPERATURE, ALPHA = 2.0, 0.7


def llama(layers: int, hidden: int, ffn: int, vocab: int = VOCAB) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=4, num_query_groups=2, seq_length=16, vocab_size=vocab,
                       normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                       add_bias_linear=False, untie_embeddings_and_output_weights=True,
                       hidden_dropout=0.0, attention_dropout=0.0)


TEACHER, STUDENT = llama(3, 48, 96), llama(2, 32, 64)


def batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    labels = torch.randint(0, VOCAB, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.3).float()
    return tokens, labels, mask


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(str(tmp_path_factory.mktemp("teacher")), TEACHER, seed=7, iteration=5)


def save_teacher(root: str, config: ModelConfig, seed: int, iteration: int) -> str:
    """A one-process checkpoint of ``config`` with perturbed (non-initial) weights."""
    pstate = ParallelState.single()
    model = build_model_chunks(config, pstate, seed=seed)[0]
    with torch.no_grad():
        perturb([model], config, pstate)
    save_checkpoint(root, iteration, [model], None, pstate, Config(model=config), 0)
    return root


def kd_step(pstate, teacher_root):
    """Masked-mean KD loss of one batch and the student's full (unsharded) grads."""
    student = build_model_chunks(STUDENT, pstate, seed=11)[0]
    teacher = load_teacher(teacher_root, Config(model=STUDENT), pstate, sequence_parallel=False)
    tokens, labels, mask = batch()
    logits = student(tokens=tokens)
    per_token = distillation_loss(logits, teacher_logits(teacher, tokens, None), labels, VOCAB,
                                  temperature=TEMPERATURE, alpha=ALPHA, tp=pstate.tp)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    grads = {}
    for p in student.parameters():
        shards = [torch.empty_like(p.grad) for _ in range(pstate.tp.size)]
        if pstate.tp.size > 1:
            torch.distributed.all_gather(shards, p.grad.contiguous(), group=pstate.tp.group)
        else:
            shards = [p.grad]
        grads[p.global_name] = unshard_like(shards, p)
    return loss.detach(), grads


def _tp2(rank, world, teacher_root):
    return kd_step(ParallelState.build(tp=2, pp=1), teacher_root)


def test_kl_matches_pytorch_with_padding():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 128, generator=g, requires_grad=True)
    t = torch.randn(3, 4, 128, generator=g)
    ours = vocab_parallel_kl_divergence(s, t, 100, temperature=3.0)
    ref = 9.0 * F.kl_div(F.log_softmax(s[..., :100] / 3.0, -1), F.log_softmax(t[..., :100] / 3.0, -1),
                         log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(3, 4, generator=g)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), s)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), s)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert g_ours[..., 100:].abs().max() == 0  # padding columns get nothing
    same = vocab_parallel_kl_divergence(t.clone().requires_grad_(), t, 100)
    assert same.abs().max() < 1e-6  # KL of a distribution with itself


def test_kd_loss_tp2_equals_tp1_equals_pytorch(teacher_dir):
    loss1, grads1 = kd_step(ParallelState.single(), teacher_dir)
    (loss2, grads2), other = run_distributed(_tp2, 2, teacher_dir)
    torch.testing.assert_close(other[0], loss2)
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=0)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        rows = VOCAB if name.endswith(("word_embeddings.weight", "output_layer.weight")) else None
        torch.testing.assert_close(grads2[name][:rows], grads1[name][:rows], rtol=1e-5, atol=1e-7,
                                   msg=name)

    # Direct PyTorch: full-vocabulary softmaxes of the same two models, no slimtron loss code.
    pstate = ParallelState.single()
    student = build_model_chunks(STUDENT, pstate, seed=11)[0]
    teacher = load_teacher(teacher_dir, Config(model=STUDENT), pstate, sequence_parallel=False)
    tokens, labels, mask = batch()
    s = student(tokens=tokens)[..., :VOCAB].float()
    with torch.no_grad():
        t = teacher(tokens=tokens)[..., :VOCAB].float()
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                  log_target=True, reduction="none").sum(-1) * TEMPERATURE ** 2
    ce = F.cross_entropy(s.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(2, 16)
    direct = ((ALPHA * kl + (1 - ALPHA) * ce) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss1, direct.detach(), rtol=1e-5, atol=0)
    direct.backward()
    for p in student.parameters():
        torch.testing.assert_close(grads1[p.global_name], p.grad, rtol=1e-5, atol=1e-7)


def test_teacher_with_another_tokenizer_is_refused(teacher_dir, tmp_path):
    other = Config(model=llama(2, 32, 64, vocab=VOCAB + 1))
    with pytest.raises(ConfigError, match="vocabulary has 300 tokens and the student's 301"):
        load_teacher(teacher_dir, other, ParallelState.single(), sequence_parallel=False)
    a, b = tmp_path / "a.model", tmp_path / "b.model"
    a.write_bytes(b"one tokenizer")
    b.write_bytes(b"another")
    teacher = Config(model=STUDENT, data=DataConfig(tokenizer_type="SentencePieceTokenizer",
                                                    tokenizer_model=str(a)))
    student = Config(model=STUDENT, data=DataConfig(tokenizer_type="SentencePieceTokenizer",
                                                    tokenizer_model=str(b)))
    with pytest.raises(ConfigError, match="is not the student's"):
        check_same_tokenizer(teacher, student, "T")
    with pytest.raises(ConfigError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"), student, ParallelState.single(),
                     sequence_parallel=False)


# ---- through the real training step ------------------------------------------------------------

@pytest.fixture(scope="module")
def parity_teacher_dir(tmp_path_factory):
    """A teacher for tests/test_training_parity's tiny student (vocabulary 200), deeper and wider."""
    from tests.test_training_parity import tiny_config
    cfg = tiny_config().model
    cfg = ModelConfig(**{**cfg.__dict__, "num_layers": 3, "hidden_size": 48, "ffn_hidden_size": 80,
                         "kv_channels": None})
    return save_teacher(str(tmp_path_factory.mktemp("parity_teacher")), cfg, seed=5, iteration=1)


def test_kd_training_tp2_pp2_sp_equals_one_process(parity_teacher_dir):
    """Five real steps of distillation under (tp, pp) = (2, 2) with sequence parallelism (the
    teacher on the last stage, TP-sharded) against one process: losses and final parameters."""
    from tests.test_training_parity import assert_close_params, run_layout, tiny_config

    def kd(config):
        t = config.training
        t.kd_teacher_load, t.kd_temperature, t.kd_alpha = parity_teacher_dir, 2.0, 0.5
        return config

    ref_losses, ref_params = run_layout(kd(tiny_config()), 1)
    losses, params = run_layout(kd(tiny_config(tp=2, pp=2, sp=True)), 4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert_close_params(params, ref_params)
    plain_losses, _ = run_layout(tiny_config(), 1)
    assert abs(plain_losses[0][0] - ref_losses[0][0]) > 0.1  # the teacher really is in the loss
