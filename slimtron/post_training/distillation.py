"""Logit distillation: a frozen teacher's output distribution as the student's target.

The per-token loss is ``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(labels)``, each
term computed on vocab-parallel logits (``slimtron.parallel.cross_entropy``), so no rank ever holds
the full vocabulary. The teacher is any slimtron checkpoint with the same tokenizer; it may differ
from the student in depth and width.

Layout: the teacher runs in the student's process layout with its own TP shards (same TP group,
same sequence parallelism). Under pipeline parallelism the whole teacher sits on the last stage,
where the student's logits and the micro-batch's tokens are; earlier stages hold none of it. This
costs the last stage the teacher's memory and compute, and is the documented restriction: stages
do not split the teacher between them.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from slimtron import checkpointing
from slimtron.config import Config, ConfigError, ModelConfig
from slimtron.parallel.state import Axis
from slimtron.parallel.cross_entropy import (vocab_parallel_cross_entropy,
                                             vocab_parallel_kl_divergence)


def check_same_tokenizer(teacher: Config, student: Config, teacher_dir: str) -> None:
    """One line naming the mismatch when the teacher reads other token ids than the student."""
    t, s = teacher.model.vocab_size, student.model.vocab_size
    if t != s:
        raise ConfigError(f"--kd-teacher-load {teacher_dir}: the teacher's vocabulary has {t} "
                          f"tokens and the student's {s}; distillation needs the same tokenizer")
    t_tok = _tokenizer_identity(teacher)
    s_tok = _tokenizer_identity(student)
    if t_tok is not None and s_tok is not None and t_tok != s_tok:
        raise ConfigError(f"--kd-teacher-load {teacher_dir}: the teacher's tokenizer "
                          f"({teacher.data.tokenizer_type} {teacher.data.tokenizer_model}) is not "
                          f"the student's ({student.data.tokenizer_type} "
                          f"{student.data.tokenizer_model}); distillation needs the same tokenizer")


def _tokenizer_identity(config: Config) -> Optional[tuple]:
    """What makes two tokenizers the same: the type and the model file's bytes (so that copies
    of one file in two places agree); None when unknown (no tokenizer recorded or file absent)."""
    kind, model = config.data.tokenizer_type, config.data.tokenizer_model
    if not kind or not model:
        return None
    if os.path.isfile(model):
        with open(model, "rb") as f:
            return kind, f.read()
    if os.path.isdir(model):
        for name in ("tokenizer.json", "tokenizer.model"):
            path = os.path.join(model, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    return kind, f.read()
    return None


def teacher_config(teacher_dir: str) -> Config:
    """The Config a teacher checkpoint was saved with (its model shape and tokenizer)."""
    if not os.path.isdir(teacher_dir):
        raise ConfigError(f"--kd-teacher-load: directory {teacher_dir} does not exist")
    if checkpointing.latest_iteration(teacher_dir) is None:
        raise ConfigError(f"--kd-teacher-load {teacher_dir}: no checkpoint there")
    _, common = checkpointing.load_common(teacher_dir)
    return Config.from_dict(common["config"])


def load_teacher(teacher_dir: str, student: Config, pstate, *, sequence_parallel: bool,
                 params_dtype=torch.float32, seed: int = 1234):
    """The frozen teacher on this rank (None off the last pipeline stage), TP-sharded over
    ``pstate``'s TP group; each rank reads its own shards (no communication)."""
    from slimtron.model import GPTModel, validate_parallel_config

    config = teacher_config(teacher_dir)
    check_same_tokenizer(config, student, teacher_dir)
    model_cfg: ModelConfig = config.model
    if student.model.seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"--kd-teacher-load {teacher_dir}: --seq-length "
                          f"{student.model.seq_length} exceeds the teacher's "
                          f"max_position_embeddings {model_cfg.max_position_embeddings}")
    model_cfg.hidden_dropout = model_cfg.attention_dropout = 0.0
    try:
        validate_parallel_config(model_cfg, pstate.tp.size, sequence_parallel=sequence_parallel)
    except ConfigError as e:
        raise ConfigError(f"--kd-teacher-load {teacher_dir}: the teacher {e}") from None
    if pstate.cp.size > 1:
        raise ConfigError("--kd-teacher-load is not supported with --context-parallel-size > 1")
    if not pstate.is_last_stage:
        return None
    teacher = GPTModel(model_cfg, pstate, pre_process=True, post_process=True,
                       sequence_parallel=sequence_parallel, params_dtype=params_dtype, seed=seed,
                       initialize=False)
    checkpointing.load_checkpoint(teacher_dir, [teacher], None, pstate, config,
                                  load_optim=False, load_rng=False, finetune=True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_logits(teacher, tokens: torch.Tensor, position_ids: Optional[torch.Tensor],
                   **extra) -> torch.Tensor:
    """Vocab-parallel logits ``[b, s, padded_vocab / tp]`` of the frozen teacher."""
    with torch.no_grad():
        return teacher(tokens=tokens, position_ids=position_ids, **extra)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, vocab_size: int, *, temperature: float, alpha: float,
                      tp: Optional[Axis] = None) -> torch.Tensor:
    """Per-token fp32 loss ``[b, s]``: ``alpha * T^2 KL + (1 - alpha) * CE`` (mask and average
    are the caller's, as for the LM loss)."""
    kd = vocab_parallel_kl_divergence(student_logits, teacher_logits, vocab_size, temperature,
                                      tp)
    if alpha == 1.0:
        return kd
    ce = vocab_parallel_cross_entropy(student_logits, labels, vocab_size, tp)
    return alpha * kd + (1.0 - alpha) * ce


def micro_batch_loss(student_logits: torch.Tensor, teacher, batch: dict, config: Config,
                     tp: Optional[Axis] = None) -> torch.Tensor:
    """The per-token training loss of one micro-batch under --kd-teacher-load: the teacher reads
    the same tokens, positions and document segments as the student."""
    t = config.training
    target = teacher_logits(teacher, batch["tokens"], batch["position_ids"],
                            segment_ids=batch.get("segment_ids"))
    return distillation_loss(student_logits, target, batch["labels"], config.model.vocab_size,
                             temperature=t.kd_temperature, alpha=t.kd_alpha, tp=tp)
