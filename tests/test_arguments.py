"""Megatron-style command line -> Config, presets with overrides, and every validation error."""
import shlex

import pytest

from slimtron.arguments import parse_args, to_argv, validate
from slimtron.config import Config, ConfigError, model_preset, parse_blend

MEGATRON_7B = """
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32
    --seq-length 4096 --max-position-embeddings 4096 --normalization RMSNorm --norm-epsilon 1e-5
    --position-embedding-type rope --rotary-base 10000 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --hidden-dropout 0.0 --attention-dropout 0.0
    --init-method-std 0.02 --make-vocab-size-divisible-by 128 --vocab-size 32000
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
    --use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 1000000
    --distributed-backend gloo --distributed-timeout-minutes 30
    --optimizer adam --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --lr-decay-iters 240000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8
    --clip-grad 1.0 --bf16 --data-path 0.7 /d/a_text_document 0.3 /d/b_text_document
    --split 98,1,1 --tokenizer-type SentencePieceTokenizer --tokenizer-model /t/tok.model
    --data-cache-path /cache --num-workers 2 --eod-mask-loss
    --micro-batch-size 1 --global-batch-size 1024 --train-iters 250000 --seed 7 --log-interval 10
    --eval-interval 1000 --eval-iters 20 --save /ckpt --save-interval 1000 --load /ckpt
    --no-load-optim --no-load-rng --finetune --exit-interval 5000 --tensorboard-dir /tb
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
"""


def _cfg(argv: str) -> Config:
    return parse_args(shlex.split(argv))


def test_megatron_argv_maps_to_config_and_round_trips():
    cfg = _cfg(MEGATRON_7B)
    assert cfg.model == model_preset("llama2-7b")
    assert cfg.parallel.tp == 2 and cfg.parallel.pp == 2 and cfg.parallel.sequence_parallel
    assert cfg.parallel.bucket_size == 1_000_000 and cfg.parallel.distributed_backend == "gloo"
    assert cfg.optim.adam_beta2 == 0.95 and cfg.optim.bf16 and not cfg.optim.fp16
    assert cfg.optim.lr_decay_iters == 240000
    assert cfg.data.data_path == ["0.7", "/d/a_text_document", "0.3", "/d/b_text_document"]
    assert cfg.data.eod_mask_loss and cfg.data.num_workers == 2
    assert cfg.training.global_batch_size == 1024 and cfg.training.recompute_method == "uniform"
    assert cfg.training.no_load_optim and cfg.training.finetune and cfg.training.load == "/ckpt"
    assert parse_args(to_argv(cfg)) == cfg
    # Defaults round-trip too (flags that are off or None emit nothing).
    assert parse_args(to_argv(Config())) == Config()


def test_preset_with_overrides():
    cfg = _cfg("--preset llama2-70b --num-layers 4 --seq-length 512")
    ref = model_preset("llama2-70b")
    assert (cfg.model.num_layers, cfg.model.seq_length) == (4, 512)
    assert cfg.model.max_position_embeddings == 512  # derived from seq_length, follows it
    assert cfg.model.num_query_groups == 8 and cfg.model.ffn_hidden_size == ref.ffn_hidden_size
    assert cfg.model.swiglu and cfg.model.normalization == "RMSNorm"
    # A derived preset field follows an overridden input; an explicit flag wins over both.
    gpt = _cfg("--preset gpt2-124m --hidden-size 512 --num-attention-heads 8")
    assert (gpt.model.ffn_hidden_size, gpt.model.kv_channels) == (2048, 64)
    assert gpt.model.num_query_groups == 8
    gqa = _cfg("--preset llama2-7b --group-query-attention --num-query-groups 4 --kv-channels 96")
    assert (gqa.model.num_query_groups, gqa.model.kv_channels) == (4, 96)
    assert _cfg("--preset tiny-gpt2 --normalization RMSNorm").model.normalization == "RMSNorm"
    assert _cfg("--preset tiny-gpt2 --disable-bias-linear").model.add_bias_linear is False
    # Megatron defaults without a preset: GQA means one group; SwiGLU ffn is 8h/3 rounded to 64.
    plain = _cfg("--num-layers 2 --hidden-size 768 --num-attention-heads 12 --swiglu "
                 "--group-query-attention")
    assert plain.model.num_query_groups == 1 and plain.model.ffn_hidden_size == 2048
    with pytest.raises(ConfigError, match="--num-query-groups needs --group-query-attention"):
        _cfg("--num-query-groups 2")
    with pytest.raises(ConfigError, match="unknown --preset"):
        model_preset("llama9")
    # The null tokenizer is sized by --vocab-size alone, never by a preset's vocabulary.
    with pytest.raises(ConfigError, match="NullTokenizer needs --vocab-size"):
        _cfg("--preset tiny-llama --tokenizer-type NullTokenizer")
    assert _cfg("--tokenizer-type NullTokenizer --vocab-size 500").model.vocab_size == 500


def _valid(extra: str = "", world: int = 8, base: str = "--preset tiny-llama --mock-data"):
    return validate(_cfg(f"{base} {extra}"), world)


def test_validate_fills_in_data_parallel_and_global_batch():
    cfg = _valid("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                 "--micro-batch-size 3 --lr-warmup-fraction 0.1 --train-iters 50")
    assert cfg.parallel.data_parallel_size == 2 and cfg.training.global_batch_size == 6
    assert validate(cfg, 8) is cfg and cfg.training.global_batch_size == 6  # idempotent
    with pytest.raises(ConfigError, match="data_parallel_size 2 does not match world size 4"):
        validate(cfg, 4)


@pytest.mark.parametrize("extra, world, message", [
    ("--tensor-model-parallel-size 3", 8,
     "world size 8 is not divisible by --tensor-model-parallel-size 3 x "
     "--pipeline-model-parallel-size 1 = 3"),
    ("--num-attention-heads 6 --kv-channels 16 --group-query-attention --num-query-groups 6 "
     "--tensor-model-parallel-size 4", 4,
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    ("--tensor-model-parallel-size 4", 4,
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    ("--ffn-hidden-size 175 --tensor-model-parallel-size 2", 2,
     "--ffn-hidden-size 175 is not divisible by --tensor-model-parallel-size 2"),
    ("--hidden-size 66 --kv-channels 16 --tensor-model-parallel-size 4 "
     "--num-attention-heads 4 --group-query-attention --num-query-groups 4", 4,
     "--hidden-size 66 is not divisible by --tensor-model-parallel-size 4"),
    ("--make-vocab-size-divisible-by 0", 1, "--make-vocab-size-divisible-by must be positive"),
    ("--pipeline-model-parallel-size 3", 3,
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    ("--num-layers 6 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2",
     2, "--num-layers 6 is not divisible by --pipeline-model-parallel-size 2 x "
        "--num-layers-per-virtual-pipeline-stage 2"),
    ("--num-layers-per-virtual-pipeline-stage 2", 1,
     "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
    ("--micro-batch-size 2 --global-batch-size 6", 2,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4"),
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
     "--global-batch-size 3", 2,
     "number of micro-batches 3 .* is not divisible by --pipeline-model-parallel-size 2"),
    ("--fp16 --bf16", 1, "--fp16 and --bf16 are both set"),
    ("--recompute-granularity full", 1,
     "--recompute-granularity full needs --recompute-method"),
    ("--recompute-granularity full --recompute-method block --recompute-num-layers 5", 1,
     "--recompute-num-layers 5 must be between 1 and the 4 layers per pipeline stage"),
    ("--recompute-granularity selective --recompute-method uniform", 1,
     "--recompute-method needs --recompute-granularity full"),
    ("--recompute-num-layers 2", 1, "--recompute-num-layers needs --recompute-granularity full"),
    ("--lr-warmup-fraction 0.5 --lr-warmup-iters 3", 1,
     "--lr-warmup-fraction and --lr-warmup-iters are both set"),
    ("--seq-length 128 --max-position-embeddings 64", 1,
     "--seq-length 128 exceeds --max-position-embeddings 64"),
])
def test_validation_errors(extra, world, message):
    with pytest.raises(ConfigError, match=message) as info:
        _valid(extra, world)
    assert "\n" not in str(info.value)


def test_sequence_parallel_without_tp_warns_and_turns_off():
    with pytest.warns(UserWarning, match="--sequence-parallel has no effect"):
        cfg = _valid("--sequence-parallel", world=2)
    assert cfg.parallel.sequence_parallel is False
    assert _valid("--sequence-parallel --tensor-model-parallel-size 2", 2).parallel.sequence_parallel


def test_missing_files_are_named(tmp_path):
    base = "--preset tiny-gpt2"
    with pytest.raises(ConfigError, match="no --data-path given"):
        _valid("", 1, base)
    prefix = tmp_path / "corpus_text_document"
    (tmp_path / "corpus_text_document.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"--data-path: {prefix}.idx does not exist"):
        _valid(f"--data-path {prefix}", 1, base)
    (tmp_path / "corpus_text_document.idx").write_bytes(b"")
    _valid(f"--data-path 1.0 {prefix}", 1, base)
    with pytest.raises(ConfigError, match=f"--data-path: {tmp_path}/other.bin does not exist"):
        _valid(f"--data-path 0.5 {prefix} 0.5 {tmp_path}/other", 1, base)
    with pytest.raises(ConfigError, match=f"--tokenizer-model: {tmp_path}/tok.model does not"):
        _valid(f"--mock-data --tokenizer-type SentencePieceTokenizer "
               f"--tokenizer-model {tmp_path}/tok.model", 1, base)
    with pytest.raises(ConfigError, match=f"--load: directory {tmp_path}/ckpt does not exist"):
        _valid(f"--mock-data --load {tmp_path}/ckpt", 1, base)
    # --load equal to --save is auto-resume: a first run starts from scratch.
    _valid(f"--mock-data --load {tmp_path}/ckpt --save {tmp_path}/ckpt", 1, base)
    validate(_cfg(f"{base} --load {tmp_path}/nothing"), 1, check_files=False)


def test_parse_blend():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ConfigError, match="WEIGHT PREFIX pairs"):
        parse_blend(["0.3", "a", "b"])
    with pytest.raises(ConfigError, match="non-negative"):
        parse_blend(["-1", "a", "2", "b"])


def test_training_side_megatron_flags_map_to_config_and_round_trip():
    cfg = _cfg("--preset tiny-llama --mock-data --train-samples 1000 --rampup-batch-size 8 8 500 "
               "--global-batch-size 32 --lr-warmup-samples 100 --lr-decay-samples 900 "
               "--decoupled-lr 5e-4 --decoupled-min-lr 4.5e-5 --calculate-per-token-loss "
               "--exit-duration-in-mins 235 --exit-signal-handler --manual-gc "
               "--manual-gc-interval 10 --empty-unused-memory-level 1 --log-throughput --profile "
               "--profile-step-start 4 --profile-step-end 6 --profile-ranks 0 1 "
               "--no-mmap-bin-files --grad-reduce-in-bf16 --context-parallel-size 2")
    t, o = cfg.training, cfg.optim
    assert (t.train_samples, t.train_iters, t.rampup_batch_size) == (1000, None, [8, 8, 500])
    assert (o.lr_warmup_samples, o.lr_decay_samples, o.decoupled_lr, o.decoupled_min_lr) == \
        (100, 900, 5e-4, 4.5e-5)
    assert t.calculate_per_token_loss and t.exit_signal_handler and t.manual_gc and t.profile
    assert (t.exit_duration_in_mins, t.manual_gc_interval, t.empty_unused_memory_level) == \
        (235, 10, 1)
    assert (t.profile_step_start, t.profile_step_end, t.profile_ranks) == (4, 6, [0, 1])
    assert not cfg.data.mmap_bin_files and cfg.parallel.grad_reduce_in_bf16
    assert cfg.parallel.context_parallel_size == 2
    assert parse_args(to_argv(cfg)) == cfg
    validate(cfg, 4)
    assert cfg.parallel.data_parallel_size == 2 and cfg.training.train_iters > 0
