"""Typed configuration: one dataclass per concern, plus model presets.

Field names follow Megatron-LM's command-line flags (``--num-layers`` -> ``num_layers``) so that the
CLI in ``slimtron.arguments`` is a thin mapping. Derived quantities are properties, never stored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which setting is wrong and why."""


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
    lr_warmup_fraction: Optional[float] = None  # of lr_decay_iters; excludes lr_warmup_iters
    lr_decay_iters: Optional[int] = None  # default train_iters
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
    sft: bool = False  # --data-path names .jsonl conversations (slimtron.data.sft_dataset)


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default micro_batch_size * dp
    train_iters: int = 10
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
    eval_only: bool = False
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
