"""Megatron-LM-compatible command line -> ``slimtron.config.Config``, and its validation.

Flags carry Megatron-LM's names wherever the concept is the same, so existing launch scripts port
with little change. ``parse_args`` only reads the command line; ``validate`` checks the result
against the world size (and the file system) and fills in what depends on it: the data-parallel
size, the default global batch and the warm-up iterations from ``--lr-warmup-fraction``.

Every flag's default is ``None`` on the parser, meaning "not given": the dataclass defaults (or the
``--preset``) stay the single source of defaults, and explicit flags override preset fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from typing import Optional, Sequence

from slimtron.config import (PRESETS, Config, ConfigError, DataConfig, ModelConfig,
                             OptimizerConfig, ParallelConfig, TrainingConfig,
                             check_checkpointing, check_context_parallel, check_post_training,
                             model_preset)

# (flag, dest field, argparse options). The dest is the flag's name unless given.
_MODEL_FLAGS = [
    ("--num-layers", None, dict(type=int)),
    ("--hidden-size", None, dict(type=int)),
    ("--ffn-hidden-size", None, dict(type=int, help="default 4*hidden (SwiGLU: 8/3*hidden, "
                                                   "rounded down to a multiple of 64, as Megatron)")),
    ("--num-attention-heads", None, dict(type=int)),
    ("--group-query-attention", None, dict(action="store_true")),
    ("--num-query-groups", None, dict(type=int, help="needs --group-query-attention; default 1")),
    ("--kv-channels", None, dict(type=int, help="per-head dim; default hidden/heads")),
    ("--seq-length", None, dict(type=int)),
    ("--max-position-embeddings", None, dict(type=int, help="default --seq-length")),
    ("--normalization", None, dict(choices=["LayerNorm", "RMSNorm"])),
    ("--norm-epsilon", None, dict(type=float)),
    ("--position-embedding-type", None, dict(choices=["learned_absolute", "rope"])),
    ("--rotary-base", None, dict(type=float)),
    ("--rotary-percent", None, dict(type=float, help="fraction of each head's dims RoPE rotates")),
    ("--apply-layernorm-1p", None, dict(action="store_true",
                                        help="norms scale by (1 + weight), weights start at 0")),
    ("--swiglu", None, dict(action="store_true")),
    ("--disable-bias-linear", "add_bias_linear", dict(action="store_false")),
    ("--add-qkv-bias", None, dict(action="store_true")),
    ("--untie-embeddings-and-output-weights", None, dict(action="store_true")),
    ("--hidden-dropout", None, dict(type=float)),
    ("--attention-dropout", None, dict(type=float)),
    ("--init-method-std", None, dict(type=float)),
    ("--make-vocab-size-divisible-by", None, dict(type=int)),
    ("--vocab-size", None, dict(type=int, help="replaced by the tokenizer's size when it has one")),
]

_PARALLEL_FLAGS = [
    ("--tensor-model-parallel-size", None, dict(type=int)),
    ("--pipeline-model-parallel-size", None, dict(type=int)),
    ("--context-parallel-size", None, dict(type=int)),
    ("--num-layers-per-virtual-pipeline-stage", None, dict(type=int)),
    ("--sequence-parallel", None, dict(action="store_true")),
    ("--use-distributed-optimizer", None, dict(action="store_true")),
    ("--overlap-grad-reduce", None, dict(action="store_true")),
    ("--ddp-bucket-size", "bucket_size", dict(type=int, help="elements per gradient bucket")),
    ("--distributed-backend", None, dict(choices=["nccl", "gloo"])),
    ("--distributed-timeout-minutes", None, dict(type=float)),
]

_OPTIM_FLAGS = [
    ("--optimizer", None, dict(choices=["adam"], help="AdamW (decoupled weight decay)")),
    ("--lr", None, dict(type=float)),
    ("--min-lr", None, dict(type=float)),
    ("--lr-decay-style", None, dict(choices=["constant", "linear", "cosine"])),
    ("--lr-warmup-iters", None, dict(type=int)),
    ("--lr-warmup-fraction", None, dict(type=float, help="of --lr-decay-iters; excludes "
                                                        "--lr-warmup-iters")),
    ("--lr-decay-iters", None, dict(type=int, help="default --train-iters")),
    ("--weight-decay", None, dict(type=float)),
    ("--adam-beta1", None, dict(type=float)),
    ("--adam-beta2", None, dict(type=float)),
    ("--adam-eps", None, dict(type=float)),
    ("--clip-grad", None, dict(type=float)),
    ("--fp16", None, dict(action="store_true")),
    ("--bf16", None, dict(action="store_true")),
    ("--loss-scale", None, dict(type=float, help="static loss scale; default dynamic (fp16)")),
    ("--initial-loss-scale", None, dict(type=float)),
    ("--min-loss-scale", None, dict(type=float)),
    ("--loss-scale-window", None, dict(type=int)),
    ("--hysteresis", None, dict(type=int)),
]

_DATA_FLAGS = [
    ("--data-path", None, dict(nargs="+", help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ... to blend")),
    ("--split", None, dict(type=str)),
    ("--tokenizer-type", None, dict(type=str)),
    ("--tokenizer-model", None, dict(type=str)),
    ("--vocab-file", None, dict(type=str, help="GPT-2 vocab.json; with --merge-file and no "
                                              "--tokenizer-type: GPT2BPETokenizer")),
    ("--merge-file", None, dict(type=str, help="GPT-2 merges.txt")),
    ("--tiktoken-pattern", None, dict(choices=["v1", "v2"])),
    ("--vocab-file", None, dict(type=str, help="GPT-2 vocab.json; with --merge-file and no "
                                              "--tokenizer-type: GPT2BPETokenizer")),
    ("--merge-file", None, dict(type=str, help="GPT-2 merges.txt")),
    ("--tiktoken-pattern", None, dict(choices=["v1", "v2"])),
    ("--data-cache-path", None, dict(type=str)),
    ("--num-workers", None, dict(type=int)),
    ("--reset-position-ids", None, dict(action="store_true")),
    ("--reset-attention-mask", None, dict(action="store_true")),
    ("--eod-mask-loss", None, dict(action="store_true")),
    ("--mock-data", None, dict(action="store_true", help="synthetic tokens, no --data-path")),
    ("--sft", None, dict(action="store_true", help="--data-path names .jsonl conversations or "
                                                   "prompt/response pairs: loss on answers only, "
                                                   "packed with per-conversation attention")),
]

_TRAINING_FLAGS = [
    ("--micro-batch-size", None, dict(type=int)),
    ("--global-batch-size", None, dict(type=int, help="default micro-batch x data-parallel size")),
    ("--train-iters", None, dict(type=int)),
    ("--seed", None, dict(type=int)),
    ("--log-interval", None, dict(type=int)),
    ("--eval-interval", None, dict(type=int)),
    ("--eval-iters", None, dict(type=int)),
    ("--save", None, dict(type=str)),
    ("--save-interval", None, dict(type=int)),
    ("--load", None, dict(type=str)),
    ("--no-load-optim", None, dict(action="store_true")),
    ("--no-load-rng", None, dict(action="store_true")),
    ("--finetune", None, dict(action="store_true")),
    ("--ckpt-format", None, dict(choices=["torch_dist", "torch"],
                                 help="torch_dist (default): every rank writes its share; "
                                      "torch: one file per (tp, pp), format 1")),
    ("--async-save", None, dict(action="store_true", help="write checkpoints in the background "
                                                         "(torch_dist)")),
    ("--exit-interval", None, dict(type=int)),
    ("--tensorboard-dir", None, dict(type=str)),
    ("--recompute-granularity", None, dict(choices=["full", "selective"])),
    ("--recompute-method", None, dict(choices=["uniform", "block"])),
    ("--recompute-num-layers", None, dict(type=int)),
    ("--eval-only", None, dict(action="store_true")),
    ("--kd-teacher-load", None, dict(type=str, help="distil from this checkpoint's logits")),
    ("--kd-temperature", None, dict(type=float, help="softmax temperature of the KD loss; "
                                                    "default 1.0")),
    ("--kd-alpha", None, dict(type=float, help="loss = alpha * T^2 KL + (1 - alpha) * LM loss; "
                                              "default 1.0")),
]

# Config section -> (its dataclass, its flags).
_SECTIONS = {
    "model": (ModelConfig, _MODEL_FLAGS),
    "parallel": (ParallelConfig, _PARALLEL_FLAGS),
    "optim": (OptimizerConfig, _OPTIM_FLAGS),
    "data": (DataConfig, _DATA_FLAGS),
    "training": (TrainingConfig, _TRAINING_FLAGS),
}

# Model fields that ModelConfig derives from others when left None, with their derivation.
_DERIVED = {
    "ffn_hidden_size": lambda m: 4 * m.hidden_size,
    "num_query_groups": lambda m: m.num_attention_heads,
    "kv_channels": lambda m: m.hidden_size // m.num_attention_heads,
    "max_position_embeddings": lambda m: m.seq_length,
}


def _dest(flag: str, dest: Optional[str]) -> str:
    return dest or flag.lstrip("-").replace("-", "_")


def _default_text(cls, field_name: str) -> str:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if field_name not in fields or fields[field_name].default is dataclasses.MISSING:
        return ""
    return f"(default {fields[field_name].default})"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The full slimtron/Megatron-style parser; every default is None (= not given)."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="slimtron GPT pretraining (Megatron-LM flags)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape preset; explicit model flags override its fields")
    for section, (cls, flags) in _SECTIONS.items():
        group = parser.add_argument_group(section)
        for flag, dest, options in flags:
            options = dict(options)
            name = _dest(flag, dest)
            options["help"] = " ".join(filter(None, [options.get("help"), _default_text(cls, name)]))
            if "action" not in options and "choices" not in options:
                options["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            group.add_argument(flag, dest=name, default=None, **options)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    """Parse Megatron-style flags (``sys.argv[1:]`` when ``argv`` is None) into a Config."""
    return config_from_namespace(build_parser().parse_args(argv))


def config_from_namespace(ns: argparse.Namespace) -> Config:
    """The Config of a namespace from ``build_parser`` (tools add their own flags to it)."""
    given = {k: v for k, v in vars(ns).items() if v is not None}
    model = _model_config(given, ns.preset)
    sections = {"model": model}
    for section, (cls, flags) in _SECTIONS.items():
        if section == "model":
            continue
        names = [_dest(flag, dest) for flag, dest, _ in flags]
        sections[section] = cls(**{n: given[n] for n in names if n in given})
    return Config(**sections)


def _model_config(given: dict, preset: Optional[str]) -> ModelConfig:
    """The preset (or dataclass defaults) with explicitly given model flags on top.

    A preset's derived field (e.g. ffn = 4*hidden) that still equals its derivation is dropped
    before the flags are applied, so it follows an overridden input (``--hidden-size``) instead of
    keeping the preset's stale value; fields the preset sets on purpose (Llama's ffn) are kept.
    """
    fields = {}
    if preset is not None:
        base = model_preset(preset)
        fields = dataclasses.asdict(base)
        for name, derive in _DERIVED.items():
            if fields[name] == derive(base):
                fields[name] = None
    model_names = {_dest(flag, dest) for flag, dest, _ in _MODEL_FLAGS}
    fields.update({k: v for k, v in given.items() if k in model_names})
    _apply_query_groups(fields, given)
    if fields.get("ffn_hidden_size") is None and fields.get("swiglu"):
        # Megatron's SwiGLU default keeps the MLP's parameter count near that of a 4h GELU MLP.
        hidden = fields.get("hidden_size", ModelConfig.hidden_size)
        fields["ffn_hidden_size"] = int((4 * hidden * 2 / 3) / 64) * 64
    return ModelConfig(**fields)


def _apply_query_groups(fields: dict, given: dict) -> None:
    """Megatron reads --num-query-groups only under --group-query-attention (default 1 group)."""
    gqa = fields.pop("group_query_attention", False)
    if "num_query_groups" in given and not gqa:
        raise ConfigError("--num-query-groups needs --group-query-attention (as in Megatron-LM)")
    if gqa and fields.get("num_query_groups") is None:
        fields["num_query_groups"] = 1


def to_argv(config: Config) -> list[str]:
    """Megatron-style flags that ``parse_args`` turns back into ``config`` (no preset needed)."""
    argv = []
    for section, (cls, flags) in _SECTIONS.items():
        values = dataclasses.asdict(getattr(config, section))
        for flag, dest, options in flags:
            name = _dest(flag, dest)
            if name == "group_query_attention":
                continue
            if name == "num_query_groups":
                argv += ["--group-query-attention", flag, str(values[name])]
                continue
            argv += _flag_argv(flag, options, values[name])
    return argv


def _flag_argv(flag: str, options: dict, value) -> list[str]:
    action = options.get("action")
    if action == "store_true":
        return [flag] if value else []
    if action == "store_false":
        return [] if value else [flag]
    if value is None or value == []:
        return []
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, repr(value) if isinstance(value, float) else str(value)]


# ----------------------------------------------------------------------------------------------
# validation


def validate(config: Config, world_size: int, *, check_files: bool = True) -> Config:
    """Check ``config`` for ``world_size`` ranks; fill in derived settings; return it.

    Raises ConfigError with one line naming the setting. ``check_files=False`` skips the checks
    that look at the file system and the need for a data source (for planning tools and tests).
    Calling it twice with the same world size is harmless.
    """
    _check_precision(config.optim)
    _resolve_data_parallel(config.parallel, world_size)
    _check_model_split(config.model, config.parallel)
    _check_sequence_parallel(config.parallel)
    check_context_parallel(config.model, config.parallel)
    _check_batch(config.training, config.parallel, config.model)
    _check_recompute(config.training, config.model, config.parallel)
    _resolve_warmup(config.optim, config.training)
    _check_lengths(config.model)
    check_post_training(config.data, config.training)
    check_checkpointing(config.training)
    if check_files:
        _check_files(config.data, config.training)
    return config


def _check_precision(optim: OptimizerConfig) -> None:
    if optim.fp16 and optim.bf16:
        raise ConfigError("--fp16 and --bf16 are both set; choose one")


def _resolve_data_parallel(parallel: ParallelConfig, world_size: int) -> None:
    tp, pp, cp = parallel.tp, parallel.pp, parallel.cp
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size "
                          f"{pp} must be positive")
    if world_size % (tp * pp * cp):
        with_cp = f" x --context-parallel-size {cp}" if cp > 1 else ""
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-"
                          f"size {tp} x --pipeline-model-parallel-size {pp}{with_cp} = "
                          f"{tp * pp * cp}")
    dp = world_size // (tp * pp * cp)
    if parallel.data_parallel_size not in (None, dp):
        raise ConfigError(f"data_parallel_size {parallel.data_parallel_size} does not match world "
                          f"size {world_size} / (tp {tp} x pp {pp} x cp {cp}) = {dp}")
    parallel.data_parallel_size = dp


def _check_model_split(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Every tensor-parallel dimension splits evenly; layers split evenly over (virtual) stages."""
    tp, pp = parallel.tp, parallel.pp
    for what, size in [("--num-attention-heads", model.num_attention_heads),
                       ("--num-query-groups", model.num_query_groups),
                       ("--ffn-hidden-size", model.ffn_hidden_size),
                       ("--hidden-size", model.hidden_size)]:
        if size % tp:
            raise ConfigError(f"{what} {size} is not divisible by --tensor-model-parallel-size {tp}")
    if model.make_vocab_size_divisible_by < 1:
        # The padded vocabulary is a multiple of this times tp, hence always splits over tp.
        raise ConfigError("--make-vocab-size-divisible-by must be positive, got "
                          f"{model.make_vocab_size_divisible_by}")
    if model.num_layers % pp:
        raise ConfigError(f"--num-layers {model.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp}")
    per_virtual = parallel.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None:
        if pp < 2:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs "
                              "--pipeline-model-parallel-size > 1")
        if per_virtual < 1 or model.num_layers % (pp * per_virtual):
            raise ConfigError(f"--num-layers {model.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp} x "
                              f"--num-layers-per-virtual-pipeline-stage {per_virtual}")


def _check_sequence_parallel(parallel: ParallelConfig) -> None:
    if parallel.sequence_parallel and parallel.tp == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; "
                      "turning it off", stacklevel=3)
        parallel.sequence_parallel = False


def _check_batch(training: TrainingConfig, parallel: ParallelConfig, model: ModelConfig) -> None:
    mbs, dp = training.micro_batch_size, parallel.data_parallel_size
    if mbs < 1:
        raise ConfigError(f"--micro-batch-size must be positive, got {mbs}")
    if training.global_batch_size is None:
        training.global_batch_size = mbs * dp
    gbs = training.global_batch_size
    if gbs < 1 or gbs % (mbs * dp):
        raise ConfigError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} "
                          f"x data-parallel size {dp} = {mbs * dp}")
    num_microbatches = gbs // (mbs * dp)
    if parallel.virtual_pipeline_size(model.num_layers) > 1 and num_microbatches % parallel.pp:
        raise ConfigError(f"interleaved schedule: number of micro-batches {num_microbatches} "
                          f"(global batch {gbs} / (micro-batch {mbs} x dp {dp})) is not divisible "
                          f"by --pipeline-model-parallel-size {parallel.pp}")


def _check_recompute(training: TrainingConfig, model: ModelConfig,
                     parallel: ParallelConfig) -> None:
    """Megatron's rules: full needs a method and a layer count; selective takes neither."""
    granularity, method, layers = (training.recompute_granularity, training.recompute_method,
                                   training.recompute_num_layers)
    if granularity not in (None, "full", "selective"):
        raise ConfigError(f"--recompute-granularity must be full or selective, got {granularity!r}")
    if method not in (None, "uniform", "block"):
        raise ConfigError(f"--recompute-method must be uniform or block, got {method!r}")
    if granularity == "full":
        if method is None or layers is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method "
                              "(uniform|block) and --recompute-num-layers")
        layers_per_stage = model.num_layers // parallel.pp
        if not 1 <= layers <= layers_per_stage:
            raise ConfigError(f"--recompute-num-layers {layers} must be between 1 and the "
                              f"{layers_per_stage} layers per pipeline stage")
    elif method is not None or layers is not None:
        flag = "--recompute-method" if method is not None else "--recompute-num-layers"
        raise ConfigError(f"{flag} needs --recompute-granularity full "
                          f"(got {granularity or 'no recompute'})")


def _resolve_warmup(optim: OptimizerConfig, training: TrainingConfig) -> None:
    fraction = optim.lr_warmup_fraction
    if fraction is None:
        return
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {fraction}")
    warmup = int(fraction * (optim.lr_decay_iters or training.train_iters))
    if optim.lr_warmup_iters not in (0, warmup):
        raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are both set; choose one")
    optim.lr_warmup_iters = warmup


def _check_lengths(model: ModelConfig) -> None:
    if model.seq_length > model.max_position_embeddings:
        raise ConfigError(f"--seq-length {model.seq_length} exceeds --max-position-embeddings "
                          f"{model.max_position_embeddings}")


def parse_blend(data_path: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """``--data-path`` as (prefixes, weights): ``P``, ``P1 P2 ...`` (no weights) or ``W1 P1 ...``."""
    paths = list(data_path)
    weights = [_as_float(p) for p in paths[0::2]]
    if len(paths) > 1 and len(paths) % 2 == 0 and all(w is not None for w in weights):
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"--data-path weights must be non-negative with a positive sum, "
                              f"got {weights}")
        return paths[1::2], weights
    if any(_as_float(p) is not None for p in paths):
        raise ConfigError("--data-path must be PREFIX..., or WEIGHT PREFIX pairs; got "
                          + " ".join(paths))
    return paths, None


def _as_float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _check_files(data: DataConfig, training: TrainingConfig) -> None:
    if not data.data_path and not data.mock_data:
        raise ConfigError("no --data-path given (use --mock-data for synthetic tokens)")
    prefixes, _ = parse_blend(data.data_path) if data.data_path else ([], None)
    for prefix in prefixes:
        for suffix in ((".bin", ".idx") if not data.sft else ("",)):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(f"--data-path: {prefix + suffix} does not exist")
    if training.kd_teacher_load and not os.path.isdir(training.kd_teacher_load):
        raise ConfigError(f"--kd-teacher-load: directory {training.kd_teacher_load} does not exist")
    # A HuggingFace tokenizer may be a hub name; every other kind is a local file.
    if data.tokenizer_model and data.tokenizer_type != "HuggingFaceTokenizer":
        if not os.path.exists(data.tokenizer_model):
            raise ConfigError(f"--tokenizer-model: {data.tokenizer_model} does not exist")
    # --load equal to --save is the auto-resume idiom: a missing directory there is a fresh start.
    resuming_own_run = training.load == training.save
    if training.load and not resuming_own_run and not os.path.isdir(training.load):
        raise ConfigError(f"--load: directory {training.load} does not exist")
