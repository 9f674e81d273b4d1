"""The data side of training: the three datasets, and each step's micro-batches for this rank."""
from __future__ import annotations

import torch

from slimtron.config import Config, ConfigError
from slimtron.parallel.context_parallel import shard_batch
from slimtron.parallel.state import ParallelState
from slimtron.training.metrics import log


def build_datasets(config: Config, tokenizer, pstate: ParallelState,
                   num_train_samples: int | None = None):
    """(train, valid, test) datasets, and which of them exist (an empty split has none).
    Ranks that read no data (middle pipeline stages) get Nones but the same availability.
    ``num_train_samples``: what the batch schedule consumes (default iterations x batch)."""
    from slimtron.data import build_train_valid_test_datasets
    from slimtron.data.mock_dataset import MockGPTDataset

    t = config.training
    gbs = t.global_batch_size
    eval_runs = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 1
    if num_train_samples is None:
        num_train_samples = t.train_iters * gbs
    num_samples = (num_train_samples, eval_runs * t.eval_iters * gbs, t.eval_iters * gbs)
    seq = config.model.seq_length
    if config.data.mock_data:
        d = config.data
        masks = dict(eod_id=getattr(tokenizer, "eod", None), eod_mask_loss=d.eod_mask_loss,
                     reset_position_ids=d.reset_position_ids,
                     reset_attention_mask=d.reset_attention_mask)
        datasets = tuple(MockGPTDataset(n, seq, config.model.vocab_size, t.seed + i, **masks)
                         for i, n in enumerate(num_samples))
    elif config.data.sft:
        from slimtron.data.sft_dataset import build_sft_datasets
        datasets = tuple(build_sft_datasets(
            config.data.data_path, config.data.split, seq, t.seed, num_samples, tokenizer,
            cache_dir=config.data.data_cache_path, log=lambda line: log(pstate, line)))
    else:  # collective (rank 0 builds the index cache, the others wait): every rank calls it
        datasets = tuple(build_train_valid_test_datasets(
            config.data.data_path, config.data.split, seq, t.seed, num_samples,
            cache_dir=config.data.data_cache_path, eod_id=getattr(tokenizer, "eod", None),
            eod_mask_loss=config.data.eod_mask_loss, pstate=pstate,
            reset_position_ids=config.data.reset_position_ids,
            reset_attention_mask=config.data.reset_attention_mask,
            vocab_size=config.model.vocab_size, mmap_bin_files=config.data.mmap_bin_files))
    available = tuple(d is not None for d in datasets)  # the same on every rank
    if not (pstate.is_first_stage or pstate.is_last_stage or reads_documents(config)):
        datasets = (None, None, None)
    return datasets, available


def reads_documents(config: Config) -> bool:
    """Whether samples carry per-document positions or segments, which every pipeline stage's
    attention reads (not only the first and last stage's embedding and loss)."""
    d = config.data
    return d.reset_position_ids or d.reset_attention_mask or getattr(d, "sft", False)


def microbatches_for(dataset, first_sample: int, config: Config, pstate: ParallelState,
                     num_microbatches: int) -> list:
    """This rank's micro-batches of the global batch starting at ``first_sample``.

    Megatron's sampler: each group of ``mbs * dp`` consecutive samples is one micro-batch step,
    data-parallel rank d taking the d-th ``mbs`` of it. Samples depend only on the global index,
    so any layout sees the same global batch and a resumed run the same data.
    """
    if dataset is None:
        return [None] * num_microbatches
    mbs, dp = config.training.micro_batch_size, pstate.dp.size
    out = []
    for k in range(num_microbatches):
        start = first_sample + k * mbs * dp + pstate.dp.rank * mbs
        if start + mbs > len(dataset):
            raise ConfigError(f"the dataset has {len(dataset)} samples; sample {start + mbs - 1} "
                              "was asked for (it was built for fewer iterations than this run)")
        samples = [dataset[start + j] for j in range(mbs)]
        batch = {key: torch.stack([torch.as_tensor(s[key], device="cpu") for s in samples])
                 for key in samples[0]}
        # Context parallelism: this rank's two load-balanced chunks of every sequence.
        batch = shard_batch(batch, pstate.cp.size, pstate.cp.rank)
        out.append({key: value.to(pstate.device) for key, value in batch.items()})
    return out
