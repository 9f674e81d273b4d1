"""Typed configuration: one dataclass per concern, plus model presets.

Field names follow Megatron-LM's command-line flags (``--num-layers`` -> ``num_layers``) so that the
CLI in ``slimtron.arguments`` is a thin mapping. Derived quantities are properties, never stored.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which setting is wrong and why."""


# --attention-backend: Megatron's values (slimtron.model.kernels says what each runs)
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention; None = multi-head
    kv_channels: Optional[int] = None  # per-head dim; default hidden_size // num_attention_heads
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # default seq_length
    vocab_size: int = 256  # real (tokenizer) vocabulary; padded size is derived
    make_vocab_size_divisible_by: int = 128
    normalization: str = "LayerNorm"  # or "RMSNorm"
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0  # fraction of each head's dims that RoPE rotates (the first ones)
    apply_layernorm_1p: bool = False  # norm weights stored as (gamma - 1): zero-centered, init 0
    swiglu: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # only read when add_bias_linear is False (Qwen-style)
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS (slimtron.model.kernels)
    init_method_std: float = 0.02

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by "
                                  f"--num-attention-heads {self.num_attention_heads}")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ConfigError(f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ConfigError("--position-embedding-type must be learned_absolute or rope, "
                              f"got {self.position_embedding_type!r}")
        rotary_dim = self.kv_channels * self.rotary_percent
        if not 0.0 < self.rotary_percent <= 1.0 or rotary_dim != int(rotary_dim) or rotary_dim % 2:
            raise ConfigError(f"--rotary-percent {self.rotary_percent} must be in (0, 1] and give "
                              f"an even number of the {self.kv_channels} --kv-channels")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend must be one of "
                              f"{', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"--num-attention-heads {self.num_attention_heads} is not divisible "
                              f"by --num-query-groups {self.num_query_groups}")

    @property
    def tied_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by * tp (as Megatron)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    data_parallel_size: Optional[int] = None  # derived from the world size when None
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    bucket_size: int = 40_000_000  # elements per gradient bucket
    grad_reduce_in_bf16: bool = False  # bf16 gradient buffers (reduced in bf16), as Megatron
    distributed_backend: Optional[str] = None  # None: nccl with CUDA, gloo otherwise
    distributed_timeout_minutes: float = 10.0

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.context_parallel_size

    def virtual_pipeline_size(self, num_layers: int) -> int:
        """Model chunks per pipeline stage (1 = no interleaving)."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return 1
        return num_layers // (self.pp * self.num_layers_per_virtual_pipeline_stage)


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # constant | linear | cosine
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None  # of the decay length; excludes lr_warmup_iters
    lr_decay_iters: Optional[int] = None  # default train_iters
    lr_warmup_samples: int = 0  # sample-based training (--train-samples) only
    lr_decay_samples: Optional[int] = None  # default train_samples
    decoupled_lr: Optional[float] = None  # max lr of the input embedding and output layer
    decoupled_min_lr: Optional[float] = None  # their min lr (default --min-lr)
    fp8_format: Optional[str] = None  # refused: slimtron has no FP8 training
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    fp16: bool = False
    bf16: bool = False
    loss_scale: Optional[float] = None  # static scale; None = dynamic (fp16 only)
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    max_consecutive_nan_iters: int = 10

    @property
    def params_dtype_name(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"


@dataclass
class DataConfig:
    data_path: list = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    split: str = "969,30,1"
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None  # GPT-2 BPE vocab.json (with merge_file: GPT2BPETokenizer)
    merge_file: Optional[str] = None
    tiktoken_pattern: Optional[str] = None  # TikTokenizer's split pattern, v1 or v2
    data_cache_path: Optional[str] = None
    num_workers: int = 0
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    mock_data: bool = False  # synthetic tokens instead of --data-path
    mmap_bin_files: bool = True  # --no-mmap-bin-files reads .bin files without memory-mapping
    sft: bool = False  # --data-path names .jsonl conversations (slimtron.data.sft_dataset)


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default micro_batch_size * dp
    train_iters: Optional[int] = 10  # derived from train_samples when that is given
    train_samples: Optional[int] = None
    rampup_batch_size: Optional[list] = None  # [start, increment, samples]
    step_batch_size_schedule: Optional[str] = None  # "THRESHOLD:BATCH ..." (thresholds in tokens)
    calculate_per_token_loss: bool = False  # sum over tokens / global token count
    seed: int = 1234
    log_interval: int = 1
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    ckpt_format: str = "torch_dist"  # torch_dist: per-rank shares (format 2); torch: format 1
    async_save: bool = False  # write checkpoints in the background (torch_dist only)
    finetune: bool = False
    exit_interval: Optional[int] = None
    tensorboard_dir: Optional[str] = None
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_method: Optional[str] = None  # "uniform" | "block"
    recompute_num_layers: Optional[int] = None
    compile_layers: bool = False  # torch.compile each transformer layer (slimtron's own flag)
    eval_only: bool = False
    exit_duration_in_mins: Optional[float] = None
    exit_signal_handler: bool = False  # on SIGTERM: finish the step, save, exit 0
    manual_gc: bool = False  # Python's collector only every manual_gc_interval steps
    manual_gc_interval: int = 0  # 0: only where Megatron collects (at checkpoints, evaluation)
    empty_unused_memory_level: int = 0  # 1: empty the CUDA cache after each step, 2: also eval
    log_throughput: bool = False
    profile: bool = False  # torch profiler trace of steps [profile_step_start, profile_step_end)
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list = field(default_factory=lambda: [0])
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    no_effect_flags: list = field(default_factory=list)  # given, but only matter elsewhere
    kd_teacher_load: Optional[str] = None  # distil from this checkpoint (post_training.distillation)
    kd_temperature: Optional[float] = None  # default 1.0 with a teacher
    kd_alpha: Optional[float] = None  # weight of the KD term against the LM loss; default 1.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int, *, check_files: bool = True) -> "Config":
        """Check this config for ``world_size`` ranks; fill in derived settings; return it.

        Raises ConfigError with one line naming the setting. ``check_files=False`` skips the
        checks that look at the file system and the need for a data source (for planning tools
        and tests). Calling it twice with the same world size is harmless.
        """
        m, p, o, d, t = self.model, self.parallel, self.optim, self.data, self.training
        check_precision(o)
        resolve_data_parallel(p, world_size)
        check_model_split(m, p.tp, p.pp, sequence_parallel=p.sequence_parallel and p.tp > 1,
                          layers_per_virtual_stage=p.num_layers_per_virtual_pipeline_stage)
        check_sequence_parallel(p)
        check_context_parallel(m, p)
        check_batch(t, p, m)
        check_recompute(t.recompute_granularity, t.recompute_method, t.recompute_num_layers,
                        m.num_layers // p.pp)
        resolve_training_length(t, o, p, m)
        check_warmup(o)
        check_decoupled_lr(o)
        check_lengths(m)
        check_logging(t)
        check_profile(t)
        check_post_training(d, t)
        check_checkpointing(t)
        if check_files:
            check_data_files(d, t)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(model=ModelConfig(**d["model"]), parallel=ParallelConfig(**d["parallel"]),
                   optim=OptimizerConfig(**d["optim"]), data=DataConfig(**d["data"]),
                   training=TrainingConfig(**d["training"]))


def check_post_training(data: DataConfig, training: TrainingConfig) -> None:
    """--sft and the distillation flags: settings that cannot work together, and the defaults
    of the distillation knobs (set only with a teacher: a knob without one is an error)."""
    if data.sft and data.mock_data:
        raise ConfigError("--sft reads .jsonl conversations from --data-path; it cannot use "
                          "--mock-data")
    if data.sft and not (data.tokenizer_type and data.tokenizer_model):
        raise ConfigError("--sft tokenizes its .jsonl at start-up: pass --tokenizer-type and "
                          "--tokenizer-model")
    if data.sft and data.eod_mask_loss:
        raise ConfigError("--eod-mask-loss does not apply to --sft, whose loss covers each answer "
                          "and the eos that ends it")
    if training.kd_teacher_load is None:
        for flag, value in (("--kd-temperature", training.kd_temperature),
                            ("--kd-alpha", training.kd_alpha)):
            if value is not None:
                raise ConfigError(f"{flag} needs --kd-teacher-load")
        return
    if training.kd_temperature is None:
        training.kd_temperature = 1.0
    if training.kd_alpha is None:
        training.kd_alpha = 1.0
    if not training.kd_temperature > 0:
        raise ConfigError(f"--kd-temperature must be positive, got {training.kd_temperature}")
    if not 0.0 <= training.kd_alpha <= 1.0:
        raise ConfigError(f"--kd-alpha must be in [0, 1], got {training.kd_alpha}")


def check_checkpointing(training: TrainingConfig) -> None:
    """--ckpt-format and --async-save (which, as in Megatron, needs torch_dist)."""
    if training.ckpt_format not in ("torch_dist", "torch"):
        raise ConfigError(f"--ckpt-format {training.ckpt_format!r}: expected torch_dist or torch")
    if training.async_save and training.ckpt_format != "torch_dist":
        raise ConfigError(f"--async-save needs --ckpt-format torch_dist, not "
                          f"{training.ckpt_format}")


def check_context_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    """--context-parallel-size: each cp rank holds two of 2 x cp equal chunks of the sequence
    (split again over TP under sequence parallelism), and ring attention has no dropout."""
    cp, tp = parallel.cp, parallel.tp
    if cp < 1:
        raise ConfigError(f"--context-parallel-size must be positive, got {cp}")
    if cp == 1:
        return
    if model.seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {model.seq_length} is not divisible by 2 x "
                          f"--context-parallel-size {cp} = {2 * cp} (each rank holds two chunks)")
    if parallel.sequence_parallel and (model.seq_length // cp) % tp:
        raise ConfigError(f"--seq-length {model.seq_length} / --context-parallel-size {cp} = "
                          f"{model.seq_length // cp} is not divisible by "
                          f"--tensor-model-parallel-size {tp} (sequence parallelism)")
    if model.attention_dropout > 0:
        raise ConfigError(f"--attention-dropout {model.attention_dropout} with "
                          f"--context-parallel-size {cp}: ring attention has no attention "
                          "dropout; set --attention-dropout 0")
    if model.attention_backend in ("unfused", "local"):
        raise ConfigError(f"--attention-backend {model.attention_backend} with "
                          f"--context-parallel-size {cp}: context parallelism runs its own ring "
                          "attention; use auto, flash or fused")


# ---- validation: every rule, once --------------------------------------------------------------
# ``Config.validate`` runs them all (the CLI and training's setup call it); the model builder and
# the optimizer call the parts they depend on (``check_model_split``, ``check_precision``,
# ``check_recompute``), so one rule has one wording wherever it is hit.


def check_precision(optim: OptimizerConfig) -> None:
    if optim.fp16 and optim.bf16:
        raise ConfigError("--fp16 and --bf16 are both set; choose one")
    if optim.fp8_format is not None:
        raise ConfigError(f"--fp8-format {optim.fp8_format}: {_fp8_support()}; train in "
                          "--bf16 instead")


def _fp8_support() -> str:
    import torch
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        return (f"{torch.cuda.get_device_name()} has FP8, but slimtron has no FP8 training "
                "(no Transformer Engine recipes)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"
    return f"{device} has no FP8 support"


def resolve_data_parallel(parallel: ParallelConfig, world_size: int) -> None:
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


def check_model_split(model: ModelConfig, tp: int, pp: int = 1, virtual_pp: int = 1,
                      sequence_parallel: bool = False,
                      layers_per_virtual_stage: Optional[int] = None) -> None:
    """Every tensor-parallel dimension splits evenly; layers split evenly over (virtual) stages."""
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
    if sequence_parallel and model.seq_length % tp:
        raise ConfigError(f"--seq-length {model.seq_length} is not divisible by "
                          f"--tensor-model-parallel-size {tp} (sequence parallelism)")
    if model.num_layers % pp:
        raise ConfigError(f"--num-layers {model.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp}")
    if layers_per_virtual_stage is not None:
        if pp < 2:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs "
                              "--pipeline-model-parallel-size > 1")
        if layers_per_virtual_stage < 1 or model.num_layers % (pp * layers_per_virtual_stage):
            raise ConfigError(f"--num-layers {model.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp} x "
                              f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage}")
    elif model.num_layers % (pp * virtual_pp):
        raise ConfigError(f"--num-layers {model.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {pp} x {virtual_pp} virtual stages")


def check_sequence_parallel(parallel: ParallelConfig) -> None:
    if parallel.sequence_parallel and parallel.tp == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; "
                      "turning it off", stacklevel=3)
        parallel.sequence_parallel = False


def check_batch(training: TrainingConfig, parallel: ParallelConfig, model: ModelConfig) -> None:
    """Micro-batch and global batch (the final one, under a batch-size schedule) against dp."""
    mbs, dp = training.micro_batch_size, parallel.data_parallel_size
    if mbs < 1:
        raise ConfigError(f"--micro-batch-size must be positive, got {mbs}")
    _resolve_batch_schedule(training, model)
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


def _resolve_batch_schedule(training: TrainingConfig, model: ModelConfig) -> None:
    """--rampup-batch-size and --step-batch-size-schedule: at most one; the schedule's last
    batch is the global batch (which, if also given, must be that batch: Megatron's GPT-3
    example passes both)."""
    rampup, steps = training.rampup_batch_size, training.step_batch_size_schedule
    if rampup is not None and steps is not None:
        raise ConfigError("--rampup-batch-size and --step-batch-size-schedule are both set; "
                          "choose one")
    if rampup is not None and len(rampup) != 3:
        raise ConfigError(f"--rampup-batch-size takes 3 values (start, increment, samples), "
                          f"got {list(rampup)}")
    if steps is not None:
        from slimtron.training.batch_schedule import parse_step_schedule
        last = parse_step_schedule(steps, model.seq_length)[-1][1]
        if training.global_batch_size not in (None, last):
            raise ConfigError(f"--global-batch-size {training.global_batch_size} differs from the "
                              f"last batch size {last} of --step-batch-size-schedule")
        training.global_batch_size = last


def check_recompute(granularity: Optional[str], method: Optional[str],
                    num_layers: Optional[int], layers_per_stage: Optional[int] = None) -> None:
    """Megatron's rules: full needs a method and a layer count; selective takes neither."""
    if granularity not in (None, "full", "selective"):
        raise ConfigError(f"--recompute-granularity must be full or selective, got {granularity!r}")
    if method not in (None, "uniform", "block"):
        raise ConfigError(f"--recompute-method must be uniform or block, got {method!r}")
    if granularity == "full":
        if method is None or num_layers is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method "
                              "(uniform|block) and --recompute-num-layers")
        upper = layers_per_stage if layers_per_stage is not None else num_layers
        if not 1 <= num_layers <= upper:
            raise ConfigError(f"--recompute-num-layers {num_layers} must be between 1 and the "
                              f"{upper} layers per pipeline stage")
    elif method is not None or num_layers is not None:
        flag = "--recompute-method" if method is not None else "--recompute-num-layers"
        raise ConfigError(f"{flag} needs --recompute-granularity full "
                          f"(got {granularity or 'no recompute'})")


def resolve_training_length(training: TrainingConfig, optim: OptimizerConfig,
                            parallel: ParallelConfig, model: ModelConfig) -> None:
    """Iteration-based (--train-iters, --lr-*-iters) or sample-based (--train-samples,
    --lr-*-samples) training, as Megatron: never a mix. Sample-based sets train_iters from the
    (possibly growing) batch size."""
    if training.train_samples is None:
        if optim.lr_decay_samples is not None or optim.lr_warmup_samples:
            flag = "--lr-decay-samples" if optim.lr_decay_samples is not None \
                else "--lr-warmup-samples"
            raise ConfigError(f"{flag} needs sample-based training (--train-samples)")
        if training.rampup_batch_size is not None:
            raise ConfigError("--rampup-batch-size needs sample-based training (--train-samples), "
                              "as in Megatron")
        if training.train_iters is None:
            raise ConfigError("give --train-iters or --train-samples")
        return
    if optim.lr_decay_iters is not None or optim.lr_warmup_iters:
        flag = "--lr-decay-iters" if optim.lr_decay_iters is not None else "--lr-warmup-iters"
        raise ConfigError(f"{flag} is iteration-based; with --train-samples use "
                          f"{flag.replace('iters', 'samples')}")
    if training.train_samples < 1:
        raise ConfigError(f"--train-samples must be positive, got {training.train_samples}")
    from slimtron.training.batch_schedule import BatchSchedule
    schedule = BatchSchedule.from_config(training, parallel.data_parallel_size, model.seq_length)
    iterations = schedule.iterations_for(training.train_samples)
    if training.train_iters not in (None, iterations):
        raise ConfigError("--train-iters and --train-samples are both set; choose one")
    training.train_iters = iterations


def check_warmup(optim: OptimizerConfig) -> None:
    fraction = optim.lr_warmup_fraction
    if fraction is None:
        return
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {fraction}")
    if optim.lr_warmup_iters or optim.lr_warmup_samples:
        flag = "--lr-warmup-iters" if optim.lr_warmup_iters else "--lr-warmup-samples"
        raise ConfigError(f"--lr-warmup-fraction and {flag} are both set; choose one")


def check_decoupled_lr(optim: OptimizerConfig) -> None:
    if optim.decoupled_min_lr is not None and optim.decoupled_lr is None:
        raise ConfigError("--decoupled-min-lr needs --decoupled-lr")
    if optim.decoupled_lr is not None:
        low = optim.min_lr if optim.decoupled_min_lr is None else optim.decoupled_min_lr
        if not 0.0 <= low <= optim.decoupled_lr:
            raise ConfigError(f"need 0 <= --decoupled-min-lr ({low}) <= --decoupled-lr "
                              f"({optim.decoupled_lr})")


def check_logging(training: TrainingConfig) -> None:
    """--wandb-project (as Megatron: with --wandb-exp-name) needs the wandb package."""
    if training.wandb_project is None:
        if training.wandb_exp_name is not None or training.wandb_save_dir is not None:
            raise ConfigError("--wandb-exp-name and --wandb-save-dir need --wandb-project")
        return
    if not training.wandb_exp_name:
        raise ConfigError("--wandb-project needs --wandb-exp-name (the run's name), as in Megatron")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb-project: the wandb package is not installed (pip install "
                          "wandb); nothing could be logged to Weights & Biases")


def check_profile(training: TrainingConfig) -> None:
    if training.profile and not 0 <= training.profile_step_start < training.profile_step_end:
        raise ConfigError(f"--profile needs 0 <= --profile-step-start "
                          f"({training.profile_step_start}) < --profile-step-end "
                          f"({training.profile_step_end})")
    if training.manual_gc_interval < 0:
        raise ConfigError(f"--manual-gc-interval must be >= 0, got {training.manual_gc_interval}")
    if training.exit_duration_in_mins is not None and training.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins must be positive, got "
                          f"{training.exit_duration_in_mins}")


def check_lengths(model: ModelConfig) -> None:
    if model.seq_length > model.max_position_embeddings:
        raise ConfigError(f"--seq-length {model.seq_length} exceeds --max-position-embeddings "
                          f"{model.max_position_embeddings}")


def parse_blend(data_path) -> tuple[list[str], Optional[list[float]]]:
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


def check_data_files(data: DataConfig, training: TrainingConfig) -> None:
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


def _llama(num_layers, hidden, ffn, heads, groups=None, seq=4096, vocab=32000) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=heads, num_query_groups=groups, seq_length=seq,
                       vocab_size=vocab, normalization="RMSNorm", norm_epsilon=1e-5,
                       position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                       untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                       attention_dropout=0.0)


def _gpt2(num_layers, hidden, heads, seq=1024, vocab=50257) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
                       seq_length=seq, vocab_size=vocab, normalization="LayerNorm",
                       position_embedding_type="learned_absolute", swiglu=False,
                       add_bias_linear=True, untie_embeddings_and_output_weights=False)


# Presets give the model shape only; vocab_size is replaced by the tokenizer's when one is given.
PRESETS = {
    "tiny-gpt2": lambda: _gpt2(num_layers=4, hidden=64, heads=4, seq=64, vocab=1000),
    "tiny-llama": lambda: _llama(num_layers=4, hidden=64, ffn=176, heads=4, groups=2, seq=64, vocab=1000),
    # The CPU quickstart: small enough to train visibly on 8 CPU processes in a few minutes.
    "quickstart-llama": lambda: _llama(num_layers=4, hidden=128, ffn=352, heads=4, groups=2, seq=128,
                                       vocab=8000),
    "gpt2-124m": lambda: _gpt2(num_layers=12, hidden=768, heads=12),
    "gpt2-350m": lambda: _gpt2(num_layers=24, hidden=1024, heads=16),
    "llama-100m": lambda: _llama(num_layers=8, hidden=768, ffn=2048, heads=12, seq=1024),
    "llama2-7b": lambda: _llama(num_layers=32, hidden=4096, ffn=11008, heads=32),
    "llama2-13b": lambda: _llama(num_layers=40, hidden=5120, ffn=13824, heads=40),
    "llama2-70b": lambda: _llama(num_layers=80, hidden=8192, ffn=28672, heads=64, groups=8),
}


def model_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
