"""The data side of training: the three datasets, and each step's micro-batches for this rank,
read and collated in the background while the previous step runs (``MicroBatchPrefetcher``)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

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
    return to_rank(host_microbatches(dataset, first_sample, config, pstate, num_microbatches),
                   pstate)


def microbatch_indices(first_sample: int, k: int, config: Config, pstate: ParallelState,
                       dataset_length: int) -> list:
    """Sample indices of this rank's micro-batch ``k`` of the global batch at ``first_sample``."""
    mbs = config.training.micro_batch_size
    start = first_sample + k * mbs * pstate.dp.size + pstate.dp.rank * mbs
    if start + mbs > dataset_length:
        raise ConfigError(f"the dataset has {dataset_length} samples; sample {start + mbs - 1} "
                          "was asked for (it was built for fewer iterations than this run)")
    return list(range(start, start + mbs))


def collate(samples: list) -> dict:
    return {key: torch.stack([torch.as_tensor(s[key], device="cpu") for s in samples])
            for key in samples[0]}


def host_microbatches(dataset, first_sample: int, config: Config, pstate: ParallelState,
                      num_microbatches: int) -> list:
    """The micro-batches of ``microbatches_for``, collated on the host."""
    out = []
    for k in range(num_microbatches):
        indices = microbatch_indices(first_sample, k, config, pstate, len(dataset))
        out.append(collate([dataset[i] for i in indices]))
    return out


def to_rank(microbatches: list, pstate: ParallelState) -> list:
    """Host micro-batches as this rank computes on them: its sequence chunks, on its device."""
    device, out = pstate.device, []
    for batch in microbatches:
        # Context parallelism: this rank's two load-balanced chunks of every sequence.
        batch = shard_batch(batch, pstate.cp.size, pstate.cp.rank)
        out.append({key: t if t.device == device else t.to(device, non_blocking=True)
                    for key, t in batch.items()})
    return out


class _Steps:
    """Each step's global batch and micro-batch count from its first sample: constant, or
    following a batch-size schedule (``training.batch_schedule.BatchSchedule``)."""

    def __init__(self, config: Config, num_microbatches: int, batch=None):
        self.config, self.num_microbatches, self.batch = config, num_microbatches, batch

    def size(self, first_sample: int) -> int:
        if self.batch is None:
            return self.config.training.global_batch_size
        return self.batch.global_batch_size(first_sample)

    def count(self, first_sample: int) -> int:
        if self.batch is None:
            return self.num_microbatches
        return self.batch.num_microbatches(first_sample)


class _StepIndices(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches, step after step from ``first_sample``."""

    def __init__(self, first_sample: int, config: Config, pstate: ParallelState,
                 steps: _Steps, dataset_length: int):
        self.first_sample, self.config, self.pstate = first_sample, config, pstate
        self.steps, self.dataset_length = steps, dataset_length

    def __iter__(self):
        first = self.first_sample
        while True:  # ends before the first micro-batch the dataset cannot fill
            for k in range(self.steps.count(first)):
                try:
                    yield microbatch_indices(first, k, self.config, self.pstate,
                                             self.dataset_length)
                except ConfigError:
                    return
            first += self.steps.size(first)


class MicroBatchPrefetcher:
    """``get(first_sample)`` returns ``microbatches_for(dataset, first_sample, ...)`` (the same
    samples) and starts reading the next step's (``first_sample`` + global batch) in the
    background. ``--num-workers 0``: one thread reads and collates; ``--num-workers n``: a
    ``torch.utils.data.DataLoader`` with n worker processes (pinned memory on CUDA), as Megatron.
    A request for other samples than the prefetched ones (a resumed or skipped step) is read
    directly and restarts the prefetching from there. With ``batch`` (a BatchSchedule) each
    step's size and micro-batch count follow the consumed samples."""

    def __init__(self, dataset, config: Config, pstate: ParallelState, num_microbatches: int,
                 batch=None):
        self.dataset, self.config, self.pstate = dataset, config, pstate
        self.num_microbatches = num_microbatches
        self.steps = _Steps(config, num_microbatches, batch)
        self.num_workers = config.data.num_workers
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        self._next_first: Optional[int] = None
        self._future: Optional[Future] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._loader_iter = None

    def get(self, first_sample: int) -> list:
        if self.dataset is None:
            return [None] * self.steps.count(first_sample)
        for k in range(self.steps.count(first_sample)):  # out of samples: the one-line error
            microbatch_indices(first_sample, k, self.config, self.pstate, len(self.dataset))
        if self.num_workers > 0:
            batches = self._from_loader(first_sample)
        else:
            batches = self._from_thread(first_sample)
        self._next_first = first_sample + self.steps.size(first_sample)
        return to_rank(batches, self.pstate)

    def _from_thread(self, first_sample: int) -> list:
        if self._future is not None and self._next_first == first_sample:
            batches = self._future.result()
        else:
            batches = self._read(first_sample)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimtron-data")
        following = first_sample + self.steps.size(first_sample)
        self._future = self._pool.submit(self._read, following)
        return batches

    def _read(self, first_sample: int) -> list:
        batches = host_microbatches(self.dataset, first_sample, self.config, self.pstate,
                                    self.steps.count(first_sample))
        if self.pstate.device.type == "cuda":  # pinned: the copy to the GPU runs asynchronously
            batches = [{key: t.pin_memory() for key, t in batch.items()} for batch in batches]
        return batches

    def _from_loader(self, first_sample: int) -> list:
        if self._loader_iter is None or self._next_first != first_sample:
            sampler = _StepIndices(first_sample, self.config, self.pstate, self.steps,
                                   len(self.dataset))
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                collate_fn=collate, pin_memory=self.pstate.device.type == "cuda")
            self._loader_iter = iter(loader)
        return [next(self._loader_iter) for _ in range(self.steps.count(first_sample))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._future = self._loader_iter = None
