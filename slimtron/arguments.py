"""Megatron-LM-compatible command line -> ``slimtron.config.Config``, and its validation.

Flags carry Megatron-LM's names wherever the concept is the same, so existing launch scripts port
with little change. ``parse_args`` only reads the command line; ``validate`` (``Config.validate``,
where every rule lives) checks the result against the world size and the file system and fills in
what depends on them: the data-parallel size, the default global batch, the iterations of
sample-based training.

Every flag's default is ``None`` on the parser, meaning "not given": the dataclass defaults (or the
``--preset``) stay the single source of defaults, and explicit flags override preset fields.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

from slimtron.config import (ATTENTION_BACKENDS, PRESETS, Config, ConfigError, DataConfig,
                             ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig,
                             model_preset)

class _JoinedWords(argparse.Action):
    """One string from one or more words: Megatron's GPT-3 example expands its
    ``--step-batch-size-schedule "0:16 2.4B:320 ..."`` unquoted, so the schedule arrives split."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, " ".join(values))


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
    ("--attention-backend", None, dict(choices=ATTENTION_BACKENDS,
                                       help="attention kernel: flash (flash-attn, else SDPA), "
                                            "fused (SDPA), unfused/local (bmm, softmax, bmm); "
                                            "auto: unfused for bf16/fp16 on CPU, flash otherwise")),
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
    ("--grad-reduce-in-bf16", None, dict(action="store_true", help="bf16 gradient buffers")),
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
    ("--lr-warmup-samples", None, dict(type=int, help="sample-based training (--train-samples)")),
    ("--lr-decay-samples", None, dict(type=int, help="default --train-samples")),
    ("--decoupled-lr", None, dict(type=float, help="max lr of the input embedding and output "
                                                  "layer (same schedule)")),
    ("--decoupled-min-lr", None, dict(type=float, help="their min lr; default --min-lr")),
    ("--fp8-format", None, dict(choices=["e4m3", "hybrid"], help="refused: no FP8 training")),
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
    ("--data-cache-path", None, dict(type=str)),
    ("--num-workers", None, dict(type=int)),
    ("--reset-position-ids", None, dict(action="store_true")),
    ("--reset-attention-mask", None, dict(action="store_true")),
    ("--eod-mask-loss", None, dict(action="store_true")),
    ("--mock-data", None, dict(action="store_true", help="synthetic tokens, no --data-path")),
    ("--no-mmap-bin-files", "mmap_bin_files", dict(action="store_false",
                                                   help="read .bin files without mmap")),
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
    ("--compile-layers", None, dict(action="store_true", help="torch.compile each transformer "
                                                             "layer (slimtron's own; off by "
                                                             "default)")),
    ("--eval-only", None, dict(action="store_true")),
    ("--train-samples", None, dict(type=int, help="sample-based training (sets the iterations)")),
    ("--rampup-batch-size", None, dict(type=int, nargs=3, help="START INCREMENT SAMPLES: the "
                                                             "global batch grows to its final size")),
    ("--step-batch-size-schedule", None, dict(nargs="+", action=_JoinedWords,
                                              help='"THRESHOLD:BATCH ..." thresholds in tokens '
                                                   "(K/M/B/T suffixes)")),
    ("--calculate-per-token-loss", None, dict(action="store_true", help="loss summed over tokens "
                                                                       "/ global token count")),
    ("--exit-duration-in-mins", None, dict(type=float, help="save and exit after this long")),
    ("--exit-signal-handler", None, dict(action="store_true", help="on SIGTERM: finish the step, "
                                                                  "save, exit 0")),
    ("--manual-gc", None, dict(action="store_true", help="Python's collector only every "
                                                        "--manual-gc-interval steps")),
    ("--manual-gc-interval", None, dict(type=int)),
    ("--empty-unused-memory-level", None, dict(type=int, choices=[0, 1, 2])),
    ("--log-throughput", None, dict(action="store_true", help="TFLOP/s per GPU in the log line")),
    ("--profile", None, dict(action="store_true", help="torch profiler trace of steps "
                                                      "[--profile-step-start, --profile-step-end)")),
    ("--profile-step-start", None, dict(type=int)),
    ("--profile-step-end", None, dict(type=int)),
    ("--profile-ranks", None, dict(type=int, nargs="+")),
    ("--wandb-project", None, dict(type=str)),
    ("--wandb-exp-name", None, dict(type=str)),
    ("--wandb-save-dir", None, dict(type=str)),
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

# Megatron flags with no setting of their own. What slimtron always does:
SAME_BEHAVIOUR_FLAGS = {
    "--use-mcore-models": "deprecated in Megatron; the Megatron-Core model is the only one",
    "--no-create-attention-mask-in-dataloader": "attention masks are never built by the loader",
    "--use-pytorch-profiler": "--profile always writes a torch profiler trace",
    "--cross-entropy-loss-fusion": "the vocab-parallel cross entropy is always fused "
                                   "(one pass over the logits)",
}
# What matters only to other hardware or kernels: accepted, and listed once at start-up.
NO_EFFECT_FLAGS = {
    "--overlap-param-gather": dict(action="store_true"),
    "--fp8-amax-history-len": dict(type=int),
    "--fp8-amax-compute-algo": dict(choices=["max", "most_recent"]),
    "--fp8-param-gather": dict(action="store_true"),
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
    group = parser.add_argument_group("accepted for Megatron compatibility")
    for flag, why in SAME_BEHAVIOUR_FLAGS.items():
        group.add_argument(flag, action="store_true", default=None, help=why)
    for flag, options in NO_EFFECT_FLAGS.items():
        group.add_argument(flag, default=None, help="no effect on this device", **options)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    """Parse Megatron-style flags (``sys.argv[1:]`` when ``argv`` is None) into a Config.
    A flag slimtron does not know (any Megatron flag it does not implement) is refused with one
    line naming it, never dropped."""
    ns, unknown = build_parser().parse_known_args(argv)
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    if unknown:
        raise ConfigError(f"unsupported flag{'s' if len(flags) > 1 else ''}: "
                          f"{' '.join(flags or unknown)} (slimtron does not implement "
                          f"{'them' if len(flags) > 1 else 'it'}; see `pretrain_gpt.py --help`)")
    return config_from_namespace(ns)


def config_from_namespace(ns: argparse.Namespace) -> Config:
    """The Config of a namespace from ``build_parser`` (tools add their own flags to it)."""
    given = {k: v for k, v in vars(ns).items() if v is not None}
    if given.get("tokenizer_type") == "NullTokenizer" and "vocab_size" not in given:
        # Megatron sizes the null tokenizer from this flag alone; a preset's vocabulary is no answer
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")
    model = _model_config(given, ns.preset)
    sections = {"model": model}
    for section, (cls, flags) in _SECTIONS.items():
        if section == "model":
            continue
        names = [_dest(flag, dest) for flag, dest, _ in flags]
        sections[section] = cls(**{n: given[n] for n in names if n in given})
    sections["training"].no_effect_flags = [flag for flag in NO_EFFECT_FLAGS
                                            if _dest(flag, None) in given]
    if "train_samples" in given and "train_iters" not in given:
        sections["training"].train_iters = None  # derived from the samples by validation
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
# validation: the rules live in slimtron.config (``Config.validate``), written once


def validate(config: Config, world_size: int, *, check_files: bool = True) -> Config:
    """``config.validate(world_size)``: check it and fill in what depends on the world size."""
    return config.validate(world_size, check_files=check_files)
